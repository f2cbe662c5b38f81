"""VisCPM (Chat and Paint) and CPM-Bee for transformers and diffusers.

Importing this package registers every configuration, tokenizer, model, processor and pipeline with the
transformers Auto classes and with diffusers, so that ``AutoModel.from_pretrained("openbmb/VisCPM-Chat")``
and ``DiffusionPipeline.from_pretrained("openbmb/VisCPM-Paint")`` resolve to the classes defined here.
Registration is idempotent and executes no model code.
"""

from ._registration import register_all
from .models.cpmbee.configuration_cpmbee import CpmBeeConfig
from .models.cpmbee.modeling_cpmbee import CpmBeeForCausalLM, CpmBeeModel
from .models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer
from .models.viscpm_chat.configuration_viscpm_chat import VisCPMChatConfig, VisCPMChatVisionConfig
from .models.viscpm_chat.image_processing_viscpm_chat import VisCPMChatImageProcessor
from .models.viscpm_chat.modeling_viscpm_chat import VisCPMChatForConditionalGeneration, VisCPMChatModel
from .models.viscpm_chat.processing_viscpm_chat import VisCPMChatProcessor
from .pipelines.text_generation_cpmbee import CpmBeeTextGenerationPipeline
from .pipelines.viscpm_paint import VisCPMPaintPipeline, VisCPMPaintTextEncoder, VisCPMPaintTextEncoderConfig

__version__ = "0.1.0"

__all__ = [
    "CpmBeeConfig",
    "CpmBeeForCausalLM",
    "CpmBeeModel",
    "CpmBeeTextGenerationPipeline",
    "CpmBeeTokenizer",
    "VisCPMChatConfig",
    "VisCPMChatForConditionalGeneration",
    "VisCPMChatImageProcessor",
    "VisCPMChatModel",
    "VisCPMChatProcessor",
    "VisCPMChatVisionConfig",
    "VisCPMPaintPipeline",
    "VisCPMPaintTextEncoder",
    "VisCPMPaintTextEncoderConfig",
]

register_all()
