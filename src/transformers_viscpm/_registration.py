"""The one place that wires our classes into the transformers / diffusers Auto machinery."""

from __future__ import annotations

_DONE = False


def register_all() -> None:
    """Register every model family once; calling it again is a no-op."""
    global _DONE
    if _DONE:
        return
    from .models.cpmbee import register as register_cpmbee
    from .models.viscpm_chat import register as register_chat
    from .pipelines.viscpm_paint import register as register_paint
    from .training import register_peft_defaults

    register_cpmbee()
    register_chat()
    register_paint()
    register_peft_defaults()
    _DONE = True
