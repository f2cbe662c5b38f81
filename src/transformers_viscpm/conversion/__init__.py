"""Converters from the original OpenBMB checkpoints; the shared streaming / atomic machinery is in ``_io``."""

from collections.abc import Callable, Sequence

from ._io import CheckpointError, verify_checksums
from .convert_cpmbee import convert_cpmbee
from .convert_cpmbee import main as _cpmbee_main
from .convert_viscpm_chat import convert_viscpm_chat
from .convert_viscpm_chat import main as _chat_main
from .convert_viscpm_paint import convert_viscpm_paint
from .convert_viscpm_paint import main as _paint_main

# `viscpm convert KIND ...` and `conversion/convert_*.py` run the same entry points.
CONVERTER_MAINS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "cpmbee": _cpmbee_main,
    "chat": _chat_main,
    "paint": _paint_main,
}

__all__ = [
    "CONVERTER_MAINS",
    "CheckpointError",
    "convert_cpmbee",
    "convert_viscpm_chat",
    "convert_viscpm_paint",
    "verify_checksums",
]
