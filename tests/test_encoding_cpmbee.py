"""Structured CPM-Bee input: parity with the original `_process_list`, escaping, fill-back, properties."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transformers_viscpm.models.cpmbee.encoding_cpmbee import (
    CpmBeeMarkup,
    CpmBeeSampleInfo,
    encode_structured,
    image_placeholder,
)
from transformers_viscpm.models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer

CASES = json.loads((Path(__file__).parent / "fixtures" / "encoding_cases.json").read_text(encoding="utf-8"))
CASE_IDS = [case["name"] for case in CASES]
VOCAB_SIZE = 86583

# our key -> the original `_process_list` key
ORIGINAL_NAMES = {
    "input_ids": "input_ids",
    "input_id_subs": "input_id_subs",
    "position_ids": "input_pos",
    "context": "context",
    "sample_ids": "sample_idx",
    "num_segments": "num_segments",
    "segment_ids": "segment_ids",
    "segment_rel_offset": "segment_rel_offset",
    "segment_rel": "segment_rel",
}


@pytest.fixture(scope="module")
def tokenizer() -> CpmBeeTokenizer:
    return CpmBeeTokenizer()


def _with_markup(value: Any, path: list[str], markup_paths: list[list[str]]) -> Any:
    """The user's dict: values at `markup_paths` (the image slot) are marked as markup."""
    if isinstance(value, dict):
        return {k: _with_markup(v, [*path, k], markup_paths) for k, v in value.items()}
    return CpmBeeMarkup(value) if path in markup_paths else value


def _encode_case(tokenizer: CpmBeeTokenizer, case: dict[str, Any], **kwargs: Any):
    data = [_with_markup(d, [], case["markup_paths"]) for d in case["data"]]
    return encode_structured(
        tokenizer,
        data,
        in_context_samples=case["in_context"],
        max_length=case["max_length"],
        markup=case["markup"],
        **kwargs,
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_original(tokenizer: CpmBeeTokenizer, case: dict[str, Any]) -> None:
    before = copy.deepcopy(case)
    encoding, infos = _encode_case(tokenizer, case)
    expected = case["expected"]
    assert case == before  # the caller's dicts (query and in-context samples) are left alone

    for ours, original in ORIGINAL_NAMES.items():
        assert encoding[ours].tolist() == [
            [bool(x) if ours == "context" else x for x in row] for row in expected[original]
        ], ours
    batch_size, length = encoding["input_ids"].shape
    assert encoding["input_ids"].dtype == torch.long
    assert encoding["context"].dtype == torch.bool
    assert encoding["attention_mask"].tolist() == [[int(n != 0) for n in row] for row in expected["num_segments"]]
    assert encoding["ext_table_ids"].tolist() == [expected["batch_ext_table_ids"]] * batch_size
    assert encoding["ext_table_sub"].tolist() == [expected["batch_ext_table_sub"]] * batch_size

    num_ext = len(expected["batch_ext_table_ids"])
    for b, (info, other) in enumerate(zip(infos, case["other_info"])):
        assert info.predict_segments == [tuple(p) for p in other["predict_segments"]]
        # the original's paths are its (pre-escaped) keys; ours are the user's keys
        unescape = (lambda k: k) if case["markup"] else (lambda k: k.replace("<<", "<"))
        assert info.answer_placeholders == [tuple(map(unescape, p)) for p in other["answer_placeholders"]]
        assert info.ext_table == {int(k): v for k, v in other["ext_table"].items()}
        # generation masks: what the original's beam search derives from the same table
        assert encoding["ext_table_mask"][b].tolist() == [VOCAB_SIZE + e in info.ext_table for e in range(num_ext)]
        assert bool(encoding["allow_unk"][b]) == (tokenizer.unk_token_id in info.ext_table)
        answers = [seg for seg, _ in other["predict_segments"]]
        assert encoding["answer_segment_ids"][b].tolist() == answers + [-1] * (
            encoding["answer_segment_ids"].shape[1] - len(answers)
        )


@pytest.mark.parametrize("case", [c for c in CASES if c["markup_paths"]], ids=lambda c: c["name"])
def test_image_bound(tokenizer: CpmBeeTokenizer, case: dict[str, Any]) -> None:
    encoding, _ = _encode_case(tokenizer, case)
    bounds = encoding["image_bound"]
    length = encoding["input_ids"].shape[1]
    for b, original in enumerate(case["per_sample_image_bound"]):
        pad = length - int(encoding["attention_mask"][b].sum())
        (start, end), (orig_start, orig_end) = bounds[b, 0].tolist(), original[0]
        ids = encoding["input_ids"][b]
        # the span is exactly the image slot's <unk> tokens, between its <s> and </s>
        assert ids[start:end].tolist() == [tokenizer.unk_token_id] * (end - start)
        assert (ids[start - 1].item(), ids[end].item()) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
        if case["name"] == "answer_before_image":
            # the original counts the 2 answer tokens (<s> <ans>) that it removed from the prompt
            assert (start + 2, end + 2) == (orig_start, orig_end)
        else:
            assert (start - pad, end - pad) == (orig_start, orig_end)
    if len(case["data"]) == 1 and case["name"] != "answer_before_image":
        assert bounds.tolist() == case["expected"]["image_bound"]


def test_escaped_text_equals_original_on_escaped_markup(tokenizer: CpmBeeTokenizer) -> None:
    case = next(c for c in CASES if c["name"] == "user_text_tags")
    escaped, _ = encode_structured(tokenizer, case["data"])
    raw, _ = encode_structured(tokenizer, case["original_input"], markup=True)
    for key in escaped:
        assert torch.equal(escaped[key], raw[key]), key


def test_markup_errors(tokenizer: CpmBeeTokenizer) -> None:
    with pytest.raises(ValueError):
        encode_structured(tokenizer, [{"input": "a < b", "<ans>": ""}], markup=True)
    with pytest.raises(ValueError, match="<foo_1>"):
        encode_structured(tokenizer, [{"input": "<foo_1>", "<ans>": ""}], markup=True)
    # the same text as plain text is fine, and `<foo_1>` stays ordinary tokens
    encoding, infos = encode_structured(tokenizer, [{"input": "a < b <foo_1>", "<ans>": ""}])
    assert int(encoding["input_id_subs"].sum()) == 0 and infos[0].ext_table == {}


def test_input_errors(tokenizer: CpmBeeTokenizer) -> None:
    encoding, infos = encode_structured(tokenizer, [{"input": "no answer key"}])  # an encoder-only prompt
    assert encoding["answer_segment_ids"].shape == (1, 0) and infos[0].predict_segments == []
    assert bool(encoding["context"].all())
    with pytest.raises(TypeError, match="strings"):
        encode_structured(tokenizer, [{"input": 3, "<ans>": ""}])
    with pytest.raises(ValueError, match="No answer to predict"):
        encode_structured(tokenizer, [{"input": "the answer is cut off", "<ans>": ""}], max_length=5)
    with pytest.raises(ValueError, match="no leaf"):
        encode_structured(tokenizer, [{"input": "x", "<ans>": {}}])
    with pytest.raises(ValueError, match="image"):
        data = {"<ans>": "", "image": image_placeholder(8)}
        encode_structured(tokenizer, [data], max_length=12)
    with pytest.raises(ValueError, match="empty"):
        encode_structured(tokenizer, [])


def test_image_placeholder_is_unk_tokens(tokenizer: CpmBeeTokenizer) -> None:
    data = {"image": image_placeholder(64), "context": "", "question": "<unk> is text here", "<ans>": ""}
    encoding, infos = encode_structured(tokenizer, [data])
    start, end = encoding["image_bound"][0, 0].tolist()
    assert end - start == 64
    assert int((encoding["input_ids"][0] == tokenizer.unk_token_id).sum()) == 64  # the question's <unk> is text
    assert not bool(encoding["allow_unk"][0]) and infos[0].ext_table == {}


def test_batch_without_image_key_has_no_image_bound(tokenizer: CpmBeeTokenizer) -> None:
    encoding, _ = encode_structured(tokenizer, [{"input": "x", "<ans>": ""}])
    assert "image_bound" not in encoding
    mixed, _ = encode_structured(
        tokenizer, [{"input": "x", "<ans>": ""}, {"image": image_placeholder(3), "q": "y", "<ans>": ""}]
    )
    assert mixed["image_bound"].shape == (2, 1, 2)
    assert mixed["image_bound"][0].tolist() == [[0, 0]]  # no image in row 0: an empty span


def test_return_types(tokenizer: CpmBeeTokenizer) -> None:
    data = [{"input": "hello", "<ans>": ""}, {"input": "a longer hello 🍕 😀", "<ans>": {"a": "", "b": ""}}]
    pt, _ = encode_structured(tokenizer, data)
    as_np, _ = encode_structured(tokenizer, data, return_tensors="np")
    as_list, _ = encode_structured(tokenizer, data, return_tensors=None)
    for key in pt:
        assert isinstance(as_np[key], np.ndarray)
        assert as_np[key].tolist() == pt[key].tolist() == as_list[key], key
    assert pt["ext_table_ids"].shape == (2, 1) and pt["ext_table_ids"].tolist() == [[1], [1]]
    assert pt["ext_table_mask"].tolist() == [[False], [True]]
    assert pt["allow_unk"].tolist() == [False, True]
    assert pt["answer_segment_ids"].tolist() == [[4, -1], [5, 7]]


def test_fill_answers() -> None:
    info = CpmBeeSampleInfo(
        predict_segments=[(5, 1), (8, 2), (10, 3)],
        answer_placeholders=[("name",), ("info", "age"), ("info", "city")],
    )
    data = {"input": "Tom, 12, Paris", "<ans>": {"name": "", "info": {"age": "", "city": ""}}}
    before = copy.deepcopy(data)
    filled = info.fill_answers(data, {1: "Tom", 3: "Paris"})
    assert filled == {"input": "Tom, 12, Paris", "<ans>": {"name": "Tom", "info": {"age": None, "city": "Paris"}}}
    assert data == before
    single = CpmBeeSampleInfo(predict_segments=[(4, 1)], answer_placeholders=[()])
    assert single.fill_answers({"q": "hi", "<ans>": ""}, {1: "hello"}) == {"q": "hi", "<ans>": "hello"}
    assert single.fill_answers({"q": "hi", "<ans>": ""}, {}) == {"q": "hi", "<ans>": None}


def test_decode_answers(tokenizer: CpmBeeTokenizer) -> None:
    data = {"input": "I love 🍕 and 😀", "<ans>": {"food": "", "face": ""}}
    _, (info,) = encode_structured(tokenizer, [data])
    assert info.ext_table == {tokenizer.unk_token_id: "🍕", VOCAB_SIZE: "😀"}
    eos = tokenizer.eos_token_id
    love, _ = tokenizer.encode_markup(" love <<")
    generated = [(tokenizer.unk_token_id, 1), *[(t, 1) for t in love], (eos, 1), (VOCAB_SIZE, 2), (eos, 2)]
    answers = info.decode_answers(tokenizer, generated)
    assert answers == {1: "🍕 love <", 2: "😀"}
    assert info.fill_answers(data, answers)["<ans>"] == {"food": "🍕 love <", "face": "😀"}


def test_in_context_shares_ext_table(tokenizer: CpmBeeTokenizer) -> None:
    case = next(c for c in CASES if c["name"] == "in_context_shared_oov")
    encoding, (info,) = _encode_case(tokenizer, case)
    assert encoding["sample_ids"][0].unique().tolist() == [0, 1]
    # 🍕 is met first in the query, so it is <unk> sub 0 in the in-context sample too
    assert info.ext_table[tokenizer.unk_token_id] == "🍕"


# --- properties ---------------------------------------------------------------------------------------

_text = st.text(alphabet=st.sampled_from(list("ab <>_x\n 中文🍕😀𠀀")) | st.characters(codec="utf-8"), max_size=12)
_leaf_tree = st.recursive(_text, lambda kids: st.dictionaries(_text, kids, min_size=1, max_size=3), max_leaves=6)


@st.composite
def _prompts(draw: st.DrawFn) -> dict[str, Any]:
    data = draw(st.dictionaries(_text.filter(lambda k: k not in ("<ans>", "image")), _leaf_tree, max_size=4))
    data["<ans>"] = draw(_leaf_tree)
    return data


def _leaf_paths(tree: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _leaf_paths(v, (*path, k))]
    return [path]


def _count_segments(tree: Any) -> int:
    if isinstance(tree, dict):
        return sum(1 + _count_segments(v) for v in tree.values())
    return 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_prompts(), min_size=1, max_size=3))
def test_property_shapes_and_fill_back(tokenizer: CpmBeeTokenizer, batch: list[dict[str, Any]]) -> None:
    before = copy.deepcopy(batch)
    encoding, infos = encode_structured(tokenizer, batch)
    assert batch == before
    batch_size, length = encoding["input_ids"].shape
    assert batch_size == len(batch)
    for key in ("input_id_subs", "position_ids", "context", "sample_ids", "num_segments", "segment_ids"):
        assert encoding[key].shape == (batch_size, length), key
    lengths = encoding["attention_mask"].sum(-1)
    assert lengths.max().item() == length
    assert torch.equal(encoding["context"], encoding["attention_mask"].bool())
    assert torch.equal(encoding["num_segments"] != 0, encoding["attention_mask"].bool())
    num_ext = encoding["ext_table_ids"].shape[1]
    assert encoding["ext_table_mask"].shape == encoding["ext_table_sub"].shape == (batch_size, num_ext)
    assert bool((encoding["input_ids"] < VOCAB_SIZE).all())
    for b, (data, info) in enumerate(zip(batch, infos)):
        n = int(lengths[b])
        row = slice(length - n, length)
        n_segments = 1 + _count_segments(data)
        assert encoding["num_segments"][b, row].unique().tolist() == [n_segments]
        assert encoding["position_ids"][b, row].tolist() == list(range(n))
        assert int(encoding["segment_ids"][b, row].max()) < n_segments
        assert encoding["segment_rel"].shape[1] >= n_segments**2
        assert bool((encoding["segment_rel"][b, n_segments**2 :] == 0).all())
        # every token's relation to itself is bucket 0; segments are <s>-started runs
        rel = encoding["segment_rel"][b, : n_segments**2].view(n_segments, n_segments)
        assert rel.diagonal().abs().sum().item() == 0 and torch.equal(rel != 0, rel.T != 0)
        paths = _leaf_paths(data["<ans>"])
        assert info.answer_placeholders == paths
        assert [a for _, a in info.predict_segments] == list(range(1, len(paths) + 1))
        answers_row = encoding["answer_segment_ids"][b]
        assert answers_row[: len(paths)].tolist() == [s for s, _ in info.predict_segments]
        assert bool((answers_row[len(paths) :] == -1).all())
        assert set(encoding["segment_ids"][b, row].tolist()).isdisjoint(answers_row.tolist())
        texts = {i: f"answer {i}" for i in range(1, len(paths) + 1)}
        filled = info.fill_answers(data, texts)
        for i, path in enumerate(paths, start=1):
            node = filled["<ans>"]
            for part in path:
                node = node[part]
            assert node == f"answer {i}"
        assert {k: v for k, v in filled.items() if k != "<ans>"} == {k: v for k, v in data.items() if k != "<ans>"}


# --- inputs the encoder cannot represent ---------------------------------------------------------------------------


def _nested(depth: int) -> dict[str, Any]:
    data: dict[str, Any] = {"x": "leaf"}
    for _ in range(depth - 1):
        data = {"k": data}
    return data


def test_nesting_bound_and_cycles_are_value_errors(tokenizer: CpmBeeTokenizer) -> None:
    from transformers_viscpm.models.cpmbee.encoding_cpmbee import MAX_NESTING

    encode_structured(tokenizer, [{**_nested(MAX_NESTING), "<ans>": ""}])  # the deepest accepted
    for depth in (MAX_NESTING + 1, 2_000, 100_000):
        with pytest.raises(ValueError, match=f"nested deeper than {MAX_NESTING}"):
            encode_structured(tokenizer, [{**_nested(depth), "<ans>": ""}])
    with pytest.raises(ValueError, match="nested deeper"):
        encode_structured(tokenizer, [{"<ans>": _nested(100_000)}])
    with pytest.raises(ValueError, match="nested deeper"):
        encode_structured(tokenizer, [{"q": "x", "<ans>": ""}], in_context_samples=[{**_nested(5_000), "<ans>": "a"}])
    cyclic: dict[str, Any] = {"q": "x", "<ans>": ""}
    cyclic["self"] = cyclic
    inner: dict[str, Any] = {"a": "b"}
    inner["loop"] = {"back": inner}
    for data in (cyclic, {"q": inner, "<ans>": ""}, {"q": "x", "<ans>": {"a": inner}}):
        with pytest.raises(ValueError, match="contains itself"):
            encode_structured(tokenizer, [data])
    for not_a_dict in ("hi", ["a"], None):
        with pytest.raises(TypeError, match="a CPM-Bee prompt must be a dict"):
            encode_structured(tokenizer, [not_a_dict])
    shared = {"a": "b"}  # the same dict twice is a tree, not a cycle
    encode_structured(tokenizer, [{"x": shared, "y": shared, "<ans>": ""}])


def test_too_many_segments_is_a_value_error_at_once(tokenizer: CpmBeeTokenizer) -> None:
    import time

    from transformers_viscpm.models.cpmbee.encoding_cpmbee import MAX_SEGMENTS

    keys = (MAX_SEGMENTS - 3) // 2  # root + keys + leaves + the "<ans>" key and leaf
    fits = {f"k{i}": "v" for i in range(keys)} | {"<ans>": ""}
    encoding, _ = encode_structured(tokenizer, [fits], return_tensors="np")
    assert encoding["num_segments"].max() == MAX_SEGMENTS - 1
    start = time.perf_counter()
    for count in (keys + 1, 10_000):
        with pytest.raises(ValueError, match=f"at most {MAX_SEGMENTS} are supported"):
            encode_structured(tokenizer, [{f"k{i}": "v" for i in range(count)} | {"<ans>": ""}])
    assert time.perf_counter() - start < 30  # was > 150 s for 10,000 keys


def test_truncation_by_max_length_warns(tokenizer: CpmBeeTokenizer) -> None:
    data = {"<ans>": "", "input": "长文本 " * 2_000}
    with pytest.warns(UserWarning, match=r"max_length=48 cuts the CPM-Bee prompt from \d+ tokens to 48"):
        encoding, _ = encode_structured(tokenizer, [data], max_length=48)
    assert encoding["input_ids"].shape[1] <= 48
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_structured(tokenizer, [{"input": "short", "<ans>": ""}], max_length=48)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="max_length must be a positive int"):
            encode_structured(tokenizer, [data], max_length=bad)


def _reference_relations(data: dict[str, Any]) -> list[int]:
    """The original's pairwise loop (`_segment_relations` before vectorising), as the oracle."""
    paths: list[tuple[int, ...]] = [(0,)]

    def visit(value: Any, parent: tuple[int, ...]) -> None:
        if isinstance(value, dict):
            for child in value.values():
                path = (*parent, len(paths))
                paths.append(path)
                visit(child, path)
        else:
            paths.append((*parent, len(paths)))

    visit(data, (0,))
    n = len(paths)
    rel = [0] * (n * n)
    for a in range(n):
        for b in range(n):
            common = 0
            for x, y in zip(paths[a], paths[b]):
                if x != y:
                    break
                common += 1
            bucket = min(len(paths[a]) - common, 7) * 8 + min(len(paths[b]) - common, 7)
            rel[a * n + b] = bucket + 1 if bucket else 0
    return rel


_deep_tree = st.recursive(
    st.just(""), lambda kids: st.dictionaries(st.sampled_from("abcd"), kids, min_size=1, max_size=3), max_leaves=12
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["p", "q", "r"]), _deep_tree, max_size=3), _deep_tree)
def test_property_vectorised_relations_equal_the_pairwise_rule(tokenizer: CpmBeeTokenizer, data, answer) -> None:
    data = {**data, "<ans>": answer}
    encoding, _ = encode_structured(tokenizer, [data], return_tensors="np")
    expected = _reference_relations(data)
    assert encoding["segment_rel"][0, : len(expected)].tolist() == expected
