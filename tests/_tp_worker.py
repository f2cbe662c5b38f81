"""One tensor-parallel run of the tiny converted repos, the same code with and without `tp_plan="auto"`.

`torchrun --nproc_per_node 2 tests/_tp_worker.py CPMBEE_REPO CHAT_REPO OUT_DIR` loads both repos sharded over
the ranks (gloo on CPU) and each rank writes `OUT_DIR/rank{R}.json` and `OUT_DIR/rank{R}.safetensors`;
`test_tensor_parallel.py` runs `run_case` in one process and compares.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

import transformers_viscpm  # noqa: F401

CPMBEE_PROMPT = [{"input": "今天天气真好", "prompt": "中翻英", "<ans>": ""}]
GREEDY_PROMPT = "CPM-Bee 的张量并行"
CHAT_QUESTION = "这幅图像是什么颜色的？"


def local_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """The shapes of this rank's part of the first layer's projections and of the position-bias table."""
    shapes = {}
    for name, parameter in model.named_parameters():
        key = name.rsplit(".", 2)[-2] if name.endswith(".weight") else name.rsplit(".", 1)[-1]
        if key in ("project_q", "attention_out", "w_out", "relative_attention_bias") and key not in shapes:
            shapes[key] = list(parameter.to_local().shape if isinstance(parameter, DTensor) else parameter.shape)
    return shapes


def run_case(cpmbee_repo: str, chat_repo: str, **load_kwargs: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Logits, greedy ids, `generate_answers` and `chat()` answers of the tiny repos loaded with `load_kwargs`."""
    tokenizer = AutoTokenizer.from_pretrained(cpmbee_repo)
    model = AutoModelForCausalLM.from_pretrained(cpmbee_repo, **load_kwargs).eval()
    encoding = tokenizer([GREEDY_PROMPT], return_tensors="pt")
    with torch.no_grad():
        logits = model(**{key: value for key, value in encoding.items() if key not in ("ext_table_mask", "allow_unk")})
    greedy = model.generate(**encoding, max_new_tokens=8, do_sample=False)
    static = model.generate(**encoding, max_new_tokens=8, do_sample=False, cache_implementation="static")
    answers = model.generate_answers(tokenizer, CPMBEE_PROMPT, max_new_tokens=8)

    chat = AutoModelForImageTextToText.from_pretrained(chat_repo, **load_kwargs).eval()
    processor = AutoProcessor.from_pretrained(chat_repo)
    image = Image.new("RGB", (40, 30), (200, 120, 40))
    chat_inputs, _ = processor.encode(images=image, text=CHAT_QUESTION, context="")
    with torch.no_grad():
        chat_logits = chat(
            **{key: value for key, value in chat_inputs.items() if key not in ("ext_table_mask", "allow_unk")}
        )
    answer, context, _ = chat.chat(image, CHAT_QUESTION, processor=processor, max_new_tokens=8)
    results = {
        "greedy": greedy.tolist(),
        "static": static.tolist(),
        "answers": answers,
        "chat": [answer, context],
        # what this rank holds: half the heads and FFN columns under 2-way tensor parallelism
        "local_shapes": {"cpmbee": local_shapes(model), "chat": local_shapes(chat.model.language_model)},
    }
    return results, {"logits": logits.logits.contiguous(), "chat_logits": chat_logits.logits.contiguous()}


def main() -> None:
    cpmbee_repo, chat_repo, out = sys.argv[1:4]
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    results, tensors = run_case(cpmbee_repo, chat_repo, tp_plan="auto")
    save_file(tensors, Path(out) / f"rank{rank}.safetensors")
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main()
