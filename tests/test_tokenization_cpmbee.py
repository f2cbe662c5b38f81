"""CpmBeeTokenizer: parity with the original VisCPM tokenizer (golden fixture), markup rules, transformers API."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transformers_viscpm.models.cpmbee import tokenization_cpmbee
from transformers_viscpm.models.cpmbee.encoding_cpmbee import CpmBeeBatchEncoding
from transformers_viscpm.models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer, default_vocab_file, split_markup

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES / "record"))
import corpus  # noqa: E402
from _reference_tokenizer import encode_markup_reference  # noqa: E402

GOLDEN = json.loads((FIXTURES / "tokenizer_golden.json").read_text())
VOCAB_SIZE = 86583
PAST_TABLES = [{int(k): v for k, v in table.items()} for table in GOLDEN["past_tables"]]


@pytest.fixture(scope="module")
def tok() -> CpmBeeTokenizer:
    return CpmBeeTokenizer()


def without_native_core(**kwargs) -> CpmBeeTokenizer:
    """A tokenizer on the automaton route, the one an install without the compiled C core takes."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenization_cpmbee, "LongestMatcher", None)
        tok = CpmBeeTokenizer(**kwargs)
        tok.encode_markup("x")  # builds the matcher
    return tok


@pytest.fixture(scope="module")
def automaton_tok() -> CpmBeeTokenizer:
    tok = without_native_core()
    assert type(tok._matcher).__name__ == "_FastMatcher"
    return tok


@pytest.fixture(params=["native", "automaton"])
def matching_tok(request, tok, automaton_tok) -> CpmBeeTokenizer:
    """Each matching route of `encode_markup`: the C core and the automaton fallback."""
    return tok if request.param == "native" else automaton_tok


def encoder(tok: CpmBeeTokenizer, automaton_tok: CpmBeeTokenizer, path: str):
    if path == "reference":
        return lambda *args: encode_markup_reference(tok, *args)
    return (tok if path == "native" else automaton_tok).encode_markup


@pytest.fixture(scope="module")
def strings() -> list[str]:
    return corpus.markup_corpus(GOLDEN["n_strings"], GOLDEN["seed"])


def canonical(tok: CpmBeeTokenizer, ids: list[int], ext: dict[int, str]) -> str:
    """Same canonical form as the recorder: ids, sorted ext items, the original-style (markup) decode."""
    decoded = tok.decode_markup(ids, ext)
    return json.dumps([ids, sorted([k, v] for k, v in ext.items()), decoded], ensure_ascii=True, separators=(",", ":"))


def short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def encode_or_none(encode, markup: str, past=None) -> tuple[list[int], dict[int, str]] | None:
    try:
        return encode(markup, past)
    except ValueError:
        return None


# ---------------------------------------------------------------- golden parity with the original


def test_fixture_matches_corpus_and_vocab(strings):
    assert corpus.corpus_digest(strings) == GOLDEN["corpus_sha256"], "corpus.py drifted from the recorded corpus"
    assert hashlib.sha256(Path(default_vocab_file()).read_bytes()).hexdigest() == GOLDEN["vocab_sha256"]
    assert GOLDEN["vocab_size"] == VOCAB_SIZE
    assert len(strings) >= 3000


def test_the_native_core_is_built(tok):
    # The C core is optional at install (a machine without a compiler gets the automaton); here it must be there.
    tok.encode_markup("x")
    assert type(tok._matcher).__name__ == "LongestMatcher", "the C matching core was not compiled: pip install -e ."


@pytest.mark.parametrize("path", ["native", "automaton", "reference"])
def test_golden_corpus(tok, automaton_tok, strings, path):
    encode = encoder(tok, automaton_tok, path)
    results = [encode_or_none(encode, s) for s in strings]
    errors = [i for i, r in enumerate(results) if r is None]
    assert errors == GOLDEN["errors"]
    canon = [canonical(tok, *r) if r is not None else None for r in results]
    for i, expected in GOLDEN["detailed"].items():
        assert json.loads(canon[int(i)]) == expected, f"string {i}: {strings[int(i)]!r}"
    mismatched = [i for i, c in enumerate(canon) if (short(c) if c is not None else "") != GOLDEN["short_digests"][i]]
    assert mismatched == [], f"first mismatch: {strings[mismatched[0]]!r}"
    assert hashlib.sha256("\n".join(c for c in canon if c is not None).encode()).hexdigest() == GOLDEN["digest"]


@pytest.mark.parametrize("path", ["native", "automaton", "reference"])
def test_golden_past_tables(tok, automaton_tok, strings, path):
    encode = encoder(tok, automaton_tok, path)
    for i, expected in GOLDEN["chained"]:
        _, past = encode(strings[i])
        past_before = dict(past)
        assert short(canonical(tok, *encode(strings[i + 1], past))) == expected, f"chained {i}"
        assert past == past_before  # the caller's table is not mutated
    for t, i, expected in GOLDEN["tables"]:
        assert short(canonical(tok, *encode(strings[i], PAST_TABLES[t]))) == expected, f"table {t} string {i}"


def test_golden_examples(tok):
    detailed = GOLDEN["detailed"]
    assert detailed["2"][0] == tok.encode_markup("hello world")[0] == [37466, 37791]
    assert detailed["3"][0] == tok("今天天气不错").input_ids
    # The original's numbering continues a past table by its count of distinct texts, even past a hole.
    ids, ext = tok.encode_markup("𠀀<foo_1>", {86590: "x", 86583: "😀"})
    assert ids == [VOCAB_SIZE + 2, VOCAB_SIZE + 3]
    assert ext == {86590: "x", 86583: "😀", VOCAB_SIZE + 2: "𠀀", VOCAB_SIZE + 3: "<foo_1>"}


def test_matching_equals_reference_on_large_text(matching_tok):
    text = corpus.plain_text(300_000)
    markup = matching_tok.escape(text)
    assert matching_tok.encode_markup(markup) == encode_markup_reference(matching_tok, markup)


@pytest.mark.parametrize(
    "text",
    ["\x00", "a\x00b", "\x00\x00", "😀", "😀a😀", "a😀b\x00c\td", "\ud800", "x\udfffy", "龘靐齉爩", "", "a", " \n "],
)
def test_matching_unknown_runs_and_sentinel(matching_tok, text):
    # Unknown runs at the start, middle and end, the automaton's sentinel character itself, lone surrogates.
    markup = matching_tok.escape(text)
    assert matching_tok.encode_markup(markup) == encode_markup_reference(matching_tok, markup)


@pytest.mark.parametrize(("native", "route"), [(True, "LongestMatcher"), (False, "_PositionsMatcher")])
def test_matching_with_a_vocabulary_missing_single_characters(tmp_path, native, route):
    # "x" and "é" occur only inside longer pieces: gaps are no longer the runs of unknown characters, so without
    # the C core the tokenizer falls back to matching with positions; ids must still equal the reference path's.
    vocab = ["<s>", "</s>", "<unk>", "<pad>", "<mask>", "</n>", "</_>", "a", "b", "ab", "abx", "xb", "bé", "bée"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    kwargs = {"vocab_file": str(tmp_path / "vocab.txt")}
    small = CpmBeeTokenizer(**kwargs) if native else without_native_core(**kwargs)
    for text in ["abxb", "xbab", "x", "xxb", "béeb", "é", "ab x\nbé", "😀abx😀", "a\ud800b", "\udfff"]:
        markup = small.escape(text)
        assert small.encode_markup(markup) == encode_markup_reference(small, markup), text
    assert type(small._matcher).__name__ == route


# ---------------------------------------------------------------- markup rules


@pytest.mark.parametrize(
    ("markup", "position"),
    [("a < b", 2), ("x<", 1), ("<abc", 0), ("<a<b>", 2), ("1 << 2 < 3", 7), ("ok<<<", 4), ("<>", 0)],
)
def test_invalid_markup_names_the_position(tok, markup, position):
    with pytest.raises(ValueError, match=f"position {position}"):
        tok.encode_markup(markup)


def test_split_markup():
    assert split_markup("a<<b<ans>c<>x>d") == [
        ("a<b", False),
        ("<ans>", True),
        ("c", False),
        ("<>x>", True),
        ("d", False),
    ]
    assert split_markup("<<s>") == [("<s>", False)]
    assert split_markup("") == []


def test_specials_and_ext_table(tok):
    ids, ext = tok.encode_markup("<s><ans></s><foo_1>😀😀<foo_1>😀😀</n>")
    assert ids[:3] == [6, 9, 7]
    assert ids[3:] == [VOCAB_SIZE, VOCAB_SIZE + 1, VOCAB_SIZE, VOCAB_SIZE + 1, VOCAB_SIZE + 2]
    assert ext == {VOCAB_SIZE: "<foo_1>", VOCAB_SIZE + 1: "😀😀", VOCAB_SIZE + 2: "</n>"}
    # Special entries are never matched inside text: the literal text "<ans>" is spelled with ordinary pieces.
    assert 9 not in tok.encode_markup("<<ans>")[0]


# ---------------------------------------------------------------- transformers API


def test_special_token_ids(tok):
    assert tok.vocab_size == len(tok) == VOCAB_SIZE
    special_ids = [tok.pad_token_id, tok.unk_token_id, tok.mask_token_id, tok.bos_token_id, tok.eos_token_id]
    assert special_ids == [0, 1, 2, 6, 7]
    assert tok.convert_tokens_to_ids(["<ans>", "\n", " ", "今天"]) == [9, 4, 5, 9803]
    assert tok.convert_ids_to_tokens([4, 5, 9803]) == ["\n", " ", "今天"]


def test_plain_text_is_escaped_by_default(tok):
    text = "a < b <ans> 😀"
    enc = tok(text)
    ids = enc.input_ids
    assert ids == tok.encode(text) == tok.encode_markup(tok.escape(text))[0]
    assert 9 not in ids
    assert tok.tokenize(text) == ["a", " <", " b", " <", "ans", ">", " ", "😀"]
    assert tok.decode(ids, ext_table=enc.ext_table) == text
    assert tok.decode_markup(ids, enc.ext_table) == "a << b <<ans> 😀"  # the original's decode: markup, not text
    assert tok("<ans>x", markup=True).input_ids == [9, tok.convert_tokens_to_ids("x")] == [9, 101]
    with pytest.raises(ValueError, match="position 2"):
        tok("a < b", markup=True)


def test_decode_needs_the_encodings_table(tok):
    enc = tok("x 😀 y")
    ids, table = enc.input_ids, enc.ext_table
    assert table == {VOCAB_SIZE: "😀"}
    assert not hasattr(tok, "last_ext_table") and not hasattr(tok, "last_sample_infos")
    assert tok("plain").ext_table == {}
    for decode in (tok.decode, tok.decode_markup, lambda ids, **kw: tok.batch_decode([ids], **kw)):
        with pytest.raises(ValueError, match=f"Token id {VOCAB_SIZE} is an ext id .* no ext_table was given"):
            decode(ids)
        with pytest.raises(ValueError, match="the given ext_table has no entry for it"):
            decode(ids, ext_table={VOCAB_SIZE + 1: "other request's text"})
    with pytest.raises(ValueError, match="ext id"):
        tok.convert_ids_to_tokens([VOCAB_SIZE])
    assert tok.decode(ids, ext_table=table) == "x 😀 y"
    assert tok.decode_markup(ids, ext_table=table) == "x 😀 y"
    assert tok.decode([-1, *ids, -100], ext_table=table) == "x 😀 y"
    assert tok.decode([6, *ids, 7], ext_table=table, skip_special_tokens=True) == "x 😀 y"
    assert tok.decode([6, *ids, 7], ext_table=table) == "<s>x 😀 y</s>"
    assert tok.decode(torch.tensor(ids), ext_table=table) == "x 😀 y"


def test_batch_shares_one_ext_table_and_left_pads(tok):
    texts = ["hi 😀", "yo 🙂 😀", ""]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert enc.input_ids.shape == (3, 5)  # "yo", " ", "🙂", " ", "😀"
    assert enc.input_ids[0].tolist()[:2] == [0, 0] and enc.attention_mask[0].tolist() == [0, 0, 1, 1, 1]
    assert enc.input_ids[2].tolist() == [0] * 5 and enc.attention_mask[2].tolist() == [0] * 5
    assert enc.ext_table == {VOCAB_SIZE: "😀", VOCAB_SIZE + 1: "🙂"}
    assert enc.input_ids[0, -1] == enc.input_ids[1, -1] == VOCAB_SIZE
    assert tok.batch_decode(enc.input_ids, skip_special_tokens=True, ext_table=enc.ext_table) == texts
    pair = tok("😀 a", "🙂 b")
    assert pair.input_ids == [VOCAB_SIZE, *tok.encode(" a"), VOCAB_SIZE + 1, *tok.encode(" b")]
    continued = tok("🙂", ext_table={VOCAB_SIZE: "😀"})
    assert continued.input_ids == [VOCAB_SIZE + 1]


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "vocab.txt").read_bytes() == Path(default_vocab_file()).read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "CpmBeeTokenizer" and config["padding_side"] == "left"
    reloaded = CpmBeeTokenizer.from_pretrained(tmp_path)
    text = "今天天气不错 <ans> hello 😀"
    assert reloaded(text).input_ids == tok(text).input_ids
    assert reloaded.all_special_ids == tok.all_special_ids


def test_pickle_and_deepcopy(tok):
    text = "hello 😀 世界"
    for clone in (pickle.loads(pickle.dumps(tok)), copy.deepcopy(tok)):
        assert clone.encode(text) == tok.encode(text)


def test_structured_input_returns_model_tensors(tok):
    from transformers_viscpm.models.cpmbee.encoding_cpmbee import encode_structured

    prompt = {"input": "a < b 😀", "<ans>": ""}
    expected, infos = encode_structured(tok, [prompt, {"input": "x", "<ans>": {"a": "", "b": ""}}])
    batch = tok([prompt, {"input": "x", "<ans>": {"a": "", "b": ""}}], return_tensors="pt")
    assert set(batch.keys()) == set(expected.keys())
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key
    assert batch.sample_infos == infos
    assert batch.ext_table is None  # two rows: each decodes with its own sample_infos[i].ext_table
    assert "😀" in infos[0].ext_table.values()
    assert batch["answer_segment_ids"].tolist()[1][1] >= 0
    one = tok(prompt, return_tensors="pt")
    assert one.ext_table == one.sample_infos[0].ext_table == encode_structured(tok, [prompt])[1][0].ext_table


# ---------------------------------------------------------------- properties

TRICKY = ["<", ">", "<<", "<ans>", "<s>", "</s>", "</n>", "\n", " ", "  \t", "\r\n", "\x00", "\x7f", "😀", "𠀀"]
any_text = st.lists(st.one_of(st.text(), st.sampled_from(TRICKY)), max_size=8).map("".join)
any_markup = st.lists(st.one_of(st.text(alphabet="<>ab 😀今\n"), st.sampled_from(TRICKY)), max_size=8).map("".join)


@settings(max_examples=300, deadline=None)
@given(any_text)
def test_decode_encode_roundtrip(tok, text):
    enc = tok(text)
    assert enc.input_ids == tok.encode(text)
    assert tok.decode(enc.input_ids, ext_table=enc.ext_table) == text
    assert "".join(tok.tokenize(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(codec=None, exclude_categories=())))
def test_roundtrip_with_surrogates(tok, automaton_tok, text):
    enc = tok(text)
    assert tok.decode(enc.input_ids, ext_table=enc.ext_table) == text
    expected = encode_markup_reference(tok, tok.escape(text))
    assert tok.encode_markup(tok.escape(text)) == automaton_tok.encode_markup(tok.escape(text)) == expected


@settings(max_examples=300, deadline=None)
@given(any_markup, st.sampled_from([None, *PAST_TABLES]))
def test_matching_equals_reference_on_markup(tok, automaton_tok, markup, past):
    fast = encode_or_none(tok.encode_markup, markup, past)
    assert fast == encode_or_none(lambda *args: encode_markup_reference(tok, *args), markup, past)
    assert fast == encode_or_none(automaton_tok.encode_markup, markup, past)
    if fast is not None and past is None:
        ids, ext = fast
        assert tok.encode_markup(tok.decode_markup(ids, ext))[0] == ids


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(any_text, st.lists(any_text, min_size=1, max_size=4)),
    st.booleans(),
    st.sampled_from([None, *PAST_TABLES]),
)
def test_direct_call_path_equals_generic_path(tok, text, markup, past):
    """`tok(text)` is built directly; any extra argument (here `verbose`) takes transformers' generic path."""
    kwargs = {"ext_table": past} if past is not None else {}
    if markup:
        kwargs["markup"] = True
        text = [tok.escape(t) for t in text] if isinstance(text, list) else tok.escape(text)
    direct, generic = tok(text, **kwargs), tok(text, verbose=True, **kwargs)
    assert type(direct) is type(generic) is CpmBeeBatchEncoding
    assert dict(direct) == dict(generic)
    assert direct.ext_table == generic.ext_table
    assert direct.sample_infos is generic.sample_infos is None
    assert (direct._encodings, direct._n_sequences) == (generic._encodings, generic._n_sequences)
    assert direct.__dict__.keys() == generic.__dict__.keys()


def test_encoding_keeps_its_table_through_to_pickle_and_model_kwargs(tok):
    enc = tok("x 😀", return_tensors="pt")
    assert enc.to("cpu") is enc and enc.ext_table == {VOCAB_SIZE: "😀"}
    for clone in (pickle.loads(pickle.dumps(enc)), copy.deepcopy(enc)):
        assert clone.ext_table == enc.ext_table and torch.equal(clone.input_ids, enc.input_ids)
    # The table is an attribute, not a key: `model(**enc)` / `generate(**enc)` see only tensors.
    assert set(enc.keys()) == {"input_ids", "attention_mask"}
    assert "ext_table" not in dict(**enc) and "sample_infos" not in dict(**tok({"input": "a", "<ans>": ""}))


def test_streamer_gets_the_table_through_decode_kwargs(tok, capsys):
    from transformers import TextStreamer

    enc = tok("今天 😀 𠀀𠀁 🐍")
    streamer = TextStreamer(tok, ext_table=enc.ext_table)
    for idx in enc.input_ids:
        streamer.put(torch.tensor([idx]))
    streamer.end()
    assert capsys.readouterr().out == "今天 😀 𠀀𠀁 🐍\n"


def test_added_tokens_are_refused():
    tok = CpmBeeTokenizer()  # not the shared one: `add_tokens` registers even the entries it accepts
    before = len(tok)
    for add in (lambda: tok.add_tokens(["<my_tool>"]), lambda: tok.add_special_tokens({"pad_token": "<my_pad>"})):
        with pytest.raises(ValueError, match=r"vocabulary is fixed.*markup"):
            add()
    assert len(tok) == before and tok.pad_token == "<pad>"
    assert tok.add_tokens(["<ans>"]) == 0  # an entry of the vocabulary adds nothing, and is accepted
    assert tok("<my_tool>", markup=True).input_ids == [VOCAB_SIZE]  # what CPM-Bee does instead: an ext id


def test_chat_template_builds_the_prompt_dict(tok):
    messages = [
        {"role": "system", "content": "中翻英"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        {"role": "user", "content": "a < b 😀"},
    ]
    prompt = {"prompt": "中翻英", "context": "User: 你好\nAI: hello\n", "input": "a < b 😀", "<ans>": ""}
    assert json.loads(tok.apply_chat_template(messages, tokenize=False)) == prompt
    assert list(json.loads(tok.apply_chat_template(messages, tokenize=False))) == list(prompt)  # key order
    enc = tok.apply_chat_template(messages, return_tensors="pt")
    expected = tok(prompt, return_tensors="pt")
    assert enc.keys() == expected.keys() and all(torch.equal(enc[k], expected[k]) for k in enc)
    assert enc.sample_infos == expected.sample_infos and enc.ext_table == expected.ext_table
    assert tok.apply_chat_template(messages, return_dict=False) == tok(prompt).input_ids
    only_user = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert json.loads(only_user) == {"input": "hi", "<ans>": ""}
    for bad, message in [
        (messages[:3], "must end with a user message"),
        ([messages[1], messages[0], messages[3]], "system message must come first"),
        ([messages[1], messages[1]], "must alternate"),
        ([{"role": "tool", "content": "x"}], "system, user and assistant roles only"),
    ]:
        with pytest.raises(Exception, match=message):
            tok.apply_chat_template(bad)
    with pytest.raises(ValueError, match="cannot continue an assistant message"):
        tok.apply_chat_template(messages[:3], continue_final_message=True)
