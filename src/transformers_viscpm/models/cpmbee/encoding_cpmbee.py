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
"""CPM-Bee structured input: prompt dicts -> model tensors, and generated answers -> dicts.

A CPM-Bee prompt is a dict such as `{"input": "...", "prompt": "...", "<ans>": ""}`. Every key and every
leaf value becomes a *segment* `<s> tokens </s>` of one flat sequence; the dict tree gives each pair of
segments a relation bucket (`segment_rel`). The leaves under the top-level `"<ans>"` key are the answers
to generate: each becomes a placeholder segment `<s> <ans_N>` (no `</s>`) that is removed from the
prompt and whose segment id tells generation where answer N goes.

This module is the one place of that rule; it reproduces the original VisCPM `_process_list` output
(`convert_data_to_id` + `_convert_to_tensors`) value for value, with these deliberate differences:

- User text is escaped (`tokenizer.escape`) by default: keys and values are text, not markup, so
  `a < b` encodes instead of crashing and `<b>` stays text. Pass `markup=True` for the original's raw
  markup, or wrap single keys/values in `CpmBeeMarkup` (the image slot of VisCPM-Chat is
  `{"image": CpmBeeMarkup("<unk>" * 64)}`, see `image_placeholder`). The top-level `"<ans>"` key and the
  `<ans_N>` placeholders are markup of the format itself.
- The caller's dicts are never modified.
- `image_bound` is per row: the `<unk>` span of every `"image"` leaf of the row's samples (query first),
  after the answer tokens are removed and shifted by the left padding; rows with fewer images get empty
  `[0, 0)` spans. The original keeps only the last sample's bound, unshifted, computed before removing
  the answer tokens (so it is off when `"<ans>"` precedes `"image"`), and an in-context sample replaces
  the query's bound.
- In-context samples keep the order of their answer dicts (the original shuffles them, a training
  augmentation).

A prompt whose answers are all filled in is a *training* sample (the original fine-tuning objective, its
`convert_data_to_id` + `CPMBeeCollater`): the answers stay in place as `<s> tokens` segments (not context), and
`labels` (shifted inside the loss, as for every transformers causal LM) hold the target of each position after a
non-context one: the next token (an ext-table token as `vocab_size + its batch ext index`; a `<s>` as `</s>`), and a
sample that ends in an answer gets a closing `</s>` token whose label is `</s>`. Empty answers keep the prompt a
generation prompt; a batch is one or the other.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from transformers import BatchEncoding

from .structure_cpmbee import PER_TOKEN_KEYS

__all__ = [
    "CpmBeeBatchEncoding",
    "CpmBeeMarkup",
    "CpmBeeSampleInfo",
    "CpmBeeTokenizerLike",
    "encode_structured",
    "image_placeholder",
]

ANSWER_KEY = "<ans>"
IMAGE_KEY = "image"
ROOT_MARKUP = "<root>"
# Relation buckets count tree steps up to this depth (the original's `max_depth`).
MAX_DEPTH = 8


class CpmBeeTokenizerLike(Protocol):
    """What this module needs of a tokenizer (`CpmBeeTokenizer` has it); a protocol, so that the tokenizer module
    can import this one and not the other way round."""

    bos_token_id: int
    eos_token_id: int
    unk_token_id: int
    unk_token: Any
    vocab_size: int

    def escape(self, text: str) -> str: ...

    def encode_markup(
        self, markup: str, past_table: Mapping[int, str] | None = None
    ) -> tuple[list[int], dict[int, str]]: ...

    def convert_tokens_to_ids(self, tokens: str) -> int: ...

    def decode(self, token_ids: list[int], ext_table: Mapping[int, str] | None = None) -> str: ...


# Deepest dict nesting accepted. Relation buckets already saturate at MAX_DEPTH - 1 steps, so deeper levels add no
# information; the bound keeps the encoder's recursion far from Python's limit.
MAX_NESTING = 64
# Most segments (root, keys and leaves) of one dict: `segment_rel` is a dense (n, n) table per sample (the model looks
# relations up by pair), 2048 segments already make it 4M entries (32 MB).
MAX_SEGMENTS = 2048


class CpmBeeMarkup(str):
    """A key or value that is already CPM-Bee markup; the encoder passes it through unescaped."""

    __slots__ = ()


def image_placeholder(num_tokens: int, unk_token: str = "<unk>") -> CpmBeeMarkup:
    """The `"image"` value of a VisCPM prompt: `num_tokens` `<unk>` tokens that vision features replace."""
    return CpmBeeMarkup(unk_token * num_tokens)


@dataclass
class CpmBeeSampleInfo:
    """What generation and answer fill-back need about one sample beside its tensors.

    `predict_segments` lists `(segment_id, answer_id)` for each placeholder in prompt order (answer ids
    count from 1); `answer_placeholders[answer_id - 1]` is the key path of that answer inside the
    sample's `"<ans>"` value (`()` when `"<ans>"` is a plain string); `ext_table` maps the ids a
    generated token can have (vocabulary ids of sub-id 0 specials, `vocab_size + k` for batch ext
    entries) to their text, i.e. the original's `rev_ext_table`.
    """

    predict_segments: list[tuple[int, int]]
    answer_placeholders: list[tuple[str, ...]]
    ext_table: dict[int, str] = field(default_factory=dict)

    def decode_answers(self, tokenizer: CpmBeeTokenizerLike, generated: Iterable[tuple[int, int]]) -> dict[int, str]:
        """Group generated `(token_id, answer_id)` pairs per answer and decode them (trailing `</s>` dropped)."""
        per_answer: dict[int, list[int]] = {}
        for token_id, answer_id in generated:
            per_answer.setdefault(int(answer_id), []).append(int(token_id))
        texts = {}
        for answer_id, token_ids in per_answer.items():
            if token_ids and token_ids[-1] == tokenizer.eos_token_id:
                token_ids = token_ids[:-1]
            texts[answer_id] = tokenizer.decode(token_ids, ext_table=self.ext_table)
        return texts

    def fill_answers(self, data: Mapping[str, Any], answers: Mapping[int, str | None]) -> dict[str, Any]:
        """A deep copy of `data` with each answer placeholder set to `answers[answer_id]` (None if missing)."""
        filled = copy.deepcopy(dict(data))
        for answer_id, path in enumerate(self.answer_placeholders, start=1):
            text = answers.get(answer_id)
            if not path:
                filled[ANSWER_KEY] = text
                continue
            node = filled[ANSWER_KEY]
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = text
        return filled


def _one_row_table(sample_infos: Sequence[CpmBeeSampleInfo]) -> dict[int, str] | None:
    """The table that decodes generated ids of a one-row encoding (a streamer's), None for a batch: there the
    same output id may stand for different text in different rows, so each row decodes with its own
    `sample_infos[i].ext_table`."""
    return dict(sample_infos[0].ext_table) if len(sample_infos) == 1 else None


class CpmBeeBatchEncoding(BatchEncoding):
    """A `BatchEncoding` that also carries what decoding its ids needs, as attributes (not keys: they never reach
    the model as inputs, and `.to(device)` keeps them).

    `ext_table` maps the ext ids (`>= vocab_size`) of a string encoding, or of what a one-row dict encoding
    generates, to their text; pass it to `decode(..., ext_table=...)` and to streamers. `sample_infos` holds the
    `CpmBeeSampleInfo` of every row of a dict encoding (None for strings). The tokenizer keeps no copy: an
    encoding is the only place of its table.
    """

    def __init__(
        self,
        data: Mapping[str, Any] | None = None,
        tensor_type: Any = None,
        *,
        ext_table: Mapping[int, str] | None = None,
        sample_infos: Sequence[CpmBeeSampleInfo] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(data, tensor_type=tensor_type, **kwargs)
        self.ext_table = dict(ext_table) if ext_table is not None else None
        self.sample_infos = list(sample_infos) if sample_infos is not None else None

    @classmethod
    def of_lists(cls, data: dict[str, list], ext_table: dict[int, str]) -> CpmBeeBatchEncoding:
        """The encoding of `data` (lists, nothing to convert), built without `BatchEncoding.__init__`'s tensor
        conversion machinery, which costs a third of the time of encoding a 200-character prompt; `ext_table` is
        taken as is. The same object `CpmBeeBatchEncoding(data, ext_table=ext_table)` builds (tests check)."""
        encoding = cls.__new__(cls)
        encoding.__dict__.update(data=data, _encodings=None, _n_sequences=None, ext_table=ext_table, sample_infos=None)
        return encoding

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "ext_table": self.ext_table, "sample_infos": self.sample_infos}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.ext_table = state.get("ext_table")
        self.sample_infos = state.get("sample_infos")


@dataclass
class _Segment:
    markup: str
    path: tuple[int, ...]  # segment ids from the root down to this segment
    is_answer: bool
    is_image: bool


@dataclass
class _ExtState:
    """Unknown runs / unknown specials met so far in a row and their per-name sub-ids (shared by a row's samples)."""

    table: dict[int, str] = field(default_factory=dict)
    sub_ids: dict[str, dict[int, int]] = field(default_factory=dict)


@dataclass
class _EncodedSample:
    input_ids: list[int]
    input_id_subs: list[int]
    raw_ids: list[int]  # ids before re-id, to recognise the answer placeholders
    context: list[bool]
    segment_ids: list[int]
    segment_rel: list[int]
    num_segments: int
    image_spans: list[tuple[int, int]]  # token ranges of image segments (with <s>, </s>)


def _to_markup(text: Any, tokenizer: CpmBeeTokenizerLike, raw: bool) -> str:
    if not isinstance(text, str):
        raise TypeError(f"CPM-Bee prompt keys and leaf values must be strings, got {type(text).__name__}: {text!r}")
    return text if raw or isinstance(text, CpmBeeMarkup) else tokenizer.escape(text)


def _check_tree(data: Any) -> None:
    """Refuse a prompt the encoder cannot represent: nested deeper than MAX_NESTING, or a dict that contains itself.

    Iterative, so that even a 100,000-level dict gets this `ValueError` rather than a `RecursionError`.
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"a CPM-Bee prompt must be a dict, got {type(data).__name__}")
    stack: list[tuple[Any, int, frozenset[int]]] = [(data, 1, frozenset())]
    while stack:
        value, depth, ancestors = stack.pop()
        if not isinstance(value, Mapping):
            continue
        if id(value) in ancestors:
            raise ValueError("A CPM-Bee prompt dict contains itself (a cycle): it cannot be flattened into segments.")
        if depth > MAX_NESTING:
            raise ValueError(f"A CPM-Bee prompt is nested deeper than {MAX_NESTING} dict levels.")
        inside = ancestors | {id(value)}
        stack.extend((child, depth + 1, inside) for child in value.values())


def _segments(data: Mapping[str, Any], tokenizer: CpmBeeTokenizerLike, markup: bool) -> list[_Segment]:
    """Flatten the dict tree in the original's order: root, then each key followed by its value."""
    segments = [_Segment(ROOT_MARKUP, (0,), False, False)]

    def visit(value: Any, parent: tuple[int, ...], depth: int, is_answer: bool, is_image: bool) -> None:
        if isinstance(value, Mapping):
            for key, child in value.items():
                top_answer = depth == 1 and key == ANSWER_KEY
                key_markup = key if top_answer else _to_markup(key, tokenizer, markup)
                path = (*parent, len(segments))
                segments.append(_Segment(key_markup, path, False, False))
                visit(child, path, depth + 1, is_answer or top_answer, is_image or (depth == 1 and key == IMAGE_KEY))
        else:
            segments.append(
                _Segment(_to_markup(value, tokenizer, markup), (*parent, len(segments)), is_answer, is_image)
            )

    _check_tree(data)
    visit(data, (0,), 1, False, False)
    if len(segments) > MAX_SEGMENTS:
        raise ValueError(
            f"A CPM-Bee prompt has {len(segments)} segments (the root, every key and every leaf); at most "
            f"{MAX_SEGMENTS} are supported, since each sample carries a {MAX_SEGMENTS}x{MAX_SEGMENTS} relation table. "
            "Put long lists into one string value instead of one key each."
        )
    return segments


def _relation_bucket(n_up: int, n_down: int) -> int:
    bucket = n_up * MAX_DEPTH + n_down
    # bucket 1 is reserved for in-context samples
    return bucket + 1 if bucket else 0


def _segment_relations(segments: Sequence[_Segment]) -> list[int]:
    """Flattened (n, n) relation buckets: steps from each segment up to the common ancestor and down again.

    Vectorised over all pairs (the common prefix of two paths grows one tree level at a time), so the cost is
    n * n * depth array operations instead of as many Python steps.
    """
    n = len(segments)
    depths = np.array([len(segment.path) for segment in segments])
    paths = np.full((n, int(depths.max())), -1, dtype=np.int64)
    for i, segment in enumerate(segments):
        paths[i, : len(segment.path)] = segment.path
    common = np.zeros((n, n), dtype=np.int64)
    shared = np.ones((n, n), dtype=bool)
    for level in range(paths.shape[1]):
        column = paths[:, level]
        shared &= (column[:, None] == column[None, :]) & (column[:, None] >= 0)
        common += shared
    up = np.minimum(depths[:, None] - common, MAX_DEPTH - 1)
    down = np.minimum(depths[None, :] - common, MAX_DEPTH - 1)
    bucket = up * MAX_DEPTH + down
    return np.where(bucket > 0, bucket + 1, 0).ravel().tolist()


class _BaseIds(dict):
    """`<name>` -> vocabulary id, looked up on first use (copying the whole vocabulary costs ~7 ms a call)."""

    def __init__(self, tokenizer: CpmBeeTokenizerLike) -> None:
        super().__init__()
        self._tokenizer = tokenizer

    def __missing__(self, name: str) -> int:
        idx = self._tokenizer.convert_tokens_to_ids(name)
        if idx == self._tokenizer.unk_token_id and name != self._tokenizer.unk_token:
            raise KeyError(name)
        self[name] = idx
        return idx


def _encode_sample(
    data: Mapping[str, Any], tokenizer: CpmBeeTokenizerLike, vocab: _BaseIds, state: _ExtState, markup: bool
) -> _EncodedSample:
    """One dict to token ids; unknown runs and unknown specials are re-id'd to their base token plus a sub-id."""
    segments = _segments(data, tokenizer, markup)
    out = _EncodedSample([], [], [], [], [], _segment_relations(segments), len(segments), [])
    for segment_id, segment in enumerate(segments):
        ids, state.table = tokenizer.encode_markup(segment.markup, state.table)
        begin = len(out.input_ids)
        out.input_ids.append(tokenizer.bos_token_id)
        out.input_id_subs.append(0)
        out.raw_ids.append(tokenizer.bos_token_id)
        for token_id in ids:
            out.raw_ids.append(token_id)
            if token_id not in state.table:
                out.input_ids.append(token_id)
                out.input_id_subs.append(0)
                continue
            text = state.table[token_id]
            name = f"<{text[1:-1].split('_', 1)[0]}>" if text.startswith("<") and text.endswith(">") else "<unk>"
            try:
                base_id = vocab[name]
            except KeyError:
                raise ValueError(f"Invalid special token {text!r}: {name} is not in the vocabulary") from None
            subs = state.sub_ids.setdefault(name, {})
            out.input_ids.append(base_id)
            out.input_id_subs.append(subs.setdefault(token_id, len(subs)))
        if not segment.is_answer:
            out.input_ids.append(tokenizer.eos_token_id)
            out.input_id_subs.append(0)
            out.raw_ids.append(tokenizer.eos_token_id)
        end = len(out.input_ids)
        out.context.extend([not segment.is_answer] * (end - begin))
        out.segment_ids.extend([segment_id] * (end - begin))
        if segment.is_image:
            out.image_spans.append((begin, end))
    return out


def _with_placeholders(data: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, ...]]]:
    """A copy of the query whose answer leaves are the placeholders `<ans_1>`, `<ans_2>`, ... (depth first).

    A prompt without `"<ans>"` has nothing to generate and is encoded as is (VisCPM-Paint encodes its
    caption dict that way for the text encoder); generation refuses such a prompt.
    """
    if ANSWER_KEY not in data:
        return dict(data), []
    paths: list[tuple[str, ...]] = []

    def replace(value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, Mapping):
            return {key: replace(child, (*path, key)) for key, child in value.items()}
        paths.append(path)
        return CpmBeeMarkup(f"<ans_{len(paths)}>")

    query = dict(data)
    query[ANSWER_KEY] = replace(data[ANSWER_KEY], ())
    if not paths:
        raise ValueError(f"No answer to predict: the {ANSWER_KEY!r} value has no leaf: {data[ANSWER_KEY]!r}")
    return query, paths


@dataclass
class _Row:
    input_ids: list[int]
    input_id_subs: list[int]
    context: list[bool]
    sample_ids: list[int]
    num_segments: list[int]
    segment_ids: list[int]
    segment_rel_offset: list[int]
    segment_rel: list[int]
    image_bound: list[tuple[int, int]]
    # Training rows: per position, the `(id, sub)` of its label (shifted convention) or None.
    labels: list[tuple[int, int] | None] = field(default_factory=list)


def _answer_leaves(value: Any) -> list[Any]:
    if isinstance(value, Mapping):
        return [leaf for child in value.values() for leaf in _answer_leaves(child)]
    return [value]


def _is_training_sample(data: Mapping[str, Any]) -> bool:
    """True when every answer of `data` is filled in, False when every answer is empty (a generation prompt)."""
    _check_tree(data)  # the first walk of a prompt: refuse cycles and over-deep nesting before recursing
    if ANSWER_KEY not in data:
        return False
    leaves = _answer_leaves(data[ANSWER_KEY])
    filled = [leaf != "" for leaf in leaves]
    if any(filled) and not all(filled):
        raise ValueError(
            f"Some answers of {data[ANSWER_KEY]!r} are filled and some are empty: fill all of them (a training "
            "sample) or none (a generation prompt)."
        )
    return bool(leaves) and all(filled)


def _encode_training_row(
    data: Mapping[str, Any], tokenizer: CpmBeeTokenizerLike, vocab: _BaseIds, max_length: int | None, markup: bool
) -> tuple[_Row, _ExtState]:
    """A prompt with its answers in place, and the label of every position (see the module docstring)."""
    state = _ExtState()
    sample = _encode_sample(data, tokenizer, vocab, state, markup)
    length = len(sample.input_ids)
    row = _Row(
        list(sample.input_ids),
        list(sample.input_id_subs),
        list(sample.context),
        [0] * length,
        [sample.num_segments] * length,
        list(sample.segment_ids),
        [0] * length,
        list(sample.segment_rel),
        [(begin + 1, end - 1) for begin, end in sample.image_spans],
        [None] * length,
    )
    for j in range(1, length):
        if not row.context[j - 1]:
            token = (row.input_ids[j], row.input_id_subs[j])
            row.labels[j] = (tokenizer.eos_token_id, 0) if token[0] == tokenizer.bos_token_id else token
    if not row.context[-1]:
        # The closing `</s>` of the last answer: its own output is never a target.
        closing = {"input_ids": tokenizer.eos_token_id, "input_id_subs": 0, "context": False}
        for name in PER_TOKEN_KEYS:  # the rest of the token's structure repeats the last answer token's
            column = getattr(row, name, None)
            if column is not None:
                column.append(closing.get(name, column[-1]))
        row.labels.append((tokenizer.eos_token_id, 0))
    if max_length is not None and len(row.input_ids) > max_length:
        raise ValueError(f"A training sample has {len(row.input_ids)} tokens, more than max_length={max_length}.")
    return row, state


def _encode_row(
    data: Mapping[str, Any],
    in_context_samples: Sequence[Mapping[str, Any]],
    tokenizer: CpmBeeTokenizerLike,
    vocab: _BaseIds,
    max_length: int | None,
    markup: bool,
) -> tuple[_Row, list[tuple[int, int]], list[tuple[str, ...]], _ExtState]:
    """The original `_convert_to_tensors`: the query without its answer tokens, then the in-context samples."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    query, placeholders = _with_placeholders(data)
    state = _ExtState()
    sample = _encode_sample(query, tokenizer, vocab, state, markup)
    kept = len(sample.input_ids) if max_length is None else min(max_length, len(sample.input_ids))
    if kept < len(sample.input_ids):
        warnings.warn(
            f"max_length={max_length} cuts the CPM-Bee prompt from {len(sample.input_ids)} tokens to {kept}"
            " (the original's max_inp_length); the rest of the prompt is dropped.",
            UserWarning,
            stacklevel=3,
        )
    placeholder_number = {f"<ans_{number}>": number for number in range(1, len(placeholders) + 1)}
    answer_id = {
        token_id: placeholder_number[text] for token_id, text in state.table.items() if text in placeholder_number
    }

    row = _Row([], [], [], [], [], [], [], list(sample.segment_rel), [])
    predict_segments: list[tuple[int, int]] = []
    new_position: dict[int, int] = {}
    for i in range(kept):
        if not sample.context[i]:
            if sample.input_ids[i] == vocab[ANSWER_KEY]:
                predict_segments.append((sample.segment_ids[i], answer_id[sample.raw_ids[i]]))
            continue
        new_position[i] = len(row.input_ids)
        row.input_ids.append(sample.input_ids[i])
        row.input_id_subs.append(sample.input_id_subs[i])
        row.segment_ids.append(sample.segment_ids[i])
    if placeholders and not predict_segments:
        raise ValueError(f"No answer to predict: max_length={max_length} cuts off every {ANSWER_KEY} placeholder")
    for begin, end in sample.image_spans:
        if end > kept:
            raise ValueError(f"max_length={max_length} cuts into the {IMAGE_KEY!r} segment")
        row.image_bound.append((new_position[begin] + 1, new_position[end - 1]))
    length = len(row.input_ids)
    row.context = [True] * length
    row.sample_ids = [0] * length
    row.num_segments = [sample.num_segments] * length
    row.segment_rel_offset = [0] * length

    for index, example in enumerate(in_context_samples, start=1):
        encoded = _encode_sample(example, tokenizer, vocab, state, markup)
        offset = len(row.input_ids)
        count = len(encoded.input_ids)
        row.image_bound.extend((offset + begin + 1, offset + end - 1) for begin, end in encoded.image_spans)
        row.input_ids.extend(encoded.input_ids)
        row.input_id_subs.extend(encoded.input_id_subs)
        row.segment_ids.extend(encoded.segment_ids)
        row.context.extend([True] * count)
        row.sample_ids.extend([index] * count)
        row.num_segments.extend([encoded.num_segments] * count)
        row.segment_rel_offset.extend([len(row.segment_rel)] * count)
        row.segment_rel.extend(encoded.segment_rel)
    return row, predict_segments, placeholders, state


def encode_structured(
    tokenizer: CpmBeeTokenizerLike,
    data_list: Sequence[Mapping[str, Any]],
    *,
    in_context_samples: Sequence[Mapping[str, Any]] | None = None,
    max_length: int | None = None,
    return_tensors: str | None = "pt",
    markup: bool = False,
) -> tuple[CpmBeeBatchEncoding, list[CpmBeeSampleInfo]]:
    """Encode CPM-Bee prompt dicts into a left-padded batch (see DESIGN.md for every tensor).

    Args:
        tokenizer: a `CpmBeeTokenizer` (anything with what `CpmBeeTokenizerLike` lists).
        data_list: one prompt dict per row; each needs a top-level `"<ans>"` (a string or a nested dict of
            strings whose leaves are the answers to generate). Rows whose answers are all filled in are training
            samples: the encoding then also holds `labels` (module docstring).
        in_context_samples: solved examples (their `"<ans>"` values filled in) appended to every row as
            samples 1, 2, ...; they share the row's ext table.
        max_length: keep only the first `max_length` tokens of each query before its answer tokens are
            removed (the original `max_inp_length`); in-context samples are not cut. A longer training sample
            raises.
        return_tensors: `"pt"`, `"np"` or None (lists).
        markup: treat every key and value as CPM-Bee markup (the original's behaviour) instead of text.

    Returns:
        The `CpmBeeBatchEncoding` (its `sample_infos` and `ext_table` set) and one `CpmBeeSampleInfo` per row.
    """
    if not data_list:
        raise ValueError("data_list is empty")
    vocab = _BaseIds(tokenizer)
    samples = list(in_context_samples or [])
    rows: list[_Row] = []
    infos: list[CpmBeeSampleInfo] = []
    batch_ext: dict[tuple[int, int], int] = {}
    training = [_is_training_sample(data) for data in data_list]
    if any(training) and not all(training):
        raise ValueError("A batch mixes training samples (answers filled in) and generation prompts (empty answers).")
    training = all(training)
    if training and samples:
        raise ValueError("in_context_samples are for generation prompts, not for training samples.")
    for data in data_list:
        if training:
            row, state = _encode_training_row(data, tokenizer, vocab, max_length, markup)
            predict_segments, placeholders = [], []
        else:
            row, predict_segments, placeholders, state = _encode_row(
                data, samples, tokenizer, vocab, max_length, markup
            )
        output_table: dict[int, str] = {}
        for name, subs in state.sub_ids.items():
            if name == ANSWER_KEY:
                continue
            for token_id, sub in subs.items():
                if sub == 0:
                    output_table[vocab[name]] = state.table[token_id]
                    continue
                output_id = batch_ext.setdefault((vocab[name], sub), tokenizer.vocab_size + len(batch_ext))
                output_table[output_id] = state.table[token_id]
        rows.append(row)
        infos.append(CpmBeeSampleInfo(predict_segments, placeholders, output_table))

    if training and not batch_ext:
        # The original collator's placeholder entry for an empty ext table: its logit is part of the softmax.
        batch_ext[(tokenizer.pad_token_id, 1)] = tokenizer.vocab_size
    batch_size = len(rows)
    length = max(len(row.input_ids) for row in rows)
    rel_length = max(len(row.segment_rel) for row in rows)
    max_answers = max(len(info.predict_segments) for info in infos)
    max_images = max(len(row.image_bound) for row in rows)
    ext_ids = np.array([token_id for token_id, _ in batch_ext], dtype=np.int64)
    ext_subs = np.array([sub for _, sub in batch_ext], dtype=np.int64)

    # Per-token tensors a row carries as lists; `position_ids` and `attention_mask` are derived below.
    row_fields = {f.name for f in dataclasses.fields(_Row)}
    columns = [name for name in PER_TOKEN_KEYS if name in row_fields]
    arrays = {
        name: np.zeros((batch_size, length), dtype=bool if name == "context" else np.int64) for name in PER_TOKEN_KEYS
    }
    arrays["segment_rel"] = np.zeros((batch_size, rel_length), dtype=np.int64)
    arrays["ext_table_ids"] = np.tile(ext_ids, (batch_size, 1))
    arrays["ext_table_sub"] = np.tile(ext_subs, (batch_size, 1))
    arrays["ext_table_mask"] = np.zeros((batch_size, len(batch_ext)), dtype=bool)
    arrays["allow_unk"] = np.zeros((batch_size,), dtype=bool)
    arrays["answer_segment_ids"] = np.full((batch_size, max_answers), -1, dtype=np.int64)
    if any(IMAGE_KEY in data for data in data_list):
        arrays["image_bound"] = np.zeros((batch_size, max_images, 2), dtype=np.int64)
    if training:
        arrays["labels"] = np.full((batch_size, length), -100, dtype=np.int64)

    for b, (row, info) in enumerate(zip(rows, infos)):
        n = len(row.input_ids)
        pad = length - n
        for name in columns:
            arrays[name][b, pad:] = getattr(row, name)
        arrays["position_ids"][b, pad:] = np.arange(n)
        arrays["attention_mask"][b, pad:] = 1
        arrays["segment_rel"][b, : len(row.segment_rel)] = row.segment_rel
        for output_id in info.ext_table:
            if output_id >= tokenizer.vocab_size:
                arrays["ext_table_mask"][b, output_id - tokenizer.vocab_size] = True
        arrays["allow_unk"][b] = tokenizer.unk_token_id in info.ext_table
        arrays["answer_segment_ids"][b, : len(info.predict_segments)] = [seg for seg, _ in info.predict_segments]
        if "image_bound" in arrays and row.image_bound:
            arrays["image_bound"][b, : len(row.image_bound)] = np.array(row.image_bound) + pad
        for j, label in enumerate(row.labels):
            if label is not None:
                token_id, sub = label
                arrays["labels"][b, pad + j] = batch_ext[label] if sub else token_id

    data = {name: array.tolist() for name, array in arrays.items()} if return_tensors is None else arrays
    encoding = CpmBeeBatchEncoding(
        data, tensor_type=return_tensors, ext_table=_one_row_table(infos), sample_infos=infos
    )
    return encoding, infos
