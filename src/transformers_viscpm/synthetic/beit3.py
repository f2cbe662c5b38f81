"""A tiny seeded BEiT-3 vision tower in the original VisCPM-Chat layout (`vpm.beit3.*`, `vpm.mim_head.*`).

The values are exactly those of `init_random_(BEiT3Wrapper(args), seed, std)` (see
../shared/reference/original_on_cpu.py) on the wrapper VisCPM builds in `VisCPM/models/beit3.py`: one generator,
one `randn` per parameter in the wrapper's `named_parameters()` order, `1 + 0.1 * randn` for parameters whose name
contains "layernorm" (only the FFN sub-LN `ffn_layernorm`), `std * randn` for everything else. Golden values
recorded from the original therefore apply to these weights. Only torch is needed, so the recorder can import this
file in the reference environment too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..models.viscpm_chat.configuration_viscpm_chat import VisCPMChatVisionConfig

# `BEiT3Wrapper.mim_head` is `nn.Linear(1024, 8192)` whatever the encoder width.
MIM_HEAD_SHAPE = (8192, 1024)
# Vocabulary of BEiT-3's text embedding as VisCPM builds it (`_get_large_config(vocab_size=64010)`).
TEXT_VOCAB_SIZE = 64010


def beit3_original_shapes(
    config: VisCPMChatVisionConfig, text_vocab_size: int = TEXT_VOCAB_SIZE
) -> list[tuple[str, tuple[int, ...]]]:
    """Names (relative to `BEiT3Wrapper`) and shapes in the wrapper's `named_parameters()` order."""
    dim, ffn = config.hidden_size, config.intermediate_size
    num_patches = (config.image_size // config.patch_size) ** 2
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("beit3.text_embed.weight", (text_vocab_size, dim)),
        ("beit3.vision_embed.mask_token", (1, 1, dim)),
        ("beit3.vision_embed.cls_token", (1, 1, dim)),
        ("beit3.vision_embed.proj.weight", (dim, config.num_channels, config.patch_size, config.patch_size)),
        ("beit3.vision_embed.proj.bias", (dim,)),
        # cls + patches, plus the 2 fairseq-style leading positions that are never used.
        ("beit3.encoder.embed_positions.A.weight", (num_patches + 3, dim)),
        ("beit3.encoder.embed_positions.B.weight", (config.max_text_positions, dim)),
    ]
    for i in range(config.num_hidden_layers):
        layer = f"beit3.encoder.layers.{i}"
        # MultiheadAttention registers k, v, q, out in that order.
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            for way in "AB":
                shapes += [(f"{layer}.self_attn.{proj}.{way}.weight", (dim, dim))]
                shapes += [(f"{layer}.self_attn.{proj}.{way}.bias", (dim,))]
        for norm in ("self_attn.inner_attn_ln", "self_attn_layer_norm"):
            for way in "AB":
                shapes += [(f"{layer}.{norm}.{way}.weight", (dim,)), (f"{layer}.{norm}.{way}.bias", (dim,))]
        for way in "AB":
            shapes += [
                (f"{layer}.ffn.{way}.fc1.weight", (ffn, dim)),
                (f"{layer}.ffn.{way}.fc1.bias", (ffn,)),
                (f"{layer}.ffn.{way}.fc2.weight", (dim, ffn)),
                (f"{layer}.ffn.{way}.fc2.bias", (dim,)),
                (f"{layer}.ffn.{way}.ffn_layernorm.weight", (ffn,)),
                (f"{layer}.ffn.{way}.ffn_layernorm.bias", (ffn,)),
            ]
        for way in "AB":
            shapes += [(f"{layer}.final_layer_norm.{way}.weight", (dim,))]
            shapes += [(f"{layer}.final_layer_norm.{way}.bias", (dim,))]
    for way in "AB":
        shapes += [
            (f"beit3.encoder.layer_norm.{way}.weight", (dim,)),
            (f"beit3.encoder.layer_norm.{way}.bias", (dim,)),
        ]
    shapes += [("mim_head.weight", MIM_HEAD_SHAPE), ("mim_head.bias", MIM_HEAD_SHAPE[:1])]
    return shapes


def beit3_original_state_dict(
    config: VisCPMChatVisionConfig,
    seed: int = 0,
    std: float = 0.2,
    *,
    generator: torch.Generator | None = None,
    text_vocab_size: int = TEXT_VOCAB_SIZE,
    prefix: str = "vpm.",
    include_mim_head: bool = True,
) -> dict[str, torch.Tensor]:
    """The seeded original state dict of `BEiT3Wrapper`, keys prefixed as inside `VLU_CPMBee` (`vpm.`).

    Pass `generator` (instead of `seed`) to continue a sequence already in use, e.g. when the whole VisCPM-Chat
    module is seeded and its `query` parameter was drawn first. `include_mim_head=False` skips the 8192x1024 MIM
    head, which comes last, so the other values do not change.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, shape in beit3_original_shapes(config, text_vocab_size):
        if name.startswith("mim_head.") and not include_mim_head:
            continue
        values = torch.randn(shape, generator=generator)
        state_dict[prefix + name] = 1.0 + 0.1 * values if "layernorm" in name and len(shape) == 1 else std * values
    return state_dict
