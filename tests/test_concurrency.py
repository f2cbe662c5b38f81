"""One tokenizer, processor and model shared by 8 threads give exactly the sequential results (nothing per call is
kept on a shared object: every encoding carries its own ext table)."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from _repos import converted_repo
from PIL import Image

from transformers_viscpm.models.cpmbee.modeling_cpmbee import CpmBeeForCausalLM
from transformers_viscpm.models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer
from transformers_viscpm.models.viscpm_chat.modeling_viscpm_chat import VisCPMChatForConditionalGeneration

THREADS = 8
PER_THREAD = 500
# Runs of characters outside the vocabulary become ext ids: each prompt gets its own, numbered from vocab_size.
RARE = ["𠀀𠀁 🐍", "☃☄ ☃", "😀", "🍕🍕 <ans>", "龘靐", "\x00\x01", "𪈵", "é ü"]
PLAIN = ["今天天气不错", "hello world", "a < b", "User: hi\nAI: yo", ""]


def make_prompts(count: int, seed: int = 0) -> list[tuple[str, Any]]:
    """Mixed work: plain text (3 in 4) and dict encode/decode, `generate` + decode (1 in 200), `chat` (1 in 1000;
    the tiny models' calls take most of the test's time)."""
    rng = random.Random(seed)
    prompts = []
    for index in range(count):
        text = "".join(rng.choice(RARE + PLAIN) + rng.choice(" ,") for _ in range(rng.randint(1, 4)))
        if index % 1000 == 0:
            prompts.append(("chat", text))
        elif index % 200 == 1:
            prompts.append(("generate", {"input": text, "<ans>": ""}))
        elif index % 4:
            prompts.append(("text", text if index % 2 else [text, rng.choice(RARE)]))
        else:
            prompts.append(("dict", {"input": text, "prompt": rng.choice(RARE), "<ans>": ""}))
    return prompts


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Any]:
    chat_model = VisCPMChatForConditionalGeneration.from_pretrained(
        converted_repo(tmp_path_factory, "viscpm_chat", False)
    ).eval()
    return {
        "tokenizer": CpmBeeTokenizer(),
        "lm": CpmBeeForCausalLM.from_pretrained(converted_repo(tmp_path_factory, "cpmbee", False)).eval(),
        "chat_model": chat_model,
        "processor": chat_model.default_processor,
        "image": Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)),
    }


def run(shared: dict[str, Any], kind: str, prompt: Any) -> Any:
    tok = shared["tokenizer"]
    if kind == "text":
        enc = tok(prompt)
        return enc.input_ids, enc.ext_table, tok.decode(enc.input_ids, ext_table=enc.ext_table)
    if kind == "dict":
        enc = tok(prompt, return_tensors="pt")
        info = enc.sample_infos[0]
        return enc["input_ids"].tolist(), enc["input_id_subs"].tolist(), info.ext_table, info.predict_segments
    if kind == "generate":
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = shared["lm"].generate(**enc, max_new_tokens=3, num_beams=1, do_sample=False)
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        return new, tok.decode(new, ext_table=enc.ext_table)
    answer, context, _ = shared["chat_model"].chat(
        shared["image"], prompt, processor=shared["processor"], max_new_tokens=2, num_beams=2
    )
    return answer, context


def test_threads_share_tokenizer_processor_and_models(shared):
    prompts = make_prompts(THREADS * PER_THREAD)
    kinds = {kind for kind, _ in prompts}
    assert kinds == {"text", "dict", "generate", "chat"}
    sequential = [run(shared, kind, prompt) for kind, prompt in prompts]
    # Decoding saw rare text: ext ids came back as their own prompt's characters.
    assert any("𠀀𠀁" in result[2] for (kind, _), result in zip(prompts, sequential) if kind == "text")
    with ThreadPoolExecutor(THREADS) as pool:
        threaded = list(pool.map(lambda item: run(shared, *item), prompts, chunksize=7))
    mismatches = [i for i, (a, b) in enumerate(zip(sequential, threaded)) if a != b]
    assert mismatches == [], f"{len(mismatches)} results differ, first: {prompts[mismatches[0]]!r}"
