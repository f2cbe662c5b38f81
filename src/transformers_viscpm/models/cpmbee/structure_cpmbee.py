# Copyright 2025 The transformers-viscpm developers. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The one declaration of CPM-Bee's structured input (DESIGN.md's table), as typed keyword arguments.

A structured CPM-Bee encoding is `input_ids`, `attention_mask` and `position_ids` (the stock names, stock
arguments everywhere; `position_ids` are the original's `input_pos`, 0.. per sample) plus the tensors declared here. Every forward takes them as `**kwargs: Unpack[...]` of these types, the way
transformers types its own `TransformersKwargs`; beam expansion, the Paint text encoder and the processors' input
names read the key tuples below, which are derived from the declarations and written nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

import torch

__all__ = [
    "CHAT_KEYS",
    "EXT_TABLE_KEYS",
    "GENERATION_KEYS",
    "INPUT_KEYS",
    "PER_TOKEN_KEYS",
    "SEEN_TOKEN_KEYS",
    "STOCK_KEYS",
    "STRUCTURE_KEYS",
    "CpmBeeExtTableKwargs",
    "CpmBeeGenerationKwargs",
    "CpmBeeInputKwargs",
    "CpmBeeStructureKwargs",
    "CpmBeeTokenStructureKwargs",
    "VisCPMChatImageKwargs",
    "pop_keys",
    "select_keys",
]


class CpmBeeTokenStructureKwargs(TypedDict, total=False):
    """Per-token structure `(B, K)` of every token the queries can see, cached ones first (like `attention_mask`)."""

    context: torch.BoolTensor
    sample_ids: torch.LongTensor
    num_segments: torch.LongTensor
    segment_ids: torch.LongTensor
    segment_rel_offset: torch.LongTensor


class CpmBeeStructureKwargs(CpmBeeTokenStructureKwargs, total=False):
    """What the transformer needs besides the stock `input_ids` / `attention_mask` / `position_ids`: the token structure, plus `input_id_subs`
    `(B, q)` (the sub-id rotating each current token's embedding) and `segment_rel` `(B, R)` (the flattened
    segment-relation buckets)."""

    input_id_subs: torch.LongTensor
    segment_rel: torch.LongTensor


class CpmBeeExtTableKwargs(TypedDict, total=False):
    """The batch ext table `(B, E)` (same row per sample, so that beam expansion works): its logits follow the
    vocabulary's, and a generated ext id `vocab_size + k` is fed back as `(ext_table_ids[k], ext_table_sub[k])`."""

    ext_table_ids: torch.LongTensor
    ext_table_sub: torch.LongTensor


class CpmBeeGenerationKwargs(TypedDict, total=False):
    """Generation-only inputs; they never change the logits. `ext_table_mask` `(B, E)` / `allow_unk` `(B,)` drive
    the original's `<unk>` / foreign-ext masking; `answer_segment_ids` `(B, A)` are the `<ans>` segments to fill."""

    ext_table_mask: torch.BoolTensor
    allow_unk: torch.BoolTensor
    answer_segment_ids: torch.LongTensor


class CpmBeeInputKwargs(CpmBeeStructureKwargs, CpmBeeExtTableKwargs, CpmBeeGenerationKwargs, total=False):
    """Every tensor of a CPM-Bee structured encoding besides the stock `input_ids`, `attention_mask` and
    `position_ids`."""


class VisCPMChatImageKwargs(TypedDict, total=False):
    """VisCPM-Chat's image inputs: `image_bound` `(B, N, 2)` ([start, end) of each `"image"` segment), and either
    `pixel_values` or the mapped query features `vision_hidden_states` of an earlier turn."""

    image_bound: torch.LongTensor
    pixel_values: torch.FloatTensor
    vision_hidden_states: torch.FloatTensor


def _keys(declaration: type) -> tuple[str, ...]:
    return tuple(declaration.__annotations__)


STRUCTURE_KEYS = _keys(CpmBeeStructureKwargs)
# Per-token tensors over every token seen (`(B, K)`, cached first), `attention_mask` included: decoding extends them.
SEEN_TOKEN_KEYS = ("position_ids", *_keys(CpmBeeTokenStructureKwargs), "attention_mask")
# Every `(B, L)` tensor of an encoding, ids included; each is 0 / False on left padding.
PER_TOKEN_KEYS = ("input_ids", "input_id_subs", *SEEN_TOKEN_KEYS)
EXT_TABLE_KEYS = _keys(CpmBeeExtTableKwargs)
GENERATION_KEYS = _keys(CpmBeeGenerationKwargs)
# The stock inputs of an encoding, explicit arguments of every forward.
STOCK_KEYS = ("input_ids", "attention_mask", "position_ids")
# Everything `encode_structured` returns: the stock inputs, then the declared tensors.
INPUT_KEYS = (*STOCK_KEYS, *_keys(CpmBeeInputKwargs))
CHAT_KEYS = _keys(VisCPMChatImageKwargs)


def pop_keys(kwargs: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """Remove `keys` from `kwargs` and return those that were given (not None)."""
    taken = {key: kwargs.pop(key, None) for key in keys}
    return {key: value for key, value in taken.items() if value is not None}


def select_keys(inputs: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The entries of `inputs` named in `keys` that are present and not None."""
    return {key: inputs[key] for key in keys if inputs.get(key) is not None}
