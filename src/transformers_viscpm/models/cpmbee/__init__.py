"""CPM-Bee: tokenizer, structured-input encoder, language model."""


def register() -> None:
    """Register CPM-Bee with the transformers Auto classes (`exist_ok`: registration may run twice)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .configuration_cpmbee import CpmBeeConfig
    from .modeling_cpmbee import CpmBeeForCausalLM, CpmBeeModel
    from .tokenization_cpmbee import CpmBeeTokenizer

    AutoConfig.register(CpmBeeConfig.model_type, CpmBeeConfig, exist_ok=True)
    AutoTokenizer.register(CpmBeeConfig, tokenizer_class=CpmBeeTokenizer, exist_ok=True)
    AutoModel.register(CpmBeeConfig, CpmBeeModel, exist_ok=True)
    AutoModelForCausalLM.register(CpmBeeConfig, CpmBeeForCausalLM, exist_ok=True)
