"""PyTorch CPM-Bee, the language model shared by VisCPM-Chat and VisCPM-Paint.

The maths follows the original (VisCPM `models/cpmbee.py` and `models/modules/*`): bias-free linears that divide by
`sqrt(fan_in)`, RMSNorm in fp32, gated-GELU FFN, residuals `(h + x) / 1.05`, token embeddings divided by
`sqrt(dim_model)` and rotated by their sub-id, a bucketed relative-position bias shared by all layers, and logits
over the vocabulary followed by the batch ext table.

Token structure (how a structured CPM-Bee prompt becomes masks and position buckets) is handled by ONE function,
`cpmbee_attention_layout`, for prefill and incremental decoding alike.
"""

import math
from collections.abc import Callable, Mapping
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from ...quantization import memory_footprint
from .configuration_cpmbee import CpmBeeConfig
from .generation_cpmbee import CpmBeeGenerationMixin
from .kernels_cpmbee import measured_linear
from .structure_cpmbee import (
    EXT_TABLE_KEYS,
    GENERATION_KEYS,
    SEEN_TOKEN_KEYS,
    STRUCTURE_KEYS,
    CpmBeeInputKwargs,
    CpmBeeStructureKwargs,
    pop_keys,
)


class CpmBeeModelKwargs(CpmBeeStructureKwargs, TransformersKwargs, total=False):
    """Keyword arguments of [`CpmBeeModel.forward`]: the token structure and the stock transformers ones."""


class CpmBeeCausalLMKwargs(CpmBeeInputKwargs, TransformersKwargs, total=False):
    """Keyword arguments of [`CpmBeeForCausalLM.forward`]: every tensor of an encoding and the stock ones."""


# Sub-ids rotate embeddings with the original's rotary table: base 10000, distance scale 16.
_ROTARY_BASE = 10000
_ROTARY_DISTANCE_SCALE = 16


def rotate_by_sub_ids(embeds: torch.Tensor, sub_ids: torch.Tensor) -> torch.Tensor:
    """Rotate `embeds` (..., dim) by `sub_ids` (...) over the whole hidden size, like the original `EmbeddingExt`.

    The angle is computed in the dtype of `embeds`, as the original does (plain in fp32, lossy in fp16).
    """
    dim = embeds.shape[-1]
    inv_freq = 1.0 / (_ROTARY_BASE ** (torch.arange(0, dim, 2, dtype=torch.float32, device=embeds.device) / dim))
    freqs = (sub_ids * _ROTARY_DISTANCE_SCALE)[..., None].to(embeds.dtype) * inv_freq.to(embeds.dtype)
    cos, sin = freqs.cos(), freqs.sin()
    rotated = torch.cat((-embeds[..., dim // 2 :], embeds[..., : dim // 2]), dim=-1)
    return embeds * torch.cat((cos, cos), dim=-1) + rotated * torch.cat((sin, sin), dim=-1)


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5-style buckets: exact below `num_buckets // 4`, log-spaced up to `max_distance`."""
    num_buckets //= 2
    buckets = (relative_position > 0).to(torch.long) * num_buckets
    relative_position = relative_position.abs()
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    # Clamped below at `max_exact`: the log branch is only selected there, and log(0) would be -inf.
    log_ratio = torch.log(relative_position.clamp(min=max_exact).float() / max_exact)
    if_large = max_exact + (log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact)).to(torch.long)
    if_large = if_large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, relative_position.to(torch.long), if_large)


def _distance_bucket_table(num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """`relative_position_bucket` of every distance in [-max_distance, max_distance]."""
    distances = torch.arange(-max_distance, max_distance + 1, device=device)
    return relative_position_bucket(distances, num_buckets, max_distance)


_cached_distance_bucket_table = lru_cache(maxsize=16)(_distance_bucket_table)


def _distance_buckets(num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """The bucket table, computed once per device in eager mode (recomputing it took 0.1 ms of each decoding step);
    a compiled graph computes it itself (dynamo would trace through the cache anyway, and warn)."""
    if torch.compiler.is_compiling():
        return _distance_bucket_table(num_buckets, max_distance, device)
    return _cached_distance_bucket_table(num_buckets, max_distance, device)


def cpmbee_attention_layout(
    key_valid: torch.Tensor,
    query_length: int,
    num_buckets: int,
    max_distance: int,
    position_ids: torch.Tensor,
    query_start: int | torch.Tensor | None = None,
    **structure: Unpack[CpmBeeStructureKwargs],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one home of CPM-Bee's attention masks and position buckets.

    `position_ids` and every tensor of the token structure (all of [`CpmBeeTokenStructureKwargs`], and
    `segment_rel`) are `(batch, K)` over all the tokens attention can see (cached ones first); the queries are the
    `query_length` tokens from `query_start` on (default: the last ones). `query_start` may be a 0-d tensor (a
    static cache's length: every slot is a key, and no host synchronisation is needed to find the queries).
    Returns `(buckets, mask, query_valid)`:

    - `buckets` `(batch, q, K)`: rows of the position-bias table. Inside one segment of one sample, the bidirectional
      relative-position bucket of `position_k - position_q`; across segments, `num_buckets + rel - 1` where `rel` is
      the segment relation `segment_rel[seg_q * num_segments_q + seg_k + segment_rel_offset_q]`; across in-context
      samples, `num_buckets` (relation 1).
    - `mask` `(batch, q, K)` bool: a context key is seen by every query; a non-context query also sees the earlier
      non-context keys (sequence order, which equals the original's position order on every input it builds);
      a query in in-context sample `s > 0` only sees sample `s`; padding (`key_valid` False) is never seen.
    - `query_valid` `(batch, q)` bool: real query tokens. Padding rows see nothing: the original zeroes their
      attention output, and so do we.
    """
    batch, total_length = position_ids.shape
    device = position_ids.device
    if query_start is None:
        query_start = total_length - query_length
    if isinstance(query_start, int):
        query = slice(query_start, query_start + query_length)
    else:
        query = query_start + torch.arange(query_length, device=device)
    context, sample_ids, segment_rel = structure["context"], structure["sample_ids"], structure["segment_rel"]
    segment_ids, num_segments = structure["segment_ids"], structure["num_segments"]
    segment_rel_offset = structure["segment_rel_offset"]

    def as_query(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[:, query, None]

    def as_key(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[:, None, :]

    # Inside a segment: position buckets, looked up in a table over the distances; they saturate at `max_distance`.
    distance_buckets = _distance_buckets(num_buckets, max_distance, device)
    relative = as_key(position_ids).long() - as_query(position_ids).long()
    inner_buckets = distance_buckets[relative.clamp_(-max_distance, max_distance).add_(max_distance)]
    # Across segments: relation r > 0 is bucket `num_buckets + r - 1`; r == 0 (same segment) is marked -1.
    relation_buckets = torch.where(segment_rel == 0, -1, segment_rel.long() - 1 + num_buckets)
    rel_index = (as_query(segment_ids) * as_query(num_segments) + as_query(segment_rel_offset)).long()
    # Clamping only alters pairs from different samples, which take bucket `num_buckets` below anyway.
    rel_index = (rel_index + as_key(segment_ids).long()).clamp_(0, segment_rel.shape[1] - 1)
    relation = torch.gather(relation_buckets, 1, rel_index.view(batch, -1)).view(rel_index.shape)
    same_sample = as_query(sample_ids) == as_key(sample_ids)
    buckets = torch.where(same_sample, torch.where(relation < 0, inner_buckets, relation), num_buckets)

    order = torch.arange(total_length, device=device)
    earlier = order[None, None, :] <= order[query][None, :, None]
    context = context.to(torch.bool)
    mask = (earlier & as_query(~context) & as_key(key_valid)) | as_key(context & key_valid)
    mask &= same_sample | as_query(sample_ids == 0)
    query_valid = key_valid[:, query]
    mask &= query_valid[:, :, None]
    return buckets, mask, query_valid


def check_labels_follow_answers(labels: torch.Tensor, context: torch.Tensor | None) -> None:
    """CPM-Bee predicts only from answer (non-context) positions: a context token sees the whole prompt, so a label
    after one (`labels=input_ids` on a prompt encoding) would train on a leaked target. Encode the answer in `<ans>`
    instead; the encoding then holds the right `labels`."""
    if context is None:
        return
    prompt = context[:, -labels.shape[1] :][:, :-1].to(labels.device)
    if bool(((labels[:, 1:] != -100) & prompt).any()):
        raise ValueError(
            "labels set after context (prompt) tokens: CPM-Bee only learns answers. Fill the answer into the prompt's "
            '"<ans>" (e.g. {"input": ..., "<ans>": "the answer"}) and train on the `labels` of that encoding.'
        )


class CpmBeeRMSNorm(nn.Module):
    """RMSNorm whose statistics are computed in fp32 whatever the weight dtype (as the original)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(hidden_states.float(), self.weight.shape, eps=self.variance_epsilon)
        return normed.to(hidden_states.dtype) * self.weight

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class CpmBeeBucketPositionBias(nn.Module):
    """Learned per-head bias for each bucket of `cpmbee_attention_layout`, shared by all layers."""

    def __init__(self, config: CpmBeeConfig) -> None:
        super().__init__()
        self.relative_attention_bias = nn.Parameter(
            torch.empty(config.position_bias_num_buckets + config.position_bias_num_segment_buckets, config.num_heads)
        )

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """`(batch, q, k)` bucket ids -> `(batch, heads, q, k)` bias (contiguous for a batch of one)."""
        batch, query_length, key_length = buckets.shape
        bias = self.relative_attention_bias.t().index_select(1, buckets.reshape(-1))
        return bias.view(-1, batch, query_length, key_length).transpose(0, 1)


def cpmbee_eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    query_valid: torch.Tensor | None = None,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with CPM-Bee's additive float bias (position bias plus masking).

    Rows of padding queries (`query_valid` `(B, q)` False) are zeroed before the value product, so the returned
    weights are the ones used (they stay on the autograd graph) and those rows' outputs are 0, as in the original.
    """
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if query_valid is not None:
        attn_weights = attn_weights * query_valid[:, None, :, None].to(attn_weights.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _slow_sdpa_case(query: torch.Tensor) -> bool:
    """One bf16/fp16 query on CPU (a decoding step): PyTorch's CPU SDPA kernels take 4-5x longer there than the two
    matmuls of the eager path (350 vs 75 us over 1,024 keys, 8 heads of 64), which made decoding slow down with the
    prompt length. The eager path computes the same softmax attention."""
    return query.device.type == "cpu" and query.shape[2] == 1 and query.dtype in (torch.bfloat16, torch.float16)


class CpmBeeAttention(nn.Module):
    """Multi-head self-attention; every projection divides by `sqrt(fan_in)` after the matmul."""

    def __init__(self, config: CpmBeeConfig, cache_idx: int) -> None:
        super().__init__()
        self.config = config
        self.cache_idx = cache_idx
        self.num_heads = config.num_heads
        self.head_dim = config.dim_head
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        inner_dim = config.num_heads * config.dim_head
        self.project_q = nn.Linear(config.dim_model, inner_dim, bias=False)
        self.project_k = nn.Linear(config.dim_model, inner_dim, bias=False)
        self.project_v = nn.Linear(config.dim_model, inner_dim, bias=False)
        self.attention_out = nn.Linear(inner_dim, config.dim_model, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor,
        query_valid: torch.Tensor,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length = hidden_states.shape[:2]
        in_scale = math.sqrt(self.config.dim_model)
        # `-1` heads: under tensor parallelism the projections hold only this rank's heads.
        hidden_shape = (batch, length, -1, self.head_dim)
        query_states = measured_linear(self.project_q, hidden_states).div_(in_scale).view(hidden_shape).transpose(1, 2)
        key_states = measured_linear(self.project_k, hidden_states).div_(in_scale).view(hidden_shape).transpose(1, 2)
        value_states = measured_linear(self.project_v, hidden_states).div_(in_scale).view(hidden_shape).transpose(1, 2)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.cache_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, cpmbee_eager_attention_forward
        )
        if self.config._attn_implementation == "sdpa" and _slow_sdpa_case(query_states):
            attention_interface = cpmbee_eager_attention_forward
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_bias,
            dropout=self.config.dropout_p if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
            query_valid=query_valid,
            **kwargs,
        )
        # Padding queries attend to nothing (the original zeroes their output); kernels other than the eager one do
        # not know `query_valid`. A product, not a branch on the data: every step keeps the same graph.
        attn_output = attn_output * query_valid[:, :, None, None].to(attn_output.dtype)
        attn_output = attn_output.reshape(batch, length, -1)
        attn_output = measured_linear(self.attention_out, attn_output).div_(math.sqrt(self.num_heads * self.head_dim))
        return attn_output, attn_weights


class CpmBeeSelfAttentionBlock(nn.Module):
    def __init__(self, config: CpmBeeConfig, cache_idx: int) -> None:
        super().__init__()
        self.layernorm_before_attention = CpmBeeRMSNorm(config.dim_model, eps=config.eps)
        self.self_attention = CpmBeeAttention(config, cache_idx)
        self.dropout_p = config.dropout_p

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor,
        query_valid: torch.Tensor,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        x = self.layernorm_before_attention(hidden_states)
        x, _ = self.self_attention(x, attention_bias, query_valid, cache=cache, **kwargs)
        x = F.dropout(x, p=self.dropout_p, training=self.training)
        return (hidden_states + x) / 1.05


class CpmBeeDenseGatedACT(nn.Module):
    def __init__(self, config: CpmBeeConfig) -> None:
        super().__init__()
        self.w_0 = nn.Linear(config.dim_model, config.dim_ff, bias=False)
        self.w_1 = nn.Linear(config.dim_model, config.dim_ff, bias=False)
        self.act = nn.GELU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        scale = math.sqrt(hidden_states.shape[-1])
        gate = self.act(measured_linear(self.w_0, hidden_states).div_(scale))
        return gate.mul_(measured_linear(self.w_1, hidden_states).div_(scale))


class CpmBeeFeedForward(nn.Module):
    def __init__(self, config: CpmBeeConfig) -> None:
        super().__init__()
        self.w_in = CpmBeeDenseGatedACT(config)
        self.w_out = nn.Linear(config.dim_ff, config.dim_model, bias=False)
        self.dropout_p = config.dropout_p

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = F.dropout(self.w_in(hidden_states), p=self.dropout_p, training=self.training)
        # The output projection scales its input, not its output (the original's `scale_before=True`), by its full
        # fan-in (a tensor-parallel rank holds a slice of it).
        return measured_linear(self.w_out, hidden_states / math.sqrt(self.w_out.in_features))


class CpmBeeFFNBlock(nn.Module):
    def __init__(self, config: CpmBeeConfig) -> None:
        super().__init__()
        self.layernorm_before_ffn = CpmBeeRMSNorm(config.dim_model, eps=config.eps)
        self.ffn = CpmBeeFeedForward(config)
        self.dropout_p = config.dropout_p

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.ffn(self.layernorm_before_ffn(hidden_states))
        x = F.dropout(x, p=self.dropout_p, training=self.training)
        return (hidden_states + x) / 1.05


class CpmBeeTransformerBlock(GradientCheckpointingLayer):
    """Attention block then FFN block; `mask_modules` can remove either (the attribute is then `None`)."""

    def __init__(self, config: CpmBeeConfig, layer_idx: int, cache_idx: int) -> None:
        super().__init__()
        self.self_att = CpmBeeSelfAttentionBlock(config, cache_idx) if config.layer_has_attention(layer_idx) else None
        self.ffn = CpmBeeFFNBlock(config) if config.layer_has_ffn(layer_idx) else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor,
        query_valid: torch.Tensor,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        if self.self_att is not None:
            hidden_states = self.self_att(hidden_states, attention_bias, query_valid, cache=cache, **kwargs)
        if self.ffn is not None:
            hidden_states = self.ffn(hidden_states)
        return hidden_states


class CpmBeeEncoder(nn.Module):
    def __init__(self, config: CpmBeeConfig) -> None:
        super().__init__()
        layers = []
        cache_idx = 0
        for layer_idx in range(config.num_layers):
            # Cache slots are numbered over attention layers only, so slot 0 always holds a real sequence length.
            layers.append(CpmBeeTransformerBlock(config, layer_idx, cache_idx))
            cache_idx += int(config.layer_has_attention(layer_idx))
        self.layers = nn.ModuleList(layers)
        self.output_layernorm = CpmBeeRMSNorm(config.dim_model, eps=config.eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor,
        query_valid: torch.Tensor,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_bias, query_valid, cache=cache, **kwargs)
        return self.output_layernorm(hidden_states)


class CpmBeePreTrainedModel(PreTrainedModel):
    config: CpmBeeConfig
    # Explicit: with postponed annotations transformers would read the `config` annotation as a string.
    config_class = CpmBeeConfig
    base_model_prefix = "cpmbee"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CpmBeeTransformerBlock"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    # Decoding steps on a static cache have fixed shapes, no host synchronisation and no data-dependent branch.
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": CpmBeeTransformerBlock,
        "attentions": CpmBeeAttention,
    }

    # Counts the packed data of quantized weights (transformers' own counts their unquantized size).
    get_memory_footprint = memory_footprint

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CpmBeeBucketPositionBias):
            init.normal_(module.relative_attention_bias, mean=0.0, std=self.config.init_std)


class CpmBeeModel(CpmBeePreTrainedModel):
    """The CPM-Bee transformer: embeddings, position bias, encoder layers and the output RMSNorm.

    Inputs (per DESIGN.md's structured-input table; `K = past + q` where `past` is the cache length):

    - `input_ids`, `input_id_subs` `(B, q)`: the current tokens and their sub-ids (rotation of the embedding; zeros
      when omitted). Or `inputs_embeds` `(B, q, dim)`: already scaled and rotated, i.e. what
      [`~CpmBeeModel.embed_input_ids`] returns (VisCPM-Chat overwrites the image-placeholder rows).
    - `position_ids`, `context`, `sample_ids`, `num_segments`, `segment_ids`, `segment_rel_offset`,
      `attention_mask` `(B, K)`: structure of every token the queries can see, cached tokens first (like
      `attention_mask` in transformers). `segment_rel` `(B, R)`: flattened segment-relation buckets.

    Defaults when only `input_ids` (and `attention_mask`) are given: one sample, one segment, nothing is context, so
    the model is an ordinary causal LM; positions count the unpadded tokens (`attention_mask.cumsum(-1) - 1`).
    Padding is any token with `attention_mask == 0` or `num_segments == 0`.
    """

    _input_embed_layer = "input_embedding"

    def __init__(self, config: CpmBeeConfig) -> None:
        super().__init__(config)
        self.input_embedding = nn.Embedding(config.vocab_size, config.dim_model)
        self.position_bias = CpmBeeBucketPositionBias(config)
        self.encoder = CpmBeeEncoder(config)
        self.gradient_checkpointing = False
        self.post_init()

    def embed_input_ids(self, input_ids: torch.Tensor, input_id_subs: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings as the layers consume them: `E[id] / sqrt(dim)`, rotated by the sub-id."""
        embeds = self.input_embedding(input_ids) / math.sqrt(self.config.dim_model)
        if input_id_subs is None:
            return embeds
        # Rotating by a zero sub-id is exactly the identity (cos 0 = 1, sin 0 = 0): no data-dependent skip, which
        # would synchronise with the device and break a compiled graph.
        return rotate_by_sub_ids(embeds, input_id_subs)

    def attention_bias(
        self,
        query_length: int,
        structure: Mapping[str, torch.Tensor],
        key_valid: torch.Tensor,
        dtype: torch.dtype,
        query_start: int | torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float `(B, heads, q, K)` attention bias (position bias, masked entries at the dtype minimum) and the
        `(B, q)` valid-query mask, from the complete token `structure` (`STRUCTURE_KEYS` but `input_id_subs`) over
        all `K` keys; the queries start at `query_start`. Rows of padding queries are left unmasked so that no
        softmax sees an all-masked row; their outputs are zeroed instead. Unused slots of a static cache are keys
        with `key_valid` False."""
        buckets, mask, query_valid = cpmbee_attention_layout(
            key_valid,
            query_length,
            self.config.position_bias_num_buckets,
            self.config.position_bias_max_distance,
            query_start=query_start,
            **structure,
        )
        bias = self.position_bias(buckets).to(dtype)
        masked = (~mask & query_valid[:, :, None])[:, None]
        # Out of place: the bias is a transposed view, which an in-place fill would have to write through.
        return torch.where(masked, torch.finfo(dtype).min, bias).contiguous(), query_valid

    @staticmethod
    def _complete_structure(
        structure: dict[str, torch.Tensor],
        attention_mask: torch.Tensor | None,
        batch: int,
        past_length: int | torch.Tensor,
        query_length: int,
        key_length: int,
        device: torch.device,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The given structure checked and spread over all `key_length` keys, with the plain-causal-LM defaults filled
        in (one sample, one segment, nothing is context, positions counting the unpadded tokens); and `key_valid`.

        The per-token tensors cover the `total_length` tokens so far, or (a static cache, whose length is a 0-d
        tensor: fixed shapes for a compiled step) one entry per cache slot; unused slots are padding keys.
        """
        total_length = past_length + query_length
        given = {name: attention_mask if name == "attention_mask" else structure.get(name) for name in SEEN_TOKEN_KEYS}
        shapes = {name: tuple(tensor.shape) for name, tensor in given.items() if tensor is not None}
        width = next(iter(shapes.values()))[-1] if shapes else key_length
        needed = width if shapes else total_length
        if isinstance(needed, int) and needed > key_length:
            raise ValueError(
                f"The cache holds {key_length} tokens, but this step needs {needed} ({needed - query_length} cached + "
                f"{query_length} new): use a larger `max_cache_len`."
            )
        expected = width if width == key_length or not isinstance(total_length, int) else total_length
        for name, shape in shapes.items():
            if shape != (batch, expected):
                raise ValueError(
                    f"`{name}` must cover the cached and the current tokens (or every slot of a static cache): "
                    f"expected shape {(batch, expected)}, got {shape}."
                )

        def as_slots(tensor: torch.Tensor) -> torch.Tensor:
            return F.pad(tensor, (0, key_length - width)) if width < key_length else tensor

        if isinstance(total_length, int) and total_length == key_length:
            key_valid = torch.ones(batch, key_length, dtype=torch.bool, device=device)
        else:
            key_valid = (torch.arange(key_length, device=device) < total_length).expand(batch, key_length)
        if attention_mask is not None:
            key_valid = key_valid & (as_slots(attention_mask) != 0)
        if "num_segments" in structure:
            key_valid = key_valid & (as_slots(structure["num_segments"]) != 0)
        zeros = torch.zeros(batch, key_length, dtype=torch.long, device=device)
        defaults = {
            "position_ids": (key_valid.long().cumsum(-1) - 1).clamp(min=0),
            "context": zeros.bool(),
            "sample_ids": zeros,
            "num_segments": key_valid.long(),
            "segment_ids": zeros,
            "segment_rel_offset": zeros,
        }
        complete = {
            name: as_slots(structure[name]) if name in structure else default for name, default in defaults.items()
        }
        complete["segment_rel"] = structure.get("segment_rel", zeros[:, :1])
        return complete, key_valid

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[CpmBeeModelKwargs],
    ) -> BaseModelOutputWithPast:
        """See the class docstring; the structure tensors are the keyword arguments of [`CpmBeeStructureKwargs`]."""
        structure = pop_keys(kwargs, STRUCTURE_KEYS)
        input_id_subs = structure.pop("input_id_subs", None)
        if position_ids is not None:
            structure["position_ids"] = position_ids
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids, input_id_subs)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        batch, query_length = inputs_embeds.shape[:2]
        # A static cache counts its tokens in a 0-d tensor, used as one: no host synchronisation.
        past_length = cache.get_seq_length() if cache is not None else 0
        # Keys: a dynamic cache's cached and current tokens; every `max_cache_len` slot of a static one.
        key_length = cache.get_mask_sizes(query_length, 0)[0] if cache is not None else query_length
        structure, key_valid = self._complete_structure(
            structure, attention_mask, batch, past_length, query_length, key_length, inputs_embeds.device
        )
        attention_bias, query_valid = self.attention_bias(
            query_length, structure, key_valid, inputs_embeds.dtype, past_length
        )
        hidden_states = self.encoder(inputs_embeds, attention_bias, query_valid, cache=cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


class CpmBeeForCausalLM(CpmBeePreTrainedModel, CpmBeeGenerationMixin):
    """CPM-Bee with its tied output projection: logits are `(B, q, vocab_size + E)`, the vocabulary
    (`h . E / sqrt(dim)`) followed by the batch ext table (`h . embed(ext_table_ids, ext_table_sub)`).

    Forward contract: see [`CpmBeeModel`]; in addition `ext_table_ids`/`ext_table_sub` `(B, E)` (identical rows so
    that beam expansion works), `labels` (next-token targets over the `vocab_size + E` ids, shifted inside the loss
    like every transformers causal LM) and `logits_to_keep`. The generation-only inputs of an encoding
    ([`CpmBeeGenerationKwargs`]) are accepted so that `model(**encoding)` works; they do not change the logits.
    Generation: see [`CpmBeeGenerationMixin`].
    """

    _tied_weights_keys = {"lm_head.weight": "cpmbee.input_embedding.weight"}

    def __init__(self, config: CpmBeeConfig) -> None:
        super().__init__(config)
        self.cpmbee = CpmBeeModel(config)
        self.lm_head = nn.Linear(config.dim_model, config.vocab_size, bias=False)
        self.post_init()

    def embed_input_ids(self, input_ids: torch.Tensor, input_id_subs: torch.Tensor | None = None) -> torch.Tensor:
        return self.cpmbee.embed_input_ids(input_ids, input_id_subs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[CpmBeeCausalLMKwargs],
    ) -> CausalLMOutputWithPast:
        ext_table = pop_keys(kwargs, EXT_TABLE_KEYS)
        pop_keys(kwargs, GENERATION_KEYS)
        outputs: BaseModelOutputWithPast = self.cpmbee(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        logits, loss = cpmbee_logits_and_loss(
            self, outputs.last_hidden_state, labels, logits_to_keep, ext_table, kwargs
        )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


def cpmbee_logits_and_loss(
    model: PreTrainedModel,
    hidden_states: torch.Tensor,
    labels: torch.LongTensor | None,
    logits_to_keep: int | torch.Tensor,
    ext_table: Mapping[str, torch.Tensor],
    loss_kwargs: Mapping[str, object],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits of every CPM-Bee head ([`cpmbee_logits`]) and, with `labels`, the head's loss over the
    `vocab_size + E` ids (stock shifted cross-entropy)."""
    logits = cpmbee_logits(model, hidden_states, logits_to_keep, **ext_table)
    if labels is None:
        return logits, None
    check_labels_follow_answers(labels, loss_kwargs.get("context"))
    return logits, model.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **loss_kwargs)


def cpmbee_logits(
    model: PreTrainedModel,
    hidden_states: torch.Tensor,
    logits_to_keep: int | torch.Tensor = 0,
    ext_table_ids: torch.LongTensor | None = None,
    ext_table_sub: torch.LongTensor | None = None,
) -> torch.Tensor:
    """CPM-Bee's logits from the last hidden states, for any head holding the tied `lm_head` and `embed_input_ids`
    (CPM-Bee and VisCPM-Chat): the vocabulary (`h . E / sqrt(dim)`) then the batch ext table
    (`h . embed(ext_table_ids, ext_table_sub)`), over the positions `logits_to_keep` selects."""
    hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
    scale = math.sqrt(model.config.get_text_config().dim_model)
    logits = measured_linear(model.get_output_embeddings(), hidden_states / scale)
    if ext_table_ids is None or ext_table_ids.shape[-1] == 0:
        return logits
    ext_embeds = model.embed_input_ids(ext_table_ids, ext_table_sub)
    if hidden_states.dim() == 2:
        # A boolean `logits_to_keep` flattens the kept positions: pair each with its sample's ext table.
        ext_embeds = ext_embeds[logits_to_keep.nonzero()[:, 0]]
        ext_logits = torch.matmul(ext_embeds, hidden_states[:, :, None]).squeeze(-1)
    else:
        ext_logits = torch.matmul(hidden_states, ext_embeds.transpose(1, 2))
    return torch.cat([logits, ext_logits], dim=-1)


__all__ = [
    "CpmBeeForCausalLM",
    "CpmBeeModel",
    "CpmBeePreTrainedModel",
    "cpmbee_attention_layout",
    "cpmbee_logits",
    "cpmbee_logits_and_loss",
]
