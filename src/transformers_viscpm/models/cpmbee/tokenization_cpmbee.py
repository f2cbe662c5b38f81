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

import os
import re
from collections.abc import Callable, Mapping
from importlib import resources
from operator import itemgetter
from typing import Any

from ahocorasick_rs import AhoCorasick, MatchKind
from transformers.tokenization_python import PreTrainedTokenizer
from transformers.tokenization_utils_base import BatchEncoding, TruncationStrategy
from transformers.utils import PaddingStrategy, TensorType

VOCAB_FILES_NAMES = {"vocab_file": "vocab.txt"}

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

    def __init__(self, vocab_size: int, past_table: Mapping[int, str] | None) -> None:
        self.table: dict[int, str] = dict(past_table) if past_table else {}
        self._ids = {text: idx for idx, text in self.table.items()}
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

    def encode(self, text: str, ids: list[int], ext: _ExtTable) -> None:
        if self.find_unknown(text) is None:  # no unknown run: every character is matched
            self._extend_ids(ids, self.automaton.find_matches_as_strings(text))
            return
        parts = self.split_runs(text)
        at = len(ids)  # `ids` holds no MARK: every id before `at` is final
        self._extend_ids(ids, self.automaton.find_matches_as_strings(self.sentinel.join(parts[0::2])))
        mark, index = self.MARK, ids.index
        for run in parts[1::2]:
            at = index(mark, at)
            ids[at] = ext.id_for(run)

    def _extend_ids(self, ids: list[int], pieces: list[str]) -> None:
        # One `itemgetter` call looks every piece up in C (faster than `map(dict.__getitem__, ...)`).
        if len(pieces) > 1:
            ids.extend(itemgetter(*pieces)(self.lookup))
        elif pieces:
            ids.append(self.lookup[pieces[0]])


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
    `ext_table=`. The tokenizer remembers the table of its most recent encoding in `last_ext_table`, and
    `decode` uses it unless given `ext_table=`, so `tokenizer.decode(tokenizer.encode(text)) == text` and
    streamers work as usual. `convert_tokens_to_ids` has no table: extra tokens map to `<unk>` there.

    `decode` returns the real text; [`~CpmBeeTokenizer.decode_markup`] returns the original's decode output
    (markup). Dicts (CPM-Bee structured prompts) passed to `__call__` go to the structured encoder: the call
    returns the model tensors as a `BatchEncoding` and keeps the per-sample answer bookkeeping in
    `last_sample_infos` (and the first sample's output table in `last_ext_table`, for streamers).

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
        self._piece_list = list(self._pieces)
        self._piece_ids = list(self._pieces.values())
        self._max_piece_len = max(map(len, self._pieces))
        # Built on first use: a `_FastMatcher`, or a plain automaton when the vocabulary does not allow it.
        self._automaton: _FastMatcher | AhoCorasick | None = None
        self.last_ext_table: dict[int, str] = {}
        # Per-sample answer bookkeeping of the most recent dict encoding (see `encoding_cpmbee.CpmBeeSampleInfo`).
        self.last_sample_infos: list = []
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

    # The automaton is a Rust object that cannot be pickled: rebuild it on first use (0.1 s) instead.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_automaton"] = None
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

        Returns the ids and the ext table (a new dict that continues `past_table`, which is left untouched);
        the table is also remembered as `last_ext_table`. Raises `ValueError` on invalid markup.
        """
        ext = _ExtTable(self.vocab_size, past_table)
        ids = self._encode_into(markup, ext, self._encode_text)
        self.last_ext_table = ext.table
        return ids, ext.table

    def _encode_markup_reference(
        self, markup: str, past_table: Mapping[int, str] | None = None
    ) -> tuple[list[int], dict[int, str]]:
        """Pure-Python greedy longest match, kept to cross-check the automaton path (same output, ~10x slower)."""
        ext = _ExtTable(self.vocab_size, past_table)
        return self._encode_into(markup, ext, self._encode_text_reference), ext.table

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

    def _encode_text(self, text: str, ids: list[int], ext: _ExtTable) -> None:
        """Greedy longest match through a leftmost-longest Aho-Corasick automaton over the non-special entries.

        The original, at each position p, takes the longest entry starting at p, or else adds the single
        character at p to the current unknown run and moves to p + 1. Leftmost-longest search from p reports,
        among all entries occurring at or after p, one that starts leftmost, and the longest of those; it then
        resumes at its end. If an entry starts at p, that is the original's choice at p. If the first match
        starts at q > p, no entry starts at p..q-1, so the original also turns p..q-1 into one unknown run and
        then takes the same longest entry at q. By induction both cut the text identically, and the gaps between
        matches are exactly the original's unknown runs. (The original's truncation to the longest vocabulary
        entry never hides a candidate.) Checked id for id against the original on the fixture corpus.

        With the released vocabulary the search runs through `_FastMatcher` (same matches, less work per token);
        a vocabulary it cannot serve gets the plain automaton and the loop over match positions below.
        """
        automaton = self._automaton
        if automaton is None:
            try:
                automaton = self._automaton = _FastMatcher(self._pieces)
            except ValueError:  # a custom vocabulary with a character that is not a piece: positions needed
                automaton = self._automaton = AhoCorasick(self._piece_list, matchkind=MatchKind.LeftmostLongest)
        if type(automaton) is _FastMatcher:
            automaton.encode(text, ids, ext)
            return
        try:
            matches = automaton.find_matches_as_indexes(text)
        except UnicodeEncodeError:  # lone surrogates cannot reach the automaton (UTF-8 only)
            self._encode_text_reference(text, ids, ext)
            return
        piece_ids = self._piece_ids
        pos = 0
        for pattern, start, end in matches:
            if start != pos:
                ids.append(ext.id_for(text[pos:start]))
            ids.append(piece_ids[pattern])
            pos = end
        if pos != len(text):
            ids.append(ext.id_for(text[pos:]))

    def _encode_text_reference(self, text: str, ids: list[int], ext: _ExtTable) -> None:
        pieces, longest = self._pieces, self._max_piece_len
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
                ids.append(ext.id_for(text[unknown_start:pos]))
                unknown_start = -1
            ids.append(idx)
            pos = end
        if unknown_start >= 0:
            ids.append(ext.id_for(text[unknown_start:]))

    # ---------------------------------------------------------------- transformers entry points

    def tokenize(self, text: str, markup: bool = False, **kwargs) -> list[str]:
        """Token strings of `text` (plain text unless `markup=True`); extra tokens are shown as their text."""
        ids, table = self.encode_markup(text if markup else self.escape(text))
        return [table[idx] if idx in table else self.decoder[idx] for idx in ids]

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
    ) -> BatchEncoding:
        """Strings (plain text, or markup with `markup=True`) and id lists; dicts go to the structured encoder.

        All strings of one call share one ext table (continuing `ext_table` if given), kept as `last_ext_table`.
        """
        kwargs.pop("split_special_tokens", None)  # text is never split on added tokens: markup decides specials
        if _is_structured(text):
            from .encoding_cpmbee import encode_structured

            data_list = [text] if isinstance(text, Mapping) else list(text)
            encoding, self.last_sample_infos = encode_structured(
                self, data_list, max_length=max_length, return_tensors=return_tensors, markup=markup, **kwargs
            )
            # Streamers decode generated ids of the first sample through its output table.
            self.last_ext_table = dict(self.last_sample_infos[0].ext_table)
            return encoding
        if is_split_into_words:
            raise ValueError("CpmBeeTokenizer has no word pre-splitting: pass whole strings.")
        if return_offsets_mapping:
            raise NotImplementedError("return_offsets_mapping is not available with CpmBeeTokenizer.")

        ext = _ExtTable(self.vocab_size, ext_table)

        def to_ids(item: Any) -> list[int] | None:
            if item is None:
                return None
            if isinstance(item, str):
                return self._encode_into(item if markup else self.escape(item), ext, self._encode_text)
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
            self.last_ext_table = ext.table
            return self.prepare_for_model(
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
        self.last_ext_table = ext.table
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
        return BatchEncoding(batch_outputs, tensor_type=return_tensors)

    def _convert_token_to_id(self, token: str) -> int:
        return self.encoder.get(token, self.encoder[str(self.unk_token)])

    def _convert_id_to_token(self, index: int) -> str:
        text = self.last_ext_table.get(index)
        if text is None:
            text = self.decoder.get(index, str(self.unk_token))
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
        """The real text of `token_ids`; extra ids read `ext_table` (default: `last_ext_table`), negatives are skipped."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        table = self.last_ext_table if ext_table is None else ext_table
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        unk = str(self.unk_token)
        pieces = []
        for idx in token_ids:
            if idx < 0 or idx in skip:
                continue
            text = table.get(idx)
            pieces.append(text if text is not None else self.decoder.get(idx, unk))
        text = "".join(pieces)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def decode_markup(self, token_ids: list[int], ext_table: Mapping[int, str] | None = None) -> str:
        """The original `CPMBeeTokenizer.decode`: markup, with ordinary tokens escaped and specials verbatim.

        `encode_markup(decode_markup(ids))` gives back `ids` for ids that `encode_markup` produced. Ext ids read
        `ext_table` (default: `last_ext_table`); negative ids are skipped.
        """
        table = self.last_ext_table if ext_table is None else ext_table
        unk = str(self.unk_token)
        pieces = []
        for idx in token_ids:
            text = table.get(idx)
            if text is not None:
                pieces.append(text)
            elif idx >= 0:
                token = self.decoder.get(idx, unk)
                pieces.append(token if _is_special_entry(token) else self.escape(token))
        return "".join(pieces)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write the vocabulary in the released file format (`</n>`, `</_>`, one entry per line, in id order)."""
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        vocab_file = os.path.join(save_directory, name) if os.path.isdir(save_directory) else save_directory
        with open(vocab_file, "w", encoding="utf-8", newline="\n") as writer:
            writer.write("\n".join(_TEXT_SPELLINGS.get(token, token) for _, token in sorted(self.decoder.items())))
        return (vocab_file,)


__all__ = ["CpmBeeTokenizer"]
