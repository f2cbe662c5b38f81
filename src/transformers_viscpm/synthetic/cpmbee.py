"""Seeded CPM-Bee weights in the ORIGINAL layout (`CPMBeeTorch.state_dict()` key names).

`original_cpmbee_state_dict(cfg, seed)` returns exactly the tensors that the reference recipe
`init_random_(CPMBeeTorch(CPMBeeConfig(**cfg)), seed)` leaves in the original module: the parameters are visited
in the original's `named_parameters()` order and each draws from one shared `torch.Generator`, so golden values
recorded from the original apply to a model loaded from these tensors.
"""

from __future__ import annotations

from typing import Any

import torch

# The real vocabulary size: golden values are recorded with it so that ids and ext-table offsets are realistic.
CPMBEE_VOCAB_SIZE = 86583

# Defaults of the original `CPMBeeConfig.__init__` (VisCPM/models/cpmbee.py).
_ORIGINAL_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30720,
    "dim_model": 4096,
    "num_heads": 64,
    "dim_head": 64,
    "dim_ff": 10240,
    "num_layers": 32,
    "dropout_p": 0.0,
    "position_bias_num_buckets": 256,
    "position_bias_num_segment_buckets": 256,
    "position_bias_max_distance": 2048,
    "eps": 1e-6,
    "half": True,
    "mask_modules": None,
}


def tiny_cpmbee_config(**overrides: Any) -> dict[str, Any]:
    """An original-style CPM-Bee config dict small enough for CPU tests (real vocabulary, fp32)."""
    config = {
        "vocab_size": CPMBEE_VOCAB_SIZE,
        "dim_model": 64,
        "dim_ff": 128,
        "num_layers": 2,
        "num_heads": 2,
        "dim_head": 32,
        "dropout_p": 0.0,
        "position_bias_num_buckets": 32,
        "position_bias_num_segment_buckets": 32,
        "position_bias_max_distance": 128,
        "eps": 1e-6,
        "half": False,
    }
    config.update(overrides)
    return config


def _original_parameter_shapes(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of `CPMBeeTorch`'s parameters in registration order: encoder, embedding, position bias."""
    dim, dim_ff = cfg["dim_model"], cfg["dim_ff"]
    inner = cfg["num_heads"] * cfg["dim_head"]
    masks = cfg["mask_modules"] or [(False, False)] * cfg["num_layers"]
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for i, (mask_att, mask_ffn) in enumerate(masks):
        prefix = f"encoder.layers.{i}"
        if not mask_att:
            shapes += [
                (f"{prefix}.self_att.layernorm_before_attention.weight", (dim,)),
                (f"{prefix}.self_att.self_attention.project_q.weight", (inner, dim)),
                (f"{prefix}.self_att.self_attention.project_k.weight", (inner, dim)),
                (f"{prefix}.self_att.self_attention.project_v.weight", (inner, dim)),
                (f"{prefix}.self_att.self_attention.attention_out.weight", (dim, inner)),
            ]
        if not mask_ffn:
            shapes += [
                (f"{prefix}.ffn.layernorm_before_ffn.weight", (dim,)),
                (f"{prefix}.ffn.ffn.w_in.w_0.weight", (dim_ff, dim)),
                (f"{prefix}.ffn.ffn.w_in.w_1.weight", (dim_ff, dim)),
                (f"{prefix}.ffn.ffn.w_out.weight", (dim, dim_ff)),
            ]
    shapes += [
        ("encoder.output_layernorm.weight", (dim,)),
        ("input_embedding.weight", (cfg["vocab_size"], dim)),
        (
            "position_bias.relative_attention_bias",
            (cfg["position_bias_num_buckets"] + cfg["position_bias_num_segment_buckets"], cfg["num_heads"]),
        ),
    ]
    return shapes


def original_cpmbee_state_dict(
    original_config: dict[str, Any], seed: int, std: float = 1.0
) -> dict[str, torch.Tensor]:
    """The seeded original-layout CPM-Bee state dict for `original_config` (an original config dict).

    RMSNorm weights are `1 + 0.1 * N(0, 1)`, every other tensor `std * N(0, 1)`, drawn in fp32 and stored in the
    original's dtype (`half` -> float16, as `CPMBeeConfig` does).
    """
    cfg = {**_ORIGINAL_DEFAULTS, **original_config}
    dtype = torch.float16 if cfg["half"] else torch.float32
    generator = torch.Generator().manual_seed(seed)
    state_dict: dict[str, torch.Tensor] = {}
    for name, shape in _original_parameter_shapes(cfg):
        values = torch.randn(shape, generator=generator)
        if "layernorm" in name and len(shape) == 1:
            values = 1.0 + 0.1 * values
        else:
            values = std * values
        state_dict[name] = values.to(dtype)
    return state_dict


__all__ = ["CPMBEE_VOCAB_SIZE", "original_cpmbee_state_dict", "tiny_cpmbee_config"]
