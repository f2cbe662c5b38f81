"""The pure-Python encoding path of `CpmBeeTokenizer`, kept here to cross-check the matchers (same output, ~100x
slower); the package keeps only the text loop the automaton route falls back to (`encode_longest_match`)."""

from __future__ import annotations

import weakref
from collections.abc import Mapping

from transformers_viscpm.models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer, _ExtTable, encode_longest_match


def encode_markup_reference(
    tok: CpmBeeTokenizer, markup: str, past_table: Mapping[int, str] | None = None
) -> tuple[list[int], dict[int, str]]:
    """`tok.encode_markup(markup, past_table)` through the original's loop in pure Python."""
    ext = _ExtTable(tok.vocab_size, past_table)
    longest = _longest_piece(tok)

    def encode_text(text: str, ids: list[int], ext: _ExtTable) -> None:
        encode_longest_match(tok._pieces, longest, text, ids, ext.id_for)

    return tok._encode_into(markup, ext, encode_text), ext.table


_LONGEST: weakref.WeakKeyDictionary[CpmBeeTokenizer, int] = weakref.WeakKeyDictionary()


def _longest_piece(tok: CpmBeeTokenizer) -> int:
    if tok not in _LONGEST:
        _LONGEST[tok] = max(map(len, tok._pieces))
    return _LONGEST[tok]
