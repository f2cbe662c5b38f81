"""VisCPM (Chat and Paint) and CPM-Bee for transformers and diffusers.

Importing this package registers every configuration, tokenizer, model, processor and pipeline with the
transformers Auto classes and with diffusers, so that ``AutoModel.from_pretrained("openbmb/VisCPM-Chat")``
and ``DiffusionPipeline.from_pretrained("openbmb/VisCPM-Paint")`` resolve to the classes defined here.
Registration is idempotent and executes no model code.

The public classes are imported on first use (PEP 562). The one exception to registering at import is the
``viscpm`` command itself (the console script or ``python -m transformers_viscpm``): it registers in the
commands that load models, so that ``viscpm --help`` and argument errors answer without importing torch.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from ._registration import register_all

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "CpmBeeConfig": ".models.cpmbee.configuration_cpmbee",
    "CpmBeeForCausalLM": ".models.cpmbee.modeling_cpmbee",
    "CpmBeeModel": ".models.cpmbee.modeling_cpmbee",
    "CpmBeeTextGenerationPipeline": ".pipelines.text_generation_cpmbee",
    "CpmBeeTokenizer": ".models.cpmbee.tokenization_cpmbee",
    "VisCPMChatConfig": ".models.viscpm_chat.configuration_viscpm_chat",
    "VisCPMChatForConditionalGeneration": ".models.viscpm_chat.modeling_viscpm_chat",
    "VisCPMChatImageProcessor": ".models.viscpm_chat.image_processing_viscpm_chat",
    "VisCPMChatModel": ".models.viscpm_chat.modeling_viscpm_chat",
    "VisCPMChatProcessor": ".models.viscpm_chat.processing_viscpm_chat",
    "VisCPMChatVisionConfig": ".models.viscpm_chat.configuration_viscpm_chat",
    "VisCPMPaintPipeline": ".pipelines.viscpm_paint",
    "VisCPMPaintTextEncoder": ".pipelines.viscpm_paint",
    "VisCPMPaintTextEncoderConfig": ".pipelines.viscpm_paint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def _launched_as_cli() -> bool:
    """Whether this process is the `viscpm` command: its console script, or `python ... -m transformers_viscpm`."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    as_module = "-m" in argv and argv[argv.index("-m") + 1 : argv.index("-m") + 2] == [__name__]
    return as_module or Path(sys.argv[0]).stem == "viscpm"


if not _launched_as_cli():
    register_all()
