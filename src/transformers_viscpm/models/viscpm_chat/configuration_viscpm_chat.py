"""Configurations of VisCPM-Chat: the BEiT-3 vision tower and the full chat model."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.utils.type_validators import interval

from ..cpmbee.configuration_cpmbee import CpmBeeConfig, positive_int


@strict
class VisCPMChatVisionConfig(PreTrainedConfig):
    r"""
    Configuration of [`VisCPMChatVisionModel`], the BEiT-3 encoder that VisCPM-Chat runs on an image and its
    learned queries. The defaults are `beit3_large_patch16_224` as VisCPM builds it (torchscale 0.2.0
    `EncoderConfig` with `multiway=True`, `subln=True`, `normalize_output=True`).

    The torchscale switches VisCPM never changes are not options here: every layer is multiway (image tokens
    use the "A" experts, queries the "B" experts), pre-LN with sub-LN (`inner_attn_ln` before the attention
    output projection, `ffn_layernorm` before `fc2`), no embedding layer norm or scaling, a multiway final layer
    norm, learned absolute positions starting at index 2 on both sides, no relative position bias.

    Args:
        image_size (`int`, *optional*, defaults to 224):
            Side of the square input image.
        patch_size (`int`, *optional*, defaults to 16):
            Side of the square patches.
        num_channels (`int`, *optional*, defaults to 3):
            Number of input channels.
        hidden_size (`int`, *optional*, defaults to 1024):
            Width of the encoder (torchscale `encoder_embed_dim`).
        num_hidden_layers (`int`, *optional*, defaults to 24):
            Number of encoder layers.
        num_attention_heads (`int`, *optional*, defaults to 16):
            Number of attention heads.
        intermediate_size (`int`, *optional*, defaults to 4096):
            Width of the feed-forward networks (torchscale `encoder_ffn_embed_dim`).
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Feed-forward activation; torchscale uses the exact (erf) GELU, evaluated in fp32.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of every layer norm.
        max_text_positions (`int`, *optional*, defaults to 1024):
            Rows of the text-side ("B") position table (torchscale `max_source_positions`); the queries take rows
            2 .. num_queries + 1, so at most `max_text_positions - 2` queries fit.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation (and truncation bound) of the linear layers' initial weights.
    """

    model_type = "viscpm_chat_vision"
    base_config_key = "vision_config"

    image_size: int = positive_int(default=224)
    patch_size: int = positive_int(default=16)
    num_channels: int = positive_int(default=3)
    hidden_size: int = positive_int(default=1024)
    num_hidden_layers: int = positive_int(default=24)
    num_attention_heads: int = positive_int(default=16)
    intermediate_size: int = positive_int(default=4096)
    hidden_act: str = "gelu"
    layer_norm_eps: float = interval(min=0, exclude_min=True)(default=1e-5)
    max_text_positions: int = positive_int(default=1024)
    initializer_range: float = interval(min=0)(default=0.02)

    def validate_architecture(self):
        """Part of `@strict` validation: the shapes must tile."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size}).")

    @property
    def num_image_tokens(self) -> int:
        """The class token plus one token per patch: where the multiway split falls (197 for VisCPM)."""
        return (self.image_size // self.patch_size) ** 2 + 1


@strict
class VisCPMChatConfig(PreTrainedConfig):
    r"""
    Configuration of [`VisCPMChatModel`] / [`VisCPMChatForConditionalGeneration`]: a BEiT-3 vision tower that encodes
    an image together with `query_num` learned queries, a Linear-GELU-Linear `mapping` from the vision width to the
    language model width, and CPM-Bee, whose `"image"` prompt segment holds one `<unk>` placeholder per query. The
    defaults are the released VisCPM-Chat shapes (BEiT-3 large, CPM-Bee 10B, 64 queries).

    Args:
        vision_config (`VisCPMChatVisionConfig` or `dict`, *optional*):
            The BEiT-3 vision tower (default: `beit3_large_patch16_224`).
        text_config (`CpmBeeConfig` or `dict`, *optional*):
            The CPM-Bee language model (default: the released 10B configuration).
        query_num (`int`, *optional*, defaults to 64):
            Number of learned queries, hence of image features and of `<unk>` placeholders in the prompt.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation (and truncation bound) of freshly initialised queries, as VisCPM draws them.
    """

    model_type = "viscpm_chat"
    sub_configs_defaults = {"vision_config": VisCPMChatVisionConfig, "text_config": CpmBeeConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    query_num: int = positive_int(default=64)
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def validate_architecture(self):
        """Part of `@strict` validation: the queries must fit the vision tower's text-side position table."""
        if not 0 < self.query_num <= self.vision_config.max_text_positions - 2:
            raise ValueError(
                f"query_num ({self.query_num}) must be in 1..{self.vision_config.max_text_positions - 2} "
                "(vision_config.max_text_positions - 2)."
            )


__all__ = ["VisCPMChatConfig", "VisCPMChatVisionConfig"]
