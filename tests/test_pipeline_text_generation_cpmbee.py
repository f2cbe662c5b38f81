"""`pipeline("text-generation", ..., pipeline_class=CpmBeeTextGenerationPipeline)`: CPM-Bee prompt dicts, chats and
strings give the answer `generate()` + `decode(ext_table=...)` gives."""

from __future__ import annotations

import pytest
from _repos import converted_repo
from transformers import AutoTokenizer, pipeline

from transformers_viscpm import CpmBeeTextGenerationPipeline
from transformers_viscpm.models.cpmbee.modeling_cpmbee import CpmBeeForCausalLM

SETTINGS = {"max_new_tokens": 4, "num_beams": 1, "do_sample": False}
PROMPT = {"input": "今天天气 𠀀𠀁 🐍", "prompt": "中翻英", "<ans>": ""}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    repo = converted_repo(tmp_path_factory, "cpmbee", False)
    model, tok = CpmBeeForCausalLM.from_pretrained(repo).eval(), AutoTokenizer.from_pretrained(repo)
    pipe = pipeline(
        "text-generation", model=model, tokenizer=tok, pipeline_class=CpmBeeTextGenerationPipeline, device="cpu"
    )
    return model, tok, pipe


def answer_of(model, tok, prompt) -> tuple[list[int], str]:
    enc = tok(prompt, return_tensors="pt")
    new = model.generate(**enc, **SETTINGS)[0, enc["input_ids"].shape[1] :].tolist()
    return new, tok.decode(new, skip_special_tokens=True, ext_table=enc.ext_table)


def test_dict_prompts(parts):
    model, tok, pipe = parts
    expected_ids, expected = answer_of(model, tok, PROMPT)
    assert pipe(PROMPT, **SETTINGS) == [{"generated_text": expected}]
    other = {"input": "x 😀", "<ans>": ""}
    assert pipe([PROMPT, other], **SETTINGS) == [
        [{"generated_text": expected}],
        [{"generated_text": answer_of(model, tok, other)[1]}],
    ]
    ids = pipe(PROMPT, return_tensors=True, **SETTINGS)[0]["generated_token_ids"]
    assert ids[-len(expected_ids) :] == expected_ids


def test_chat_messages_and_strings(parts):
    model, tok, pipe = parts
    messages = [{"role": "system", "content": "中翻英"}, {"role": "user", "content": "今天天气 𠀀𠀁 🐍"}]
    expected = answer_of(model, tok, {"prompt": "中翻英", "input": "今天天气 𠀀𠀁 🐍", "<ans>": ""})[1]
    result = pipe(messages, **SETTINGS)[0]["generated_text"]
    assert result == [*messages, {"role": "assistant", "content": expected}]
    text_answer = answer_of(model, tok, {"input": "hello 🐍", "<ans>": ""})[1]
    assert pipe("hello 🐍", **SETTINGS) == [{"generated_text": "hello 🐍" + text_answer}]
    assert pipe("hello 🐍", return_full_text=False, **SETTINGS) == [{"generated_text": text_answer}]
