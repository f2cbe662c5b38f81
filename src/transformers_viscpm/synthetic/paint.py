"""A tiny seeded VisCPM-Paint checkpoint in the original layout, and a tiny SD-2.1-like base folder.

The released `viscpm_paint_*_checkpoint.pt` is one flat state dict: `llm.*` (CPM-Bee), `unet.*` (a
diffusers `UNet2DConditionModel` with the stable-diffusion-2-1-base config) and `trans_block.*`
(`w_out_res` Linear without bias + `layernorm`). The VAE and the scheduler come from the SD-2.1 base
repository. `tests/fixtures/record/record_paint.py` builds the same parts inside the original code with
the same configs and seeds: CPM-Bee through `init_random_`, the diffusers parts and the trans block
through `seeded_fill_` (identical recipe), so the images it recorded apply to these weights; the fixture
keeps checksums of every part to prove it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

from ..models.cpmbee.configuration_cpmbee import CpmBeeConfig
from .cpmbee import original_cpmbee_state_dict

__all__ = [
    "TINY_PAINT_CPMBEE",
    "TINY_PAINT_SCHEDULER",
    "TINY_PAINT_SEEDS",
    "TINY_PAINT_UNET",
    "TINY_PAINT_VAE",
    "original_paint_state_dict",
    "seeded_fill_",
    "tiny_paint_cpmbee_config",
    "tiny_paint_unet",
    "tiny_paint_vae",
    "write_sd_base",
]

# The original `CPMBeeConfig` arguments (real vocabulary, fp32).
TINY_PAINT_CPMBEE = dict(
    vocab_size=86583, dim_model=64, num_heads=4, dim_head=16, dim_ff=128, num_layers=2, half=False
)
TINY_PAINT_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[32, 64],
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=[2, 4],
    use_linear_projection=True,
    norm_num_groups=8,
)
TINY_PAINT_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    block_out_channels=[16, 32],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
# stabilityai/stable-diffusion-2-1-base/scheduler/scheduler_config.json (a PNDMScheduler config that the
# original reads with DDPMScheduler).
TINY_PAINT_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    prediction_type="epsilon",
    trained_betas=None,
)
TINY_PAINT_SEEDS = dict(llm=0, unet=1, vae=2, trans_block=3)


def seeded_fill_(named_params: Iterable[tuple[str, torch.Tensor]], seed: int) -> None:
    """Overwrite parameters in the given order from one seeded generator.

    diffusers' own initialisation may change between versions; this recipe only depends on the parameter
    order and `torch.randn`, so the reference venv and ours build the same tensors. Norm weights land near
    1, biases near 0, matrices at 1/sqrt(fan_in) so activations stay in range through the tiny nets.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


def tiny_paint_cpmbee_config() -> CpmBeeConfig:
    """Our `CpmBeeConfig` for the tiny original config above."""
    return CpmBeeConfig.from_original_config(TINY_PAINT_CPMBEE)


def tiny_paint_unet(seed: int = TINY_PAINT_SEEDS["unet"]) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(**TINY_PAINT_UNET)
    seeded_fill_(unet.named_parameters(), seed)
    return unet


def tiny_paint_vae(seed: int = TINY_PAINT_SEEDS["vae"]) -> AutoencoderKL:
    vae = AutoencoderKL(**TINY_PAINT_VAE)
    seeded_fill_(vae.named_parameters(), seed)
    return vae


def original_paint_state_dict(
    llm_seed: int = TINY_PAINT_SEEDS["llm"],
    unet_seed: int = TINY_PAINT_SEEDS["unet"],
    trans_block_seed: int = TINY_PAINT_SEEDS["trans_block"],
) -> dict[str, torch.Tensor]:
    """The flat `llm.*` / `unet.*` / `trans_block.*` state dict of a tiny VisCPM-Paint checkpoint."""
    state = {f"llm.{k}": v for k, v in original_cpmbee_state_dict(TINY_PAINT_CPMBEE, llm_seed).items()}
    state.update({f"unet.{k}": v for k, v in tiny_paint_unet(unet_seed).state_dict().items()})
    dim_model, width = TINY_PAINT_CPMBEE["dim_model"], TINY_PAINT_UNET["cross_attention_dim"]
    # The original `CPMBeeTransBlock` parameter order: w_out_res.weight, layernorm.weight, layernorm.bias.
    trans_block = {
        "w_out_res.weight": torch.empty(width, dim_model),
        "layernorm.weight": torch.empty(width),
        "layernorm.bias": torch.empty(width),
    }
    seeded_fill_(trans_block.items(), trans_block_seed)
    state.update({f"trans_block.{k}": v for k, v in trans_block.items()})
    return state


def write_sd_base(folder: str | os.PathLike, vae_seed: int = TINY_PAINT_SEEDS["vae"]) -> None:
    """A tiny stand-in for stable-diffusion-2-1-base: `vae/` (weights), `scheduler/` and `unet/` (config)."""
    tiny_paint_vae(vae_seed).save_pretrained(os.path.join(folder, "vae"))
    PNDMScheduler.from_config(TINY_PAINT_SCHEDULER).save_pretrained(os.path.join(folder, "scheduler"))
    UNet2DConditionModel(**TINY_PAINT_UNET).save_config(os.path.join(folder, "unet"))
