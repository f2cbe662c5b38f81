"""The pure-Python encoding path of `CpmBeeTokenizer`, kept here to cross-check the automaton paths (same output,
~10x slower); the package keeps only the text loop it falls back to (`_encode_text_reference`)."""

from __future__ import annotations

from collections.abc import Mapping

from transformers_viscpm.models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer, _ExtTable


def encode_markup_reference(
    tok: CpmBeeTokenizer, markup: str, past_table: Mapping[int, str] | None = None
) -> tuple[list[int], dict[int, str]]:
    """`tok.encode_markup(markup, past_table)` through the original's loop in pure Python."""
    ext = _ExtTable(tok.vocab_size, past_table)
    return tok._encode_into(markup, ext, tok._encode_text_reference), ext.table
