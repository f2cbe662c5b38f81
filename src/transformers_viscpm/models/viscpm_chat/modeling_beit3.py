"""The BEiT-3 vision tower of VisCPM-Chat, a pure-torch port of torchscale 0.2.0's multiway encoder.

VisCPM runs BEiT-3 on `[cls, patches..., queries...]`: the image tokens go through the "A" (vision) experts, the
learned queries through the "B" (language) experts of every projection, layer norm and feed-forward network, while
attention mixes both. Only the query outputs are returned; VisCPM-Chat maps them into the language model.

Parameter names follow the original checkpoint, so `vpm.beit3.<name>` maps to `<name>` here. Not used at
inference, hence absent: `vpm.beit3.text_embed.weight` (it only seeded the queries before training),
`vpm.beit3.vision_embed.mask_token` (masked image modelling) and `vpm.mim_head.*`.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_viscpm_chat import VisCPMChatVisionConfig

# torchscale reads both position tables from index 2 on (fairseq's padding convention).
POSITION_OFFSET = 2


class VisCPMChatVisionMultiway(nn.Module):
    """Two experts of the same shape: "A" for the image tokens, "B" for the tokens after `split_position`."""

    def __init__(self, make_expert: Callable[[], nn.Module]):
        super().__init__()
        self.A = make_expert()
        self.B = make_expert()

    def forward(self, hidden_states: torch.Tensor, split_position: int) -> torch.Tensor:
        image_part = self.A(hidden_states[:, :split_position])
        query_part = self.B(hidden_states[:, split_position:])
        return torch.cat([image_part, query_part], dim=1)


class VisCPMChatVisionEmbeddings(nn.Module):
    """Non-overlapping patch projection with a prepended class token."""

    def __init__(self, config: VisCPMChatVisionConfig):
        super().__init__()
        self.image_size = config.image_size
        self.proj = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values must be (batch, {self.proj.in_channels}, {self.image_size}, {self.image_size}), "
                f"got {tuple(pixel_values.shape)}."
            )
        patches = self.proj(pixel_values.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)


class VisCPMChatVisionPositionEmbeddings(nn.Module):
    """Learned absolute positions: table "A" for the image tokens, "B" for the queries, both from index 2."""

    def __init__(self, config: VisCPMChatVisionConfig):
        super().__init__()
        self.A = nn.Embedding(config.num_image_tokens + POSITION_OFFSET, config.hidden_size)
        self.B = nn.Embedding(config.max_text_positions, config.hidden_size)

    def forward(self, num_queries: int, device: torch.device) -> torch.Tensor:
        if num_queries + POSITION_OFFSET > self.B.num_embeddings:
            raise ValueError(
                f"{num_queries} queries need {num_queries + POSITION_OFFSET} text positions, the table has "
                f"{self.B.num_embeddings} (config.max_text_positions)."
            )
        # Looked up through the tables' forward, not sliced from `.weight`: offloaded tables load in their hooks.
        image_positions = self.A(torch.arange(POSITION_OFFSET, self.A.num_embeddings, device=device))
        query_positions = self.B(torch.arange(POSITION_OFFSET, POSITION_OFFSET + num_queries, device=device))
        return torch.cat([image_positions, query_positions], dim=0)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchscale's order of operations: scale the queries, then the dot products, softmax in fp32."""
    attn_weights = torch.matmul(query * scaling, key.transpose(-1, -2))
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class VisCPMChatVisionAttention(nn.Module):
    """Bidirectional multi-head self-attention with multiway projections and a sub-LN before `out_proj`."""

    def __init__(self, config: VisCPMChatVisionConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        dim = config.hidden_size
        self.q_proj = VisCPMChatVisionMultiway(lambda: nn.Linear(dim, dim))
        self.k_proj = VisCPMChatVisionMultiway(lambda: nn.Linear(dim, dim))
        self.v_proj = VisCPMChatVisionMultiway(lambda: nn.Linear(dim, dim))
        self.out_proj = VisCPMChatVisionMultiway(lambda: nn.Linear(dim, dim))
        self.inner_attn_ln = VisCPMChatVisionMultiway(lambda: nn.LayerNorm(dim, eps=config.layer_norm_eps))

    def forward(
        self, hidden_states: torch.Tensor, split_position: int, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len = hidden_states.shape[:2]
        hidden_shape = (batch_size, seq_len, -1, self.head_dim)
        query = self.q_proj(hidden_states, split_position).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states, split_position).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states, split_position).view(hidden_shape).transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self, query, key, value, None, scaling=self.scaling, dropout=0.0, is_causal=False, **kwargs
        )
        attn_output = attn_output.reshape(batch_size, seq_len, -1).contiguous()
        attn_output = self.inner_attn_ln(attn_output, split_position)
        return self.out_proj(attn_output, split_position), attn_weights


class VisCPMChatVisionFeedForward(nn.Module):
    """fc1 -> GELU (in fp32) -> sub-LN -> fc2."""

    def __init__(self, config: VisCPMChatVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.ffn_layernorm = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        hidden_states = self.activation_fn(hidden_states.float()).type_as(hidden_states)
        hidden_states = self.ffn_layernorm(hidden_states)
        return self.fc2(hidden_states)


class VisCPMChatVisionEncoderLayer(GradientCheckpointingLayer):
    """Pre-LN transformer layer whose every norm and expert is multiway."""

    def __init__(self, config: VisCPMChatVisionConfig):
        super().__init__()
        dim = config.hidden_size
        self.self_attn = VisCPMChatVisionAttention(config)
        self.self_attn_layer_norm = VisCPMChatVisionMultiway(lambda: nn.LayerNorm(dim, eps=config.layer_norm_eps))
        self.ffn = VisCPMChatVisionMultiway(lambda: VisCPMChatVisionFeedForward(config))
        self.final_layer_norm = VisCPMChatVisionMultiway(lambda: nn.LayerNorm(dim, eps=config.layer_norm_eps))

    def forward(
        self, hidden_states: torch.Tensor, split_position: int, **kwargs: Unpack[TransformersKwargs]
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.self_attn_layer_norm(hidden_states, split_position)
        hidden_states, _ = self.self_attn(hidden_states, split_position, **kwargs)
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.final_layer_norm(hidden_states, split_position)
        hidden_states = self.ffn(hidden_states, split_position)
        return residual + hidden_states


class VisCPMChatVisionEncoder(nn.Module):
    """Positions, the layer stack and the multiway output layer norm (torchscale's `Encoder`)."""

    def __init__(self, config: VisCPMChatVisionConfig):
        super().__init__()
        self.embed_positions = VisCPMChatVisionPositionEmbeddings(config)
        self.layers = nn.ModuleList([VisCPMChatVisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.layer_norm = VisCPMChatVisionMultiway(lambda: nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps))

    def forward(
        self, inputs_embeds: torch.Tensor, split_position: int, **kwargs: Unpack[TransformersKwargs]
    ) -> torch.Tensor:
        num_queries = inputs_embeds.shape[1] - split_position
        hidden_states = inputs_embeds + self.embed_positions(num_queries, inputs_embeds.device).to(inputs_embeds.dtype)
        for layer in self.layers:
            hidden_states = layer(hidden_states, split_position, **kwargs)
        return self.layer_norm(hidden_states, split_position)


class VisCPMChatVisionPreTrainedModel(PreTrainedModel):
    config: VisCPMChatVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["VisCPMChatVisionEmbeddings", "VisCPMChatVisionEncoderLayer"]
    _supports_sdpa = True
    _can_record_outputs = {
        "hidden_states": VisCPMChatVisionEncoderLayer,
        "attentions": VisCPMChatVisionAttention,
    }

    def _init_weights(self, module: nn.Module) -> None:
        """VisCPM's `BEiT3Wrapper._init_weights` (truncated-normal linears cut at one std, unit layer norms);
        the patch projection is drawn like the linears, the position tables like torch's default embedding."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std, a=-std, b=std)
            init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, VisCPMChatVisionEmbeddings):
            init.zeros_(module.cls_token)


class VisCPMChatVisionModel(VisCPMChatVisionPreTrainedModel):
    """BEiT-3 encoding an image together with learned queries; returns the query outputs."""

    def __init__(self, config: VisCPMChatVisionConfig):
        super().__init__(config)
        self.vision_embed = VisCPMChatVisionEmbeddings(config)
        self.encoder = VisCPMChatVisionEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_embed.proj

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor,
        query_embeds: torch.Tensor,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutput:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, num_channels, image_size, image_size)`):
                Normalised images, e.g. from [`VisCPMChatImageProcessor`]; cast to the model's dtype.
            query_embeds (`torch.Tensor` of shape `(num_queries, hidden_size)` or `(batch_size, num_queries, hidden_size)`):
                The learned queries appended after the image tokens (VisCPM-Chat's `query` parameter); a 2-D
                tensor is shared by the whole batch.

        Returns:
            [`BaseModelOutput`] whose `last_hidden_state` holds the query outputs, `(batch_size, num_queries,
            hidden_size)`. `hidden_states` / `attentions`, when asked for, cover the whole sequence (image tokens
            then queries).
        """
        image_tokens = self.vision_embed(pixel_values)
        batch_size, split_position = image_tokens.shape[:2]
        if query_embeds.dim() == 2:
            query_embeds = query_embeds.unsqueeze(0).expand(batch_size, -1, -1)
        hidden_size = self.config.hidden_size
        if query_embeds.dim() != 3 or query_embeds.shape[0] != batch_size or query_embeds.shape[-1] != hidden_size:
            raise ValueError(
                f"query_embeds must be (num_queries, {hidden_size}) or ({batch_size}, num_queries, {hidden_size}), "
                f"got {tuple(query_embeds.shape)}."
            )
        inputs_embeds = torch.cat([image_tokens, query_embeds.to(image_tokens.dtype)], dim=1)
        hidden_states = self.encoder(inputs_embeds, split_position, **kwargs)
        return BaseModelOutput(last_hidden_state=hidden_states[:, split_position:])


__all__ = ["VisCPMChatVisionModel", "VisCPMChatVisionPreTrainedModel"]
