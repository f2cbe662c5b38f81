"""PyTorch CPM-Bee, the language model shared by VisCPM-Chat and VisCPM-Paint.

The maths follows the original (VisCPM `models/cpmbee.py` and `models/modules/*`): bias-free linears that divide by
`sqrt(fan_in)`, RMSNorm in fp32, gated-GELU FFN, residuals `(h + x) / 1.05`, token embeddings divided by
`sqrt(dim_model)` and rotated by their sub-id, a bucketed relative-position bias shared by all layers, and logits
over the vocabulary followed by the batch ext table.

Token structure (how a structured CPM-Bee prompt becomes masks and position buckets) is handled by ONE function,
`cpmbee_attention_layout`, for prefill and incremental decoding alike.
"""

import math
import time
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_cpmbee import CpmBeeConfig
from .generation_cpmbee import CpmBeeExtTableLogitsProcessor, generate_answers

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


@lru_cache(maxsize=16)
def _distance_buckets(num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """`relative_position_bucket` of every distance in [-max_distance, max_distance], computed once per device
    (every forward looks its distances up here; recomputing the table took 0.1 ms of each decoding step)."""
    distances = torch.arange(-max_distance, max_distance + 1, device=device)
    return relative_position_bucket(distances, num_buckets, max_distance)


def cpmbee_attention_layout(
    position_ids: torch.Tensor,
    context: torch.Tensor,
    sample_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: torch.Tensor,
    segment_rel_offset: torch.Tensor,
    segment_rel: torch.Tensor,
    key_valid: torch.Tensor,
    query_length: int,
    num_buckets: int,
    max_distance: int,
    query_start: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one home of CPM-Bee's attention masks and position buckets.

    Every per-token tensor is `(batch, K)` over all the tokens attention can see (cached ones first); the queries
    are the `query_length` tokens from `query_start` on (default: the last ones). `query_start` may be a 0-d tensor
    (a static cache's length: every slot is a key, and no host synchronisation is needed to find the queries).
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


# (rows, vocab, dim, threads) -> whether the blocked route measured faster than `F.linear` in this process.
_BLOCKED_IS_FASTER: dict[tuple[int, int, int, int], bool] = {}


def _blocked_linear(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(rows, weight)` as one batched matmul over vocabulary blocks (reads `weight` in one pass)."""
    num_blocks = max(2, torch.get_num_threads())
    vocab, dim = weight.shape
    blocked = vocab - vocab % num_blocks
    logits = torch.bmm(weight[:blocked].view(num_blocks, -1, dim), rows.t().expand(num_blocks, dim, rows.shape[0]))
    return torch.cat([logits.permute(2, 0, 1).reshape(rows.shape[0], blocked), F.linear(rows, weight[blocked:])], 1)


def _faster_seconds(first: Callable[[], object], second: Callable[[], object], rounds: int = 3) -> bool:
    """Whether `first` beats `second`: best of `rounds` alternating runs each, after one warm-up run."""
    best = [math.inf, math.inf]
    for _ in range(rounds + 1):
        for index, fn in enumerate((first, second)):
            start = time.perf_counter()
            fn()
            best[index] = min(best[index], time.perf_counter() - start)
    return best[0] < best[1]


def project_to_vocabulary(hidden_states: torch.Tensor, lm_head: nn.Linear) -> torch.Tensor:
    """`lm_head(hidden_states)`; for a few fp32 rows on CPU by a blocked `bmm` instead when that measured faster.

    MKL's GEMV for `x @ W.T` over the `(vocab, dim)` matrix is 2.4x slower than the blocked route on some CPUs and
    2x faster on others, so neither is hard-wired: both are timed once per (rows, shape, threads) in this process,
    outside autograd and compilation, and the faster one is kept. Everything else is `lm_head`.
    """
    weight = lm_head.weight
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    plain = (
        hidden_states.device.type != "cpu"
        or type(weight) is not nn.Parameter
        or weight.device.type != "cpu"
        or weight.dtype != torch.float32
        or hidden_states.dtype != torch.float32
        or rows.shape[0] > 64
        or type(lm_head) is not nn.Linear
        or lm_head._forward_hooks
        or lm_head._forward_pre_hooks
        or hasattr(lm_head, "_hf_hook")
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
    )
    if plain:
        return lm_head(hidden_states)
    key = (rows.shape[0], *weight.shape, torch.get_num_threads())
    if key not in _BLOCKED_IS_FASTER:
        _BLOCKED_IS_FASTER[key] = _faster_seconds(lambda: _blocked_linear(rows, weight), lambda: lm_head(rows))
    if not _BLOCKED_IS_FASTER[key]:
        return lm_head(hidden_states)
    return _blocked_linear(rows, weight).view(*hidden_states.shape[:-1], weight.shape[0])


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
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with CPM-Bee's additive float bias (position bias plus masking)."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
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
        padding_queries: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length = hidden_states.shape[:2]
        in_scale = math.sqrt(self.config.dim_model)
        # `-1` heads: under tensor parallelism the projections hold only this rank's heads.
        hidden_shape = (batch, length, -1, self.head_dim)
        query_states = self.project_q(hidden_states).div_(in_scale).view(hidden_shape).transpose(1, 2)
        key_states = self.project_k(hidden_states).div_(in_scale).view(hidden_shape).transpose(1, 2)
        value_states = self.project_v(hidden_states).div_(in_scale).view(hidden_shape).transpose(1, 2)

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
            **kwargs,
        )
        if padding_queries is not None:
            # Padding queries attend to nothing: the original's softmax over an all -inf row, zeroed.
            attn_output = attn_output.masked_fill(padding_queries[:, :, None, None], 0.0)
            if attn_weights is not None:
                attn_weights = attn_weights.masked_fill(padding_queries[:, None, :, None], 0.0)
        attn_output = attn_output.reshape(batch, length, -1)
        attn_output = self.attention_out(attn_output).div_(math.sqrt(self.num_heads * self.head_dim))
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
        padding_queries: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        x = self.layernorm_before_attention(hidden_states)
        x, _ = self.self_attention(x, attention_bias, padding_queries, cache=cache, **kwargs)
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
        gate = self.act(self.w_0(hidden_states).div_(scale))
        return gate.mul_(self.w_1(hidden_states).div_(scale))


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
        return self.w_out(hidden_states / math.sqrt(self.w_out.in_features))


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
        padding_queries: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        if self.self_att is not None:
            hidden_states = self.self_att(hidden_states, attention_bias, padding_queries, cache=cache, **kwargs)
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
        padding_queries: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_bias, padding_queries, cache=cache, **kwargs)
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
        position_ids: torch.Tensor,
        context: torch.Tensor,
        sample_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        num_segments: torch.Tensor,
        segment_rel_offset: torch.Tensor,
        segment_rel: torch.Tensor,
        key_valid: torch.Tensor,
        dtype: torch.dtype,
        query_start: int | torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float `(B, heads, q, K)` attention bias (position bias, masked entries at the dtype minimum) and the
        `(B, q)` valid-query mask. Rows of padding queries are left unmasked so that no softmax sees an all-masked
        row; their outputs are zeroed instead. Unused slots of a static cache are keys with `key_valid` False."""
        buckets, mask, query_valid = cpmbee_attention_layout(
            position_ids,
            context,
            sample_ids,
            segment_ids,
            num_segments,
            segment_rel_offset,
            segment_rel,
            key_valid,
            query_length,
            self.config.position_bias_num_buckets,
            self.config.position_bias_max_distance,
            query_start,
        )
        bias = self.position_bias(buckets).to(dtype)
        masked = (~mask & query_valid[:, :, None])[:, None]
        # Out of place: the bias is a transposed view, which an in-place fill would have to write through.
        return torch.where(masked, torch.finfo(dtype).min, bias).contiguous(), query_valid

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_id_subs: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        context: torch.Tensor | None = None,
        sample_ids: torch.LongTensor | None = None,
        num_segments: torch.LongTensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        segment_rel_offset: torch.LongTensor | None = None,
        segment_rel: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids, input_id_subs)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        batch, query_length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        # A static cache counts its tokens in a 0-d tensor, used as one: no host synchronisation.
        past_length = cache.get_seq_length() if cache is not None else 0
        total_length = past_length + query_length
        # Keys: a dynamic cache's cached and current tokens; every `max_cache_len` slot of a static one.
        key_length = cache.get_mask_sizes(query_length, 0)[0] if cache is not None else query_length
        per_token = {
            "position_ids": position_ids,
            "context": context,
            "sample_ids": sample_ids,
            "num_segments": num_segments,
            "segment_ids": segment_ids,
            "segment_rel_offset": segment_rel_offset,
            "attention_mask": attention_mask,
        }
        shapes = {name: tuple(tensor.shape) for name, tensor in per_token.items() if tensor is not None}
        width = next(iter(shapes.values()))[-1] if shapes else key_length
        needed = width if shapes else total_length
        if isinstance(needed, int) and needed > key_length:
            raise ValueError(
                f"The cache holds {key_length} tokens, but this step needs {needed} ({needed - query_length} cached + "
                f"{query_length} new): use a larger `max_cache_len`."
            )
        # The tokens so far, or (static cache, fixed shapes for a compiled step) one entry per cache slot.
        expected = width if width == key_length or not isinstance(total_length, int) else total_length
        for name, shape in shapes.items():
            if shape != (batch, expected):
                raise ValueError(
                    f"`{name}` must cover the cached and the current tokens (or every slot of a static cache): "
                    f"expected shape {(batch, expected)}, got {shape}."
                )

        def as_slots(tensor: torch.Tensor) -> torch.Tensor:
            """Per-token structure over all `key_length` keys (the unused static-cache slots zero)."""
            return F.pad(tensor, (0, key_length - width)) if width < key_length else tensor

        if isinstance(total_length, int) and total_length == key_length:
            key_valid = torch.ones(batch, key_length, dtype=torch.bool, device=device)
        else:
            key_valid = (torch.arange(key_length, device=device) < total_length).expand(batch, key_length)
        if attention_mask is not None:
            key_valid = key_valid & (as_slots(attention_mask) != 0)
        if num_segments is not None:
            key_valid = key_valid & (as_slots(num_segments) != 0)
        if position_ids is None:
            position_ids = (key_valid.long().cumsum(-1) - 1).clamp(min=0)
        else:
            position_ids = as_slots(position_ids)
        zeros = torch.zeros(batch, key_length, dtype=torch.long, device=device)

        def given_or(tensor: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
            return as_slots(tensor) if tensor is not None else default

        attention_bias, query_valid = self.attention_bias(
            query_length,
            position_ids,
            given_or(context, zeros.bool()),
            given_or(sample_ids, zeros),
            given_or(segment_ids, zeros),
            given_or(num_segments, key_valid.long()),
            given_or(segment_rel_offset, zeros),
            segment_rel if segment_rel is not None else zeros[:, :1],
            key_valid,
            inputs_embeds.dtype,
            past_length,
        )
        # Zeroing the padding queries' outputs is branch-free: no host synchronisation on whether there are any.
        hidden_states = self.encoder(inputs_embeds, attention_bias, ~query_valid, cache=cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


class CpmBeeForCausalLM(CpmBeePreTrainedModel, GenerationMixin):
    """CPM-Bee with its tied output projection: logits are `(B, q, vocab_size + E)`, the vocabulary
    (`h . E / sqrt(dim)`) followed by the batch ext table (`h . embed(ext_table_ids, ext_table_sub)`).

    Forward contract: see [`CpmBeeModel`]; in addition `ext_table_ids`/`ext_table_sub` `(B, E)` (identical rows so
    that beam expansion works), `labels` (next-token targets over the `vocab_size + E` ids, shifted inside the loss
    like every transformers causal LM) and `logits_to_keep`.

    Generation contract (`generate(**encoding)` with greedy, sampling or stock beam search): pass the encoded prompt
    (every key of the structured-input table; `answer_segment_ids` switches CPM-Bee answering on). The first step
    feeds `<s>` at position 0 of the first answer segment; every generated token is fed back at the next position of
    that segment, an ext id `vocab_size + k` as `(ext_table_ids[k], ext_table_sub[k])`, and EOS as the `<s>` of the
    next answer segment (when there is one). Generated tokens are not context: each sees the prompt and the earlier
    generated tokens, which is exactly what the original's incremental `inference` computes. Without
    `answer_segment_ids`, generated tokens continue the last prompt token's segment at the following positions.
    The structure of generated tokens is derived from the generated ids at every step, so beam reordering needs no
    bookkeeping; `ext_table_mask` and `allow_unk` are accepted for CPM-Bee's logits processor and not used here.
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
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_id_subs: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        context: torch.Tensor | None = None,
        sample_ids: torch.LongTensor | None = None,
        num_segments: torch.LongTensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        segment_rel_offset: torch.LongTensor | None = None,
        segment_rel: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        ext_table_ids: torch.LongTensor | None = None,
        ext_table_sub: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.cpmbee(
            input_ids=input_ids,
            input_id_subs=input_id_subs,
            position_ids=position_ids,
            context=context,
            sample_ids=sample_ids,
            num_segments=num_segments,
            segment_ids=segment_ids,
            segment_rel_offset=segment_rel_offset,
            segment_rel=segment_rel,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = project_to_vocabulary(hidden_states / math.sqrt(self.config.dim_model), self.lm_head)
        if ext_table_ids is not None and ext_table_ids.shape[-1] > 0:
            ext_embeds = self.cpmbee.embed_input_ids(ext_table_ids, ext_table_sub)
            if hidden_states.dim() == 2:
                # A boolean `logits_to_keep` flattens the kept positions: pair each with its sample's ext table.
                ext_embeds = ext_embeds[logits_to_keep.nonzero()[:, 0]]
                ext_logits = torch.matmul(ext_embeds, hidden_states[:, :, None]).squeeze(-1)
            else:
                ext_logits = torch.matmul(hidden_states, ext_embeds.transpose(1, 2))
            logits = torch.cat([logits, ext_logits], dim=-1)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _generated_structure(
        self,
        generated: torch.Tensor,
        answer_segment_ids: torch.Tensor | None,
        ext_table_ids: torch.Tensor | None,
        ext_table_sub: torch.Tensor | None,
        last_position: torch.Tensor,
        last_segment: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fed ids, sub-ids, positions and segments of the generated tokens `generated` `(B, s)`.

        With answer segments the result has `s + 1` entries: the leading `<s>` of the first answer, then one per
        generated token (EOS becomes the next answer's `<s>` at position 0). Without, it has `s` entries continuing
        the prompt's last segment.
        """
        batch, steps = generated.shape
        ids, subs = generated, torch.zeros_like(generated)
        if ext_table_ids is not None and ext_table_ids.shape[-1] > 0:
            is_ext = generated >= self.config.vocab_size
            ext_index = (generated - self.config.vocab_size).clamp(0, ext_table_ids.shape[-1] - 1)
            ids = torch.where(is_ext, ext_table_ids.gather(1, ext_index), ids)
            subs = torch.where(is_ext, ext_table_sub.gather(1, ext_index), subs)
        if answer_segment_ids is None:
            positions = last_position[:, None] + 1 + torch.arange(steps, device=generated.device)
            return ids, subs, positions, last_segment[:, None].expand(batch, steps)

        bos = self.config.bos_token_id
        eos_ids = (
            self.config.eos_token_id if isinstance(self.config.eos_token_id, list) else [self.config.eos_token_id]
        )
        is_eos = torch.isin(generated, torch.tensor(eos_ids, device=generated.device))
        start = torch.ones(batch, 1, dtype=torch.bool, device=generated.device)
        ids = torch.cat([torch.full_like(start, bos, dtype=ids.dtype), ids.masked_fill(is_eos, bos)], dim=1)
        subs = torch.cat([torch.zeros_like(start, dtype=subs.dtype), subs.masked_fill(is_eos, 0)], dim=1)
        answer_start = torch.cat([start, is_eos], dim=1)
        num_answers = (answer_segment_ids >= 0).sum(dim=1, keepdim=True).clamp(min=1)
        answer_index = torch.minimum(answer_start.long().cumsum(dim=1) - 1, num_answers - 1)
        segments = answer_segment_ids.gather(1, answer_index)
        order = torch.arange(steps + 1, device=generated.device).expand(batch, steps + 1)
        positions = order - torch.cummax(order * answer_start, dim=1).values
        return ids, subs, positions, segments

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        is_first_iteration: bool | None = False,
        input_id_subs: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        context: torch.Tensor | None = None,
        sample_ids: torch.LongTensor | None = None,
        num_segments: torch.LongTensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        segment_rel_offset: torch.LongTensor | None = None,
        segment_rel: torch.LongTensor | None = None,
        ext_table_ids: torch.LongTensor | None = None,
        ext_table_sub: torch.LongTensor | None = None,
        answer_segment_ids: torch.LongTensor | None = None,
        ext_table_mask: torch.Tensor | None = None,
        allow_unk: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        """Build the forward inputs of one generation step from the prompt structure and the generated ids.

        The structure kwargs keep the prompt's length `L` for the whole of `generate` (see
        `_update_model_kwargs_for_generation`); the generated tokens' structure is re-derived here.
        """
        if position_ids is None:
            raise ValueError("The prompt's `position_ids` are needed to tell the prompt from the generated tokens.")
        batch = input_ids.shape[0]
        device = input_ids.device
        prompt_length = position_ids.shape[-1]
        num_prefix = 0 if answer_segment_ids is None else 1
        steps = max(input_ids.shape[1] - prompt_length, 0)
        if cache is None:
            past_length = 0
        elif is_first_iteration:
            past_length = int(cache.get_seq_length())  # a cache passed in may already hold tokens
            if past_length > 0:
                steps = past_length - prompt_length - num_prefix + 1
        else:
            # A decoding step: everything but the newest token is cached (read from the shapes, not the device).
            past_length = prompt_length + num_prefix + steps - 1
        generated = input_ids[:, input_ids.shape[1] - steps :]

        def prompt_or(tensor: torch.Tensor | None, fill) -> torch.Tensor:
            if tensor is not None:
                return tensor
            return torch.full((batch, prompt_length), fill, dtype=torch.long, device=device)

        prompt_segments = prompt_or(segment_ids, 0)
        prompt_num_segments = num_segments
        if prompt_num_segments is None:
            prompt_num_segments = prompt_or(attention_mask, 1).ne(0).long()
        prompt_offsets = prompt_or(segment_rel_offset, 0)
        fed_ids, fed_subs, fed_positions, fed_segments = self._generated_structure(
            generated, answer_segment_ids, ext_table_ids, ext_table_sub, position_ids[:, -1], prompt_segments[:, -1]
        )
        fed_length = fed_ids.shape[1]

        def extend(prompt: torch.Tensor, generated_part: torch.Tensor) -> torch.Tensor:
            return torch.cat([prompt, generated_part.to(prompt.dtype)], dim=1)

        def repeat_last(prompt: torch.Tensor) -> torch.Tensor:
            return extend(prompt, prompt[:, -1:].expand(batch, fed_length))

        structure = {
            "position_ids": extend(position_ids, fed_positions),
            "context": extend(prompt_or(context, 0).bool(), torch.zeros_like(fed_ids, dtype=torch.bool)),
            "sample_ids": extend(prompt_or(sample_ids, 0), torch.zeros_like(fed_ids)),
            "num_segments": repeat_last(prompt_num_segments),
            "segment_ids": extend(prompt_segments, fed_segments),
            "segment_rel_offset": repeat_last(prompt_offsets),
            "attention_mask": extend(prompt_or(attention_mask, 1), torch.ones_like(fed_ids)),
        }
        slots = cache.get_max_length() if cache is not None else -1
        if slots > prompt_length + fed_length:
            # A static cache: one entry per slot (the unused ones are padding), so that every decoding step has the
            # same input shapes and a compiled forward is built once.
            padding = slots - prompt_length - fed_length
            structure = {key: extend(value, value.new_zeros(batch, padding)) for key, value in structure.items()}
        query_length = prompt_length + fed_length - past_length
        prompt_part = max(query_length - fed_length, 0)
        fed_part = slice(fed_length - (query_length - prompt_part), fed_length)

        model_inputs = {"input_ids": None, "inputs_embeds": None}
        if prompt_part > 0 and inputs_embeds is not None and is_first_iteration:
            fed_embeds = self.embed_input_ids(fed_ids, fed_subs).to(inputs_embeds.dtype)
            model_inputs["inputs_embeds"] = torch.cat([inputs_embeds[:, prompt_length - prompt_part :], fed_embeds], 1)
        else:
            prompt_ids = input_ids[:, prompt_length - prompt_part : prompt_length]
            prompt_subs = prompt_or(input_id_subs, 0)[:, prompt_length - prompt_part :]
            model_inputs["input_ids"] = extend(prompt_ids, fed_ids[:, fed_part])
            model_inputs["input_id_subs"] = extend(prompt_subs, fed_subs[:, fed_part])

        model_inputs.update(structure)
        model_inputs.update(
            segment_rel=segment_rel,
            ext_table_ids=ext_table_ids,
            ext_table_sub=ext_table_sub,
            cache=cache,
        )
        for key, value in kwargs.items():
            model_inputs.setdefault(key, value)
        return model_inputs

    def _update_model_kwargs_for_generation(
        self,
        outputs: ModelOutput,
        model_kwargs: dict,
        is_encoder_decoder: bool = False,
        num_new_tokens: int = 1,
    ) -> dict:
        """Only carry the cache over: the prompt structure kwargs stay as given (see `prepare_inputs_for_generation`)."""
        if "cache" in outputs:
            model_kwargs["cache"] = outputs["cache"]
        return model_kwargs

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """Answer mode feeds one token more than it generates (the answer's leading `<s>`): a static cache gets the
        extra slot."""
        if model_kwargs.get("answer_segment_ids") is not None:
            max_cache_length += 1
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )

    def _get_logits_processor(self, generation_config, *args, model_kwargs=None, **kwargs):
        """Stock processors, preceded by the original's per-sample `<unk>`/ext-table mask when the prompt has it."""
        processors = super()._get_logits_processor(generation_config, *args, model_kwargs=model_kwargs, **kwargs)
        processor = CpmBeeExtTableLogitsProcessor.from_model_kwargs(self.config, model_kwargs)
        if processor is not None:
            processors.insert(0, processor)
        return processors

    # `model.generate_answers(tokenizer, data_list, **settings)`: the original's beam search, answers filled in.
    generate_answers = generate_answers


__all__ = ["CpmBeeForCausalLM", "CpmBeeModel", "CpmBeePreTrainedModel", "cpmbee_attention_layout"]
