# Copyright 2023 The OpenBMB team and the transformers-viscpm developers.
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
"""Tokenization class for CPM-Bee (the language model inside VisCPM)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from operator import itemgetter
from typing import Any

from ahocorasick_rs import AhoCorasick, MatchKind
from transformers.tokenization_python import PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken, BatchEncoding, TruncationStrategy
from transformers.utils import PaddingStrategy, TensorType

from .encoding_cpmbee import CpmBeeBatchEncoding, encode_structured

try:  # the C matching core, compiled at install (pyproject.toml); without it an automaton does the matching
    from ._longest_match import LongestMatcher
except ImportError:  # pragma: no cover - a build without a C compiler
    LongestMatcher = None

VOCAB_FILES_NAMES = {"vocab_file": "vocab.txt"}

# `__call__` keyword arguments its direct path serves; any other goes through transformers' generic path.
_FAST_CALL_KWARGS = frozenset({"markup", "ext_table"})
# The vocabulary file spells the two whitespace entries as markup; the tokenizer matches the real characters.
_FILE_SPELLINGS = {"</n>": "\n", "</_>": " "}
_TEXT_SPELLINGS = {text: spelling for spelling, text in _FILE_SPELLINGS.items()}


def default_vocab_file() -> str:
    """Path of the released CPM-Bee vocabulary shipped with this package (86,583 entries)."""
    return str(resources.files("transformers_viscpm") / "data" / "cpm_bee_vocab.txt")


def load_vocab(vocab_file: str | os.PathLike) -> dict[str, int]:
    """Read a CPM-Bee vocabulary exactly as the original does.

    One entry per line (text-mode reading, trailing newline stripped), empty lines skipped, ids in file order;
    `</n>` and `</_>` become "\\n" and " " with their ids.
    """
    vocab: dict[str, int] = {}
    try:
        with open(vocab_file, encoding="utf-8") as reader:
            for line in reader:
                token = line[:-1] if line.endswith("\n") else line
                if token:
                    vocab[token] = len(vocab)  # the original's numbering, duplicates included
    except UnicodeDecodeError as e:
        raise ValueError(f"{vocab_file}: not a UTF-8 CPM-Bee vocabulary ({e})") from e
    for spelling, text in _FILE_SPELLINGS.items():
        vocab[text] = vocab.pop(spelling)
    return vocab


# The default chat template: a conversation -> the CPM-Bee prompt dict, rendered as JSON (`apply_chat_template` parses
# it back). An optional leading system message is the `"prompt"` (CPM-Bee's task instruction), finished turns become
# the `"context"` in VisCPM's turn format (`"User: q\nAI: a\n"` each), the last user message is the `"input"`, and
# `"<ans>"` is the answer to generate. Roles must alternate user / assistant and end with the user.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(prompt=none, context='', question=none) -%}"
    "{%- for message in messages -%}"
    "{%- set text = namespace(value='') -%}"
    "{%- if message['content'] is string -%}{%- set text.value = message['content'] -%}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}"
    "{%- else -%}{{ raise_exception('CPM-Bee takes text only, got a ' + part['type'] + ' part') }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{ raise_exception('A system message must come first.') }}{%- endif -%}"
    "{%- set ns.prompt = text.value -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if ns.question is not none -%}{{ raise_exception('User and assistant messages must alternate.') }}"
    "{%- endif -%}"
    "{%- set ns.question = text.value -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if ns.question is none -%}{{ raise_exception('An assistant message must answer a user message.') }}"
    "{%- endif -%}"
    "{%- set ns.context = ns.context + 'User: ' + ns.question + '\n' + 'AI: ' + text.value + '\n' -%}"
    "{%- set ns.question = none -%}"
    "{%- else -%}{{ raise_exception('CPM-Bee supports the system, user and assistant roles only.') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.question is none -%}{{ raise_exception('The conversation must end with a user message.') }}"
    "{%- endif -%}"
    "{{- '{' -}}"
    "{%- if ns.prompt is not none -%}{{- '\"prompt\": ' + (ns.prompt | tojson) + ', ' -}}{%- endif -%}"
    "{%- if ns.context -%}{{- '\"context\": ' + (ns.context | tojson) + ', ' -}}{%- endif -%}"
    '{{- \'"input": \' + (ns.question | tojson) + \', "<ans>": ""}\' -}}'
)


def _is_special_entry(token: str) -> bool:
    return token.startswith("<") and token.endswith(">")


def _is_structured(text: Any) -> bool:
    """A CPM-Bee prompt dict, or a non-empty batch of them."""
    if isinstance(text, Mapping):
        return True
    return isinstance(text, (list, tuple)) and len(text) > 0 and all(isinstance(t, Mapping) for t in text)


def split_markup(markup: str) -> list[tuple[str, bool]]:
    """Cut CPM-Bee markup into `(text, is_special)` parts, the original's rules.

    `<<` is a literal `<` (text parts come back unescaped, and a text part runs across escapes); `<x...>` is
    a special token, where `x` is any character but `<` (so `<>a>` is the special `<>a>`). A `<` inside a
    special token, or markup ending inside an escape or a special token, is invalid.
    """
    parts: list[tuple[str, bool]] = []
    text: list[str] = []
    pos, n = 0, len(markup)
    while True:
        start = markup.find("<", pos)
        if start < 0:
            text.append(markup[pos:])
            break
        text.append(markup[pos:start])
        if start + 1 == n:
            raise ValueError(f"Invalid CPM-Bee markup: `<` at position {start} ends the text (write `<<` for `<`)")
        if markup[start + 1] == "<":
            text.append("<")
            pos = start + 2
            continue
        end = markup.find(">", start + 2)
        inner = markup.find("<", start + 2, end if end >= 0 else n)
        if inner >= 0:
            raise ValueError(
                f"Invalid CPM-Bee markup: `<` at position {inner} inside the special token opened at position {start}"
                " (write `<<` for `<`)"
            )
        if end < 0:
            raise ValueError(
                f"Invalid CPM-Bee markup: the special token opened at position {start} is not closed by `>`"
                " (write `<<` for `<`)"
            )
        joined = "".join(text)
        if joined:
            parts.append((joined, False))
        text = []
        parts.append((markup[start : end + 1], True))
        pos = end + 1
    joined = "".join(text)
    if joined:
        parts.append((joined, False))
    return parts


class _ExtTable:
    """Ids for unknown runs and unknown specials, numbered like the original.

    A new entry gets `vocab_size + (number of distinct texts seen so far)`, counting the texts of the past
    table; repeated texts reuse their id.
    """

    __slots__ = ("_ids", "_vocab_size", "table")

    def __init__(self, vocab_size: int, past_table: Mapping[int, str] | None) -> None:
        if past_table:
            self.table: dict[int, str] = dict(past_table)
            self._ids = {text: idx for idx, text in self.table.items()}
        else:  # the common case, once per call: no copies
            self.table, self._ids = {}, {}
        self._vocab_size = vocab_size

    def id_for(self, text: str) -> int:
        idx = self._ids.get(text)
        if idx is None:
            idx = self._ids[text] = len(self._ids) + self._vocab_size
            self.table[idx] = text
        return idx


class _FastMatcher:
    """Leftmost-longest matching of CPM-Bee text into piece ids, with as little work per token as possible.

    The cost of matching is per token, so each token must cost a handful of C-level steps: the automaton hands back
    its own stored pattern strings (`find_matches_as_strings`, no tuple or int objects per match), and one C-level
    `itemgetter` over a `{piece: id}` dict turns them into ids. Those strings carry no positions, so unknown runs
    are located differently, from a property of the vocabulary checked here: every character of every piece is
    itself a one-character piece (true of the released vocabulary). Then a character outside that set ("unknown")
    is never part of any match, and every other character is covered by a match (a match starts at it, at least its
    own one-character piece, unless an earlier match already covers it). So the gaps between leftmost-longest
    matches, i.e. the original's unknown runs (see `CpmBeeTokenizer._encode_text`), are exactly the maximal runs of
    unknown characters, found by one regex split; and the matches between two runs are those of the text between
    them, as no match can reach into a run. Each run is replaced by a sentinel character, itself an unknown
    character added to the automaton as a one-character pattern, so that one search yields every token in order,
    runs included as sentinels.
    """

    MARK = -1  # the id the sentinel maps to before its run's ext id replaces it

    def __init__(self, pieces: Mapping[str, int]) -> None:
        alphabet = set("".join(pieces))
        if alphabet != {piece for piece in pieces if len(piece) == 1}:
            raise ValueError("some character of a piece is not itself a piece")
        # The first non-surrogate character outside every piece (never matched, so never part of a match).
        self.sentinel = next(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and chr(c) not in alphabet)
        self.lookup = dict(pieces)
        self.lookup[self.sentinel] = self.MARK
        self.automaton = AhoCorasick(list(self.lookup), matchkind=MatchKind.LeftmostLongest, store_patterns=True)
        known = "".join(map(re.escape, sorted(alphabet)))
        unknown = f"[^{known}]" if known else "."
        # Finds a character outside every piece; much cheaper than the split below, which most texts do not need.
        self.find_unknown = re.compile(unknown, re.DOTALL).search
        # Splits text into [known, run, known, run, ..., known]: the runs of characters outside every piece.
        self.split_runs = re.compile(f"({unknown}+)", re.DOTALL).split

    def encode(self, text: str, ids: list[int], id_for: Callable[[str], int]) -> None:
        if self.find_unknown(text) is None:  # no unknown run: every character is matched
            self._extend_ids(ids, self.automaton.find_matches_as_strings(text))
            return
        parts = self.split_runs(text)
        at = len(ids)  # `ids` holds no MARK: every id before `at` is final
        self._extend_ids(ids, self.automaton.find_matches_as_strings(self.sentinel.join(parts[0::2])))
        for run in parts[1::2]:  # the sentinels stand for the runs, in order
            at = ids.index(self.MARK, at)
            ids[at] = id_for(run)

    def _extend_ids(self, ids: list[int], pieces: list[str]) -> None:
        # One `itemgetter` call looks every piece up in C (faster than `map(dict.__getitem__, ...)`).
        if len(pieces) > 1:
            ids.extend(itemgetter(*pieces)(self.lookup))
        elif pieces:
            ids.append(self.lookup[pieces[0]])


class _PositionsMatcher:
    """The leftmost-longest automaton with match positions: the gaps between matches are the unknown runs (see
    `CpmBeeTokenizer._encode_text`). Serves a custom vocabulary `_FastMatcher` refuses, without the C core."""

    def __init__(self, pieces: Mapping[str, int]) -> None:
        self.pieces = pieces
        self.longest = max(map(len, pieces))
        self.piece_ids = list(pieces.values())
        self.automaton = AhoCorasick(list(pieces), matchkind=MatchKind.LeftmostLongest)

    def encode(self, text: str, ids: list[int], id_for: Callable[[str], int]) -> None:
        try:
            matches = self.automaton.find_matches_as_indexes(text)
        except UnicodeEncodeError:  # lone surrogates cannot reach the automaton (UTF-8 only)
            encode_longest_match(self.pieces, self.longest, text, ids, id_for)
            return
        piece_ids = self.piece_ids
        pos = 0
        for pattern, start, end in matches:
            if start != pos:
                ids.append(id_for(text[pos:start]))
            ids.append(piece_ids[pattern])
            pos = end
        if pos != len(text):
            ids.append(id_for(text[pos:]))


def encode_longest_match(
    pieces: Mapping[str, int], longest: int, text: str, ids: list[int], id_for: Callable[[str], int]
) -> None:
    """The original's loop in pure Python (about 100x slower than the matchers): the longest piece (of at most
    `longest` characters) at each position, else the character joins the current unknown run, whose id `id_for`
    gives."""
    pos, n = 0, len(text)
    unknown_start = -1
    while pos < n:
        for end in range(min(n, pos + longest), pos, -1):
            idx = pieces.get(text[pos:end])
            if idx is not None:
                break
        else:
            if unknown_start < 0:
                unknown_start = pos
            pos += 1
            continue
        if unknown_start >= 0:
            ids.append(id_for(text[unknown_start:pos]))
            unknown_start = -1
        ids.append(idx)
        pos = end
    if unknown_start >= 0:
        ids.append(id_for(text[unknown_start:]))


def check_vocabulary_matches(tokenizer: PreTrainedTokenizer, vocab_size: int, owner: str) -> None:
    """Refuse a tokenizer whose vocabulary is not the model's: ext ids start at `vocab_size`, so a mismatch would
    silently shift every unknown run and special token (e.g. a tokenizer and a model from different repos)."""
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(
            f"The tokenizer's vocabulary has {tokenizer.vocab_size} entries, but {owner} has vocab_size={vocab_size}:"
            " load the tokenizer and the model from the same repo."
        )


class CpmBeeTokenizer(PreTrainedTokenizer):
    """
    Construct a CPM-Bee tokenizer: greedy longest match over the CPM-Bee vocabulary, with CPM-Bee's markup and
    its table of extra ids for text the vocabulary cannot spell.

    User text is plain text: every text entry point (`__call__`, `encode`, `tokenize`) escapes it first, so `<`
    is an ordinary character. Pass `markup=True` to feed raw CPM-Bee markup instead (`<<` is a literal `<`,
    `<name>` a special token such as `<ans>`), or call [`~CpmBeeTokenizer.encode_markup`], which reproduces the
    original `CPMBeeTokenizer.encode` id for id. `add_special_tokens` adds nothing: the structured encoder wraps
    each segment in `<s>`...`</s>` itself.

    Each run of characters the vocabulary cannot spell (most emoji, rare CJK, control characters), and each
    special token outside the vocabulary, becomes ONE extra id `vocab_size + k` recorded in an ext table
    `{id: text}`. One call shares one table across its batch (and text pair), optionally continuing
    `ext_table=`. The tokenizer keeps nothing between calls (one instance serves many threads): the table travels
    with the encoding, a [`CpmBeeBatchEncoding`] whose `ext_table` attribute `decode` / `batch_decode` /
    `decode_markup` take back explicitly (`tokenizer.decode(enc.input_ids, ext_table=enc.ext_table)`). Decoding an
    ext id without its table is a `ValueError`. Streamers pass it on: `TextStreamer(tokenizer,
    ext_table=enc.ext_table)` (TextStreamer hands its extra keyword arguments to `decode`). `convert_tokens_to_ids`
    has no table: extra tokens map to `<unk>` there.

    `decode` returns the real text; [`~CpmBeeTokenizer.decode_markup`] returns the original's decode output
    (markup). Dicts (CPM-Bee structured prompts) passed to `__call__` go to the structured encoder: the call
    returns the model tensors, with the per-sample answer bookkeeping in `sample_infos` (and, for one prompt, the
    table of what it generates in `ext_table`). `apply_chat_template` turns a conversation into such a prompt (see
    `CHAT_TEMPLATE`).

    The vocabulary is fixed: CPM-Bee's specials are markup (`<name>`, with ext ids for names outside the
    vocabulary), so `add_tokens` refuses new tokens instead of accepting ones the tokenizer would never emit.

    Args:
        vocab_file (`str`, *optional*):
            Path to the vocabulary file; defaults to the released CPM-Bee vocabulary shipped with this package.
        bos_token (`str`, *optional*, defaults to `"<s>"`):
            Start of a segment.
        eos_token (`str`, *optional*, defaults to `"</s>"`):
            End of a segment.
        unk_token (`str`, *optional*, defaults to `"<unk>"`):
            The unknown token (VisCPM also uses it as the image-slot placeholder).
        pad_token (`str`, *optional*, defaults to `"<pad>"`):
            The padding token.
        mask_token (`str`, *optional*, defaults to `"<mask>"`):
            The mask token.
        padding_side (`str`, *optional*, defaults to `"left"`):
            CPM-Bee batches are left-padded.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str | None = None,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        pad_token: str = "<pad>",
        mask_token: str = "<mask>",
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ) -> None:
        self.vocab_file = vocab_file if vocab_file is not None else default_vocab_file()
        self.encoder = load_vocab(self.vocab_file)
        self.decoder = {idx: token for token, idx in self.encoder.items()}
        # Special entries are never matched inside text: they only come from `<...>` markup.
        self._pieces = {token: idx for token, idx in self.encoder.items() if not _is_special_entry(token)}
        # Built on first use (see `_build_matcher`).
        self._matcher: Any = None
        super().__init__(
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            mask_token=mask_token,
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            special_tokens_pattern="none",
            token_type_ids_pattern="all_zeros",
            **kwargs,
        )
        if self.chat_template is None:
            self.chat_template = CHAT_TEMPLATE

    # The matcher is a native object that cannot be pickled: rebuild it on first use (0.02-0.2 s) instead.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_matcher"] = None
        return state

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.encoder, **self._added_tokens_encoder)

    @staticmethod
    def escape(text: str) -> str:
        """Turn plain text into CPM-Bee markup that spells it literally."""
        return text.replace("<", "<<")

    # ---------------------------------------------------------------- markup encoding (the original's rule)

    def encode_markup(
        self, markup: str, past_table: Mapping[int, str] | None = None
    ) -> tuple[list[int], dict[int, str]]:
        """Encode CPM-Bee markup exactly like the original `CPMBeeTokenizer.encode(markup, past_table)`.

        Returns the ids and the ext table (a new dict that continues `past_table`, which is left untouched).
        Raises `ValueError` on invalid markup.
        """
        ext = _ExtTable(self.vocab_size, past_table)
        return self._encode_into(markup, ext, self._encode_text), ext.table

    def _encode_into(
        self, markup: str, ext: _ExtTable, encode_text: Callable[[str, list[int], _ExtTable], None]
    ) -> list[int]:
        ids: list[int] = []
        if "<" not in markup:  # plain text (the common case): one text part, no markup to split
            if markup:
                encode_text(markup, ids, ext)
            return ids
        for part, is_special in split_markup(markup):
            if is_special:
                known = self.encoder.get(part)
                ids.append(known if known is not None else ext.id_for(part))
            else:
                encode_text(part, ids, ext)
        return ids

    def _encode_plain(self, text: str, ext: _ExtTable) -> list[int]:
        """`_encode_into(escape(text), ...)` without escaping or splitting: the escaped markup of plain text is one
        text part, the text itself (text parts run across `<<` escapes)."""
        ids: list[int] = []
        if text:
            self._encode_text(text, ids, ext)
        return ids

    def _encode_text(self, text: str, ids: list[int], ext: _ExtTable) -> None:
        """Greedy longest match over the non-special entries, the original's rule.

        The original, at each position p, takes the longest entry starting at p, or else adds the single
        character at p to the current unknown run and moves to p + 1. Leftmost-longest search from p reports,
        among all entries occurring at or after p, one that starts leftmost, and the longest of those; it then
        resumes at its end. If an entry starts at p, that is the original's choice at p. If the first match
        starts at q > p, no entry starts at p..q-1, so the original also turns p..q-1 into one unknown run and
        then takes the same longest entry at q. By induction both cut the text identically, and the gaps between
        matches are exactly the original's unknown runs, so a leftmost-longest automaton reproduces the rule. (The
        original's truncation to the longest vocabulary entry never hides a candidate.) Checked id for id against
        the original on the fixture corpus.

        The matching runs in `LongestMatcher`, the C core compiled at install, which applies the original's rule
        directly (any vocabulary, any text). Without it, `_FastMatcher` (the automaton, less work per token) serves
        the released vocabulary, and a vocabulary it cannot serve gets `_PositionsMatcher` (the automaton with
        match positions).
        """
        matcher = self._matcher
        if matcher is None:
            matcher = self._build_matcher()
        matcher.encode(text, ids, ext.id_for)

    def _build_matcher(self) -> Any:
        """The matcher of `_encode_text`, built once (a race builds two equal ones; either serves)."""
        if LongestMatcher is not None:
            matcher = LongestMatcher(self._pieces)
        else:
            try:
                matcher = _FastMatcher(self._pieces)
            except ValueError:  # a custom vocabulary with a character that is not a piece: positions needed
                matcher = _PositionsMatcher(self._pieces)
        self._matcher = matcher
        return matcher

    # ---------------------------------------------------------------- transformers entry points

    def tokenize(self, text: str, markup: bool = False, **kwargs) -> list[str]:
        """Token strings of `text` (plain text unless `markup=True`); extra tokens are shown as their text."""
        ext = _ExtTable(self.vocab_size, None)
        ids = self._encode_into(text, ext, self._encode_text) if markup else self._encode_plain(text, ext)
        table = ext.table
        return [table[idx] if idx in table else self.decoder[idx] for idx in ids]

    def __call__(self, text: Any = None, text_pair: Any = None, *args, **kwargs) -> BatchEncoding:
        """transformers' `__call__`; see `_encode_plus` for what CPM-Bee adds (`markup=`, `ext_table=`, dicts).

        The common call, a string or a list of strings with at most `markup` / `ext_table`, is built here directly:
        the generic path (argument resolution, `prepare_for_model`, `pad`) costs more than encoding 200 characters.
        Its result is the generic path's (`input_ids`, `attention_mask` lists), as the tests check.
        """
        if args or text_pair is not None or (kwargs and not kwargs.keys() <= _FAST_CALL_KWARGS):
            return super().__call__(text, text_pair, *args, **kwargs)
        if isinstance(text, str):
            ext = _ExtTable(self.vocab_size, kwargs.get("ext_table"))
            if kwargs.get("markup"):
                ids = self._encode_into(text, ext, self._encode_text)
            else:
                ids = self._encode_plain(text, ext)
            data = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        elif type(text) is list and text and all(type(item) is str for item in text):
            ext = _ExtTable(self.vocab_size, kwargs.get("ext_table"))
            if kwargs.get("markup"):
                rows = [self._encode_into(item, ext, self._encode_text) for item in text]
            else:
                rows = [self._encode_plain(item, ext) for item in text]
            data = {"input_ids": rows, "attention_mask": [[1] * len(ids) for ids in rows]}
        else:
            return super().__call__(text, text_pair, *args, **kwargs)
        return CpmBeeBatchEncoding.of_lists(data, ext.table)

    def _encode_plus(
        self,
        text: Any,
        text_pair: Any = None,
        add_special_tokens: bool = True,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        truncation_strategy: TruncationStrategy = TruncationStrategy.DO_NOT_TRUNCATE,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | TensorType | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        markup: bool = False,
        ext_table: Mapping[int, str] | None = None,
        **kwargs,
    ) -> CpmBeeBatchEncoding:
        """Strings (plain text, or markup with `markup=True`) and id lists; dicts go to the structured encoder.

        All strings of one call share one ext table (continuing `ext_table` if given), returned as the encoding's
        `ext_table`; a dict encoding carries its `sample_infos`.
        """
        kwargs.pop("split_special_tokens", None)  # text is never split on added tokens: markup decides specials
        if _is_structured(text):
            data_list = [text] if isinstance(text, Mapping) else list(text)
            return encode_structured(
                self, data_list, max_length=max_length, return_tensors=return_tensors, markup=markup, **kwargs
            )[0]
        if is_split_into_words:
            raise ValueError("CpmBeeTokenizer has no word pre-splitting: pass whole strings.")
        if return_offsets_mapping:
            raise NotImplementedError("return_offsets_mapping is not available with CpmBeeTokenizer.")

        ext = _ExtTable(self.vocab_size, ext_table)

        def to_ids(item: Any) -> list[int] | None:
            if item is None:
                return None
            if isinstance(item, str):
                return self._encode_into(item, ext, self._encode_text) if markup else self._encode_plain(item, ext)
            if isinstance(item, (list, tuple)) and all(isinstance(i, int) for i in item):
                return list(item)
            raise ValueError(f"Expected a string, a list of ids or a CPM-Bee dict, got {type(item).__name__}.")

        prepare_kwargs = {
            "add_special_tokens": add_special_tokens,
            "truncation": truncation_strategy.value,
            "max_length": max_length,
            "stride": stride,
            "return_token_type_ids": return_token_type_ids,
            "return_overflowing_tokens": return_overflowing_tokens,
            "return_special_tokens_mask": return_special_tokens_mask,
            "return_length": return_length,
            "verbose": verbose,
        }
        batched = isinstance(text, (list, tuple)) and not (text and isinstance(text[0], int))
        if not batched:
            ids, pair_ids = to_ids(text), to_ids(text_pair)
            encoded = self.prepare_for_model(
                ids,
                pair_ids=pair_ids,
                padding=padding_strategy.value,
                pad_to_multiple_of=pad_to_multiple_of,
                padding_side=padding_side,
                return_tensors=return_tensors,
                prepend_batch_axis=True,
                return_attention_mask=return_attention_mask,
                **prepare_kwargs,
            )
            return CpmBeeBatchEncoding(encoded.data, ext_table=ext.table)

        if text_pair is not None and (not isinstance(text_pair, (list, tuple)) or len(text_pair) != len(text)):
            raise ValueError("If `text` is a batch, `text_pair` must also be a batch of the same length.")
        pairs = text_pair if text_pair is not None else [None] * len(text)
        batch_outputs: dict[str, list] = {}
        for item, pair in zip(text, pairs):
            encoded = self.prepare_for_model(
                to_ids(item), pair_ids=to_ids(pair), return_attention_mask=False, **prepare_kwargs
            )
            for key, value in encoded.items():
                batch_outputs.setdefault(key, []).append(value)
        if return_tensors and return_overflowing_tokens:
            batch_outputs.pop("overflowing_tokens", None)
            batch_outputs.pop("num_truncated_tokens", None)
        batch_outputs = self.pad(
            batch_outputs,
            padding=padding_strategy.value,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
        )
        return CpmBeeBatchEncoding(batch_outputs, tensor_type=return_tensors, ext_table=ext.table)

    def apply_chat_template(self, conversation: Any, *args, **kwargs) -> Any:
        """transformers' `apply_chat_template`, ending in the CPM-Bee prompt dict instead of a flat text.

        The template (default: `CHAT_TEMPLATE`) renders each conversation as the JSON of its prompt dict;
        `tokenize=False` returns that JSON (`json.loads` gives the dict), `tokenize=True` (the default) encodes the
        dicts with the structured encoder: the ids, structure tensors and `sample_infos` that `generate` and
        `generate_answers` take (only `input_ids` without `return_dict`). There is no prefill of an assistant
        answer: CPM-Bee answers into `"<ans>"`.
        """
        if kwargs.get("continue_final_message"):
            raise ValueError("CPM-Bee cannot continue an assistant message: end the conversation with the user")
        tokenize = kwargs.pop("tokenize", True)
        return_dict = kwargs.pop("return_dict", True)
        return_tensors = kwargs.pop("return_tensors", None)
        rendered = super().apply_chat_template(conversation, *args, tokenize=False, **kwargs)
        if not tokenize:
            return rendered
        prompts = [json.loads(text) for text in ([rendered] if isinstance(rendered, str) else rendered)]
        encoding = self(prompts, return_tensors=return_tensors)
        return encoding if return_dict else encoding["input_ids"]

    def _add_tokens(self, new_tokens: list[str] | list[AddedToken], special_tokens: bool = False) -> int:
        """Registers vocabulary entries only; a new token is a `ValueError`.

        CPM-Bee has no added-token splitting: specials are markup (`<name>`, an ext id when `name` is not in the
        vocabulary) and the embeddings of the released checkpoints are sized to the fixed vocabulary, so a new
        token would be accepted but never emitted.
        """
        self._refuse_new_tokens(new_tokens or ())
        return super()._add_tokens(new_tokens, special_tokens=special_tokens)

    def add_special_tokens(self, special_tokens_dict: dict[str, Any], *args, **kwargs) -> int:
        """transformers' `add_special_tokens`, checked before anything is set (see `_add_tokens`)."""
        for value in special_tokens_dict.values():
            self._refuse_new_tokens(value if isinstance(value, (list, tuple)) else [value])
        return super().add_special_tokens(special_tokens_dict, *args, **kwargs)

    def _refuse_new_tokens(self, tokens: Iterable[str | AddedToken]) -> None:
        unknown = [str(token) for token in tokens if str(token) not in self.encoder]
        if unknown:
            raise ValueError(
                f"CpmBeeTokenizer cannot add tokens {unknown}: its vocabulary is fixed. CPM-Bee's special tokens are "
                "markup: write `<name>` in text encoded with `markup=True` (names outside the vocabulary get ext "
                "ids of the sample), and plain text needs no new tokens (unknown characters get ext ids too)."
            )

    def _convert_token_to_id(self, token: str) -> int:
        return self.encoder.get(token, self.encoder[str(self.unk_token)])

    def _convert_id_to_token(self, index: int) -> str:
        token = self.decoder.get(index)
        if token is None:
            raise ValueError(self._no_table_message(index, None))
        return token

    def _no_table_message(self, index: int, ext_table: Mapping[int, str] | None) -> str:
        where = "no ext_table was given" if ext_table is None else "the given ext_table has no entry for it"
        return (
            f"Token id {index} is an ext id (vocabulary size {self.vocab_size}) and {where}: decode with the table "
            "of the encoding that produced it (`ext_table=encoding.ext_table`, or `sample_infos[i].ext_table` for "
            "row i of a dict batch)."
        )

    def _text_of(self, idx: int, table: Mapping[int, str] | None) -> str:
        text = table.get(idx) if table else None
        if text is None:
            text = self.decoder.get(idx)
            if text is None:
                raise ValueError(self._no_table_message(idx, table))
        return text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        ext_table: Mapping[int, str] | None = None,
        **kwargs,
    ) -> str:
        """The real text of `token_ids`; ext ids read `ext_table` (a `ValueError` without it), negatives are skipped."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        skip = set(self.all_special_ids) if skip_special_tokens else ()
        text = "".join(self._text_of(idx, ext_table) for idx in token_ids if idx >= 0 and idx not in skip)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def decode_markup(self, token_ids: list[int], ext_table: Mapping[int, str] | None = None) -> str:
        """The original `CPMBeeTokenizer.decode(ids, ext_table)`: markup, ordinary tokens escaped, specials verbatim.

        `encode_markup(decode_markup(ids, table))` gives back `ids` for ids and table that `encode_markup` produced.
        Ext ids read `ext_table` (a `ValueError` without it); negative ids are skipped.
        """
        pieces = []
        for idx in token_ids:
            text = ext_table.get(idx) if ext_table else None
            if text is not None:
                pieces.append(text)
            elif idx >= 0:
                token = self._text_of(idx, ext_table)
                pieces.append(token if _is_special_entry(token) else self.escape(token))
        return "".join(pieces)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write the vocabulary in the released file format (`</n>`, `</_>`, one entry per line, in id order)."""
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        vocab_file = os.path.join(save_directory, name) if os.path.isdir(save_directory) else save_directory
        with open(vocab_file, "w", encoding="utf-8", newline="\n") as writer:
            writer.write("\n".join(_TEXT_SPELLINGS.get(token, token) for _, token in sorted(self.decoder.items())))
        return (vocab_file,)


__all__ = ["CpmBeeTokenizer", "check_vocabulary_matches"]
