"""Converters from the original OpenBMB checkpoints; the shared streaming / atomic machinery is in ``_io``."""

from ._io import CheckpointError
from .convert_cpmbee import convert_cpmbee

__all__ = ["CheckpointError", "convert_cpmbee"]
