"""A tiny seeded VisCPM-Chat checkpoint in the original layout (`VLU_CPMBee.state_dict()`).

The released checkpoint is one flat state dict: `query` (the learned BEiT-3 queries), `vpm.*` (VisCPM's
`BEiT3Wrapper`: `vpm.beit3.*` plus the unused `vpm.mim_head.*`), `llm.*` (CPM-Bee) and `mapping.{0,2}.*`
(Linear-GELU-Linear from the vision width to the LLM width), in that order. Each part draws from its own seeded
generator: the vision tower and CPM-Bee exactly as `init_random_` of the reference recipe does on the original
modules (see `synthetic.beit3` and `synthetic.cpmbee`), the query and the mapping with the recipe of
`head_original_state_dict`. `tests/fixtures/record/record_chat.py` loads these tensors into the original
`VLU_CPMBee` (strictly, in this key order), so its golden values apply to them. Only torch is needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch

from .beit3 import beit3_original_state_dict
from .cpmbee import original_cpmbee_state_dict, tiny_cpmbee_config

__all__ = [
    "TINY_CHAT_QUERY_NUM",
    "TINY_CHAT_SEEDS",
    "TINY_CHAT_TEXT_VOCAB",
    "TINY_CHAT_VISION",
    "head_original_state_dict",
    "original_chat_state_dict",
    "tiny_chat_llm_config",
]

# BEiT-3 as VisCPM builds it (224 / 16, so 197 image tokens before the queries), only narrow and shallow.
TINY_CHAT_VISION: dict[str, int] = dict(
    image_size=224,
    patch_size=16,
    num_channels=3,
    hidden_size=64,
    num_attention_heads=4,
    intermediate_size=256,
    num_hidden_layers=2,
    max_text_positions=1024,
)
# Rows of BEiT-3's text embedding; the converter drops it, so a small table keeps the file small.
TINY_CHAT_TEXT_VOCAB = 100
TINY_CHAT_QUERY_NUM = 64
TINY_CHAT_SEEDS = dict(llm=0, vpm=1, head=2)
# The vision tower is drawn with this std (as the BEiT-3 golden cases), CPM-Bee with unit variance.
VISION_STD = 0.2
EOS_ID = 7


def tiny_chat_llm_config(**overrides: Any) -> dict[str, Any]:
    """The original CPM-Bee config dict of the tiny chat model (real vocabulary, dim 64, 2 layers, fp32)."""
    return tiny_cpmbee_config(**overrides)


def head_original_state_dict(vision_dim: int, llm_dim: int, query_num: int, seed: int) -> dict[str, torch.Tensor]:
    """`query` and `mapping.*` drawn from one generator in `VLU_CPMBee`'s parameter order.

    Queries are `0.5 * N(0, 1)` (comparable to the image tokens), matrices `N(0, 1) / sqrt(fan_in)` and biases
    `0.1 * N(0, 1)`, so the mapped features have a scale similar to the text embeddings they sit among.
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    return {
        "query": 0.5 * draw(query_num, vision_dim),
        "mapping.0.weight": draw(llm_dim, vision_dim) / math.sqrt(vision_dim),
        "mapping.0.bias": 0.1 * draw(llm_dim),
        "mapping.2.weight": draw(llm_dim, llm_dim) / math.sqrt(llm_dim),
        "mapping.2.bias": 0.1 * draw(llm_dim),
    }


def original_chat_state_dict(
    llm_config: Mapping[str, Any] | None = None,
    vision_config: Mapping[str, int] | Any = None,
    *,
    query_num: int = TINY_CHAT_QUERY_NUM,
    seeds: Mapping[str, int] = TINY_CHAT_SEEDS,
    text_vocab_size: int = TINY_CHAT_TEXT_VOCAB,
    include_mim_head: bool = True,
    eos_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The flat original VisCPM-Chat state dict (fp32 unless `llm_config["half"]`), in `VLU_CPMBee` key order.

    `llm_config` is an original CPM-Bee config dict (default: `tiny_chat_llm_config()`), `vision_config` the BEiT-3
    shape (a dict like `TINY_CHAT_VISION` or a `VisCPMChatVisionConfig`). `eos_scale` multiplies the `</s>` row of
    the CPM-Bee input embedding (hence its output logit): random weights almost never pick one token out of
    86,583, and a larger `</s>` row makes tiny models end some answers early. `include_mim_head=False` leaves out
    the 8192x1024 MIM head (unused at inference) without changing any other tensor.
    """
    llm_config = dict(tiny_chat_llm_config() if llm_config is None else llm_config)
    vision = vision_config if vision_config is not None else TINY_CHAT_VISION
    if isinstance(vision, Mapping):
        vision = SimpleNamespace(**{"num_channels": 3, **vision})
    llm = original_cpmbee_state_dict(llm_config, seeds["llm"])
    llm["input_embedding.weight"][EOS_ID] *= eos_scale
    head = head_original_state_dict(vision.hidden_size, llm_config["dim_model"], query_num, seeds["head"])
    state_dict = {"query": head.pop("query")}
    state_dict.update(
        beit3_original_state_dict(
            vision,
            seed=seeds["vpm"],
            std=VISION_STD,
            text_vocab_size=text_vocab_size,
            include_mim_head=include_mim_head,
        )
    )
    state_dict.update({f"llm.{key}": value for key, value in llm.items()})
    state_dict.update(head)
    dtype = llm["input_embedding.weight"].dtype
    return {key: value.to(dtype) for key, value in state_dict.items()}
