"""VisCPM-Chat: BEiT-3 vision tower, image processor and the CPM-Bee chat model."""


def register() -> None:
    """Register VisCPM-Chat (and its BEiT-3 tower) with the transformers Auto classes."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    from ..cpmbee.tokenization_cpmbee import CpmBeeTokenizer
    from .configuration_viscpm_chat import VisCPMChatConfig, VisCPMChatVisionConfig
    from .image_processing_viscpm_chat import VisCPMChatImageProcessor
    from .modeling_beit3 import VisCPMChatVisionModel
    from .modeling_viscpm_chat import VisCPMChatForConditionalGeneration
    from .processing_viscpm_chat import VisCPMChatProcessor

    AutoConfig.register(VisCPMChatConfig.model_type, VisCPMChatConfig, exist_ok=True)
    AutoConfig.register(VisCPMChatVisionConfig.model_type, VisCPMChatVisionConfig, exist_ok=True)
    AutoModel.register(VisCPMChatVisionConfig, VisCPMChatVisionModel, exist_ok=True)
    # `AutoModel` opens the chat model (the mission's door, and how OpenBMB's own hub repos map it): the head adds no
    # weights (it is tied), and `chat()` needs it. The base stays `VisCPMChatModel` / `model.model`.
    AutoModel.register(VisCPMChatConfig, VisCPMChatForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(VisCPMChatConfig, VisCPMChatForConditionalGeneration, exist_ok=True)
    AutoTokenizer.register(VisCPMChatConfig, tokenizer_class=CpmBeeTokenizer, exist_ok=True)
    AutoImageProcessor.register(
        VisCPMChatConfig, image_processor_classes={"pil": VisCPMChatImageProcessor}, exist_ok=True
    )
    AutoProcessor.register(VisCPMChatConfig, VisCPMChatProcessor, exist_ok=True)
