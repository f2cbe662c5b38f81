"""Convert an original VisCPM-Paint checkpoint plus a Stable Diffusion 2.1 base folder into a diffusers repository.

The original file holds CPM-Bee (``llm.*``), the projection to the UNet's cross-attention width (``trans_block.*``)
and the UNet (``unet.*``); the VAE and the scheduler come from stabilityai/stable-diffusion-2-1-base, as the original
loads them. The output is what ``VisCPMPaintPipeline.save_pretrained`` would write: ``model_index.json``,
``text_encoder/`` (``VisCPMPaintTextEncoder``: ``cpmbee.*`` + ``trans_block.*``), ``unet/``, ``vae/`` (all sharded
safetensors), ``scheduler/`` (a ``DDPMScheduler`` config, the original's sampler), ``tokenizer/`` and a model card.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from .. import __version__
from ..hub import export_remote_code
from ..models.cpmbee.configuration_cpmbee import CpmBeeConfig
from ..models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer
from ..pipelines.viscpm_paint import VisCPMPaintPipeline, VisCPMPaintTextEncoder, VisCPMPaintTextEncoderConfig
from ._io import (
    CheckpointError,
    KeyMapping,
    KeyRule,
    OriginalCheckpoint,
    add_output_arguments,
    atomic_output_dir,
    build_meta_model,
    check_against_expected,
    check_output_dir,
    converter_parser,
    expected_specs,
    identify_checkpoint_kind,
    map_keys,
    parse_dtype,
    parse_size,
    push_folder_to_hub,
    require_kind,
    resolve_output_dtype,
    run_converter_cli,
    write_model_card,
    write_safetensors_shards,
)
from .convert_cpmbee import _check_config_matches, check_vocabulary, read_original_config

# Original VLG_CPMBee names -> "<pipeline component>/<name in that component>" (first match wins).
VISCPM_PAINT_KEY_TABLE: tuple[KeyRule, ...] = (
    KeyRule(r"llm\.(.+)", r"text_encoder/cpmbee.\1"),
    KeyRule(r"trans_block\.(w_out_res\.weight|layernorm\.weight|layernorm\.bias)", r"text_encoder/trans_block.\1"),
    KeyRule(r"unet\.(.+)", r"unet/\1"),
)
# diffusers renamed the VAE attention projections; it renames older files (stable-diffusion-2-1-base's among them)
# on load, and so does this table. Every other VAE key keeps its name.
VAE_KEY_TABLE: tuple[KeyRule, ...] = (
    KeyRule(r"(.+\.attentions\.\d+\.)query\.(weight|bias)", r"\1to_q.\2"),
    KeyRule(r"(.+\.attentions\.\d+\.)key\.(weight|bias)", r"\1to_k.\2"),
    KeyRule(r"(.+\.attentions\.\d+\.)value\.(weight|bias)", r"\1to_v.\2"),
    KeyRule(r"(.+\.attentions\.\d+\.)proj_attn\.(weight|bias)", r"\1to_out.0.\2"),
    KeyRule(r".+", r"\g<0>"),
)
TRANS_BLOCK_WEIGHT = "trans_block.w_out_res.weight"
DIFFUSERS_WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"
# The SD base's VAE weights, in the order diffusers prefers them.
VAE_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# The original `VisCPMPaint.generate` draws with 50 DDPM steps.
ORIGINAL_STEPS = 50

# Released files of openbmb/VisCPM-Paint and what they are (for the model card).
_VARIANTS = {"balance": "balanced Chinese and English ability", "zhplus": "stronger Chinese ability"}


def _variant(source_file: str) -> tuple[str, str]:
    for key, description in _VARIANTS.items():
        if key in source_file:
            return key, description
    return "custom", "a VisCPM-Paint checkpoint"


def _component_mapping(mapping: KeyMapping, component: str, unexpected: list[str]) -> KeyMapping:
    """The part of the whole-checkpoint mapping that belongs to one pipeline component."""
    prefix = component + "/"
    return KeyMapping(
        {t.removeprefix(prefix): s for t, s in mapping.target_to_source.items() if t.startswith(prefix)},
        {},
        unexpected,
    )


def _read_config(folder: Path, config_name: str, class_name: str, what: str) -> dict[str, Any]:
    """A component config of the SD base, refusing a missing file or one written for another class."""
    path = folder / config_name
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; the SD base must be a stabilityai/stable-diffusion-2-1-base folder with {what}"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a config (a JSON object)")
    found = config.get("_class_name", class_name)
    if class_name != "*" and found != class_name:
        raise CheckpointError(f"{path}: describes a {found}, expected a {class_name}")
    return config


def _meta_diffusers_model(cls: type, config: Mapping[str, Any], path: Path) -> torch.nn.Module:
    try:
        return build_meta_model(cls.from_config, dict(config))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: not a usable {cls.__name__} config ({e})") from e


def _check_sd_base(
    sd_base: Path, unet_config: Mapping[str, Any], vae_config: Mapping[str, Any], projection_dim: int, source: str
) -> None:
    """The UNet must take the trans_block output as cross-attention states and the VAE's latents as samples."""
    cross = unet_config.get("cross_attention_dim")
    if cross != projection_dim:
        raise CheckpointError(
            f"{sd_base / 'unet' / 'config.json'}: cross_attention_dim is {cross}, but {source}'s "
            f"{TRANS_BLOCK_WEIGHT} projects to {projection_dim}; this SD base does not belong to the checkpoint "
            "(VisCPM-Paint uses stabilityai/stable-diffusion-2-1-base)"
        )
    latent = vae_config.get("latent_channels", 4)
    for field in ("in_channels", "out_channels"):
        if unet_config.get(field, 4) != latent:
            raise CheckpointError(
                f"{sd_base / 'unet' / 'config.json'}: {field} is {unet_config.get(field, 4)}, but the VAE in "
                f"{sd_base / 'vae'} has latent_channels={latent}"
            )


def _vae_weights(folder: Path) -> OriginalCheckpoint:
    """The SD base's VAE weights, streamed like the original checkpoint (so they never sit in memory whole)."""
    for name in VAE_WEIGHT_FILES:
        if (folder / name).is_file():
            return OriginalCheckpoint(folder / name)
    raise CheckpointError(f"{folder}: holds no VAE weights ({' or '.join(VAE_WEIGHT_FILES)})")


def _text_encoder_config(
    source: OriginalCheckpoint, llm_config: str | os.PathLike | Mapping[str, Any] | None
) -> VisCPMPaintTextEncoderConfig:
    """CPM-Bee from the original config JSON (default: the released 10B) and the width of ``trans_block``."""
    if TRANS_BLOCK_WEIGHT not in source:
        raise CheckpointError(f"{source.path}: has no {TRANS_BLOCK_WEIGHT!r} (the projection to the UNet width)")
    shape = source.specs[TRANS_BLOCK_WEIGHT].shape
    if len(shape) != 2:
        raise CheckpointError(
            f"{source.path}: {TRANS_BLOCK_WEIGHT!r} has shape {list(shape)}, expected [cross_attention_dim, dim_model]"
        )
    cpmbee_config = CpmBeeConfig() if llm_config is None else read_original_config(llm_config)
    return VisCPMPaintTextEncoderConfig(cpmbee_config=cpmbee_config, projection_dim=shape[0])


def convert_viscpm_paint(
    checkpoint: str | os.PathLike,
    sd_base: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    llm_config: str | os.PathLike | Mapping[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    push_to_hub: str | None = None,
    private: bool = False,
    remote_code: bool = False,
    allow_non_finite: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Convert ``checkpoint`` with the VAE and scheduler of ``sd_base`` into the diffusers repo ``output_dir``.

    ``llm_config`` is the original CPM-Bee config (JSON path or dict; default: the released 10B). ``dtype=None``
    keeps the checkpoint's dtype (the VAE is cast to it). Nothing is written unless the checkpoint and the SD base
    check out, and ``output_dir`` appears only once complete; an existing non-empty ``output_dir`` is replaced only
    with ``overwrite``. Bad inputs raise :class:`CheckpointError`. With ``push_to_hub`` the folder is uploaded.
    With ``remote_code`` the folder ships the pipeline's code too, for ``trust_remote_code=True`` loading without the
    plugin. It is off by default, unlike the transformers converters: diffusers runs a repo's pipeline code whenever
    the repo ships it and refuses to load it without ``trust_remote_code=True``, plugin or not, so shipping it would
    make every plugin user trust the repo's code instead of their own.
    """
    output_dir = check_output_dir(output_dir, overwrite)
    dtype, max_shard_size = parse_dtype(dtype), parse_size(max_shard_size)
    source = OriginalCheckpoint(checkpoint)
    require_kind(source, "viscpm_paint")
    where = str(source.path)
    if identify_checkpoint_kind(source.keys())[0] != "viscpm_paint":
        raise CheckpointError(
            f"{where}: has no unet.* or trans_block.* keys, so it is not a VisCPM-Paint checkpoint (a plain CPM-Bee "
            "one converts with `viscpm convert cpmbee`)"
        )
    sd_base = Path(sd_base)
    if not sd_base.is_dir():
        raise CheckpointError(f"{sd_base}: no such SD base folder (a local stabilityai/stable-diffusion-2-1-base)")
    unet_config = _read_config(sd_base / "unet", "config.json", UNet2DConditionModel.__name__, "unet/config.json")
    vae_config = _read_config(sd_base / "vae", "config.json", AutoencoderKL.__name__, "vae/ (config and weights)")
    scheduler_config = _read_config(sd_base / "scheduler", "scheduler_config.json", "*", "scheduler/")
    text_config = _text_encoder_config(source, llm_config)
    _check_sd_base(sd_base, unet_config, vae_config, text_config.projection_dim, source.path.name)

    mapping = map_keys(source.keys(), VISCPM_PAINT_KEY_TABLE)
    text_mapping = _component_mapping(mapping, "text_encoder", mapping.unexpected)
    unet_mapping = _component_mapping(mapping, "unet", [])
    llm_where = f"{where} (llm.* against the {'given' if llm_config is not None else 'default 10B'} CPM-Bee config)"
    _check_config_matches(text_mapping, source.specs, text_config.cpmbee_config, llm_where)
    text_encoder = build_meta_model(VisCPMPaintTextEncoder, text_config)
    text_expected = expected_specs(text_encoder)
    check_against_expected(text_mapping, source.specs, text_expected, f"{where} (llm.*, trans_block.*)")
    unet = _meta_diffusers_model(UNet2DConditionModel, unet_config, sd_base / "unet" / "config.json")
    unet_expected = expected_specs(unet)
    check_against_expected(unet_mapping, source.specs, unet_expected, f"{where} (unet.* against {sd_base / 'unet'})")
    vae = _meta_diffusers_model(AutoencoderKL, vae_config, sd_base / "vae" / "config.json")
    vae_source = _vae_weights(sd_base / "vae")
    vae_mapping = map_keys(vae_source.keys(), VAE_KEY_TABLE)
    vae_expected = expected_specs(vae)
    check_against_expected(vae_mapping, vae_source.specs, vae_expected, f"{vae_source.path} (the SD base's VAE)")
    out_dtype = resolve_output_dtype(source.specs.values(), dtype)
    text_config.dtype = out_dtype
    try:
        # The original samples with DDPMScheduler.from_pretrained(sd_base, subfolder="scheduler").
        scheduler = DDPMScheduler.from_config(scheduler_config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{sd_base / 'scheduler'}: not a usable scheduler config ({e})") from e
    tokenizer = CpmBeeTokenizer()
    check_vocabulary(text_config.cpmbee_config, tokenizer, where)
    # Built on the meta device only to write model_index.json exactly as save_pretrained would.
    index_pipeline = VisCPMPaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    variant, variant_description = _variant(source.path.name)
    image_size = unet.config.sample_size * index_pipeline.vae_scale_factor

    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        scheduler.save_pretrained(tmp / "scheduler")
        tokenizer.save_pretrained(tmp / "tokenizer")
        for component, component_source, component_mapping, expected, pattern in (
            ("text_encoder", source, text_mapping, text_expected, "model{suffix}.safetensors"),
            ("unet", source, unet_mapping, unet_expected, DIFFUSERS_WEIGHTS_PATTERN),
            ("vae", vae_source, vae_mapping, vae_expected, DIFFUSERS_WEIGHTS_PATTERN),
        ):
            folder = tmp / component
            folder.mkdir()
            write_safetensors_shards(
                component_source,
                component_mapping.target_to_source,
                expected,
                folder,
                out_dtype,
                max_shard_size=max_shard_size,
                filename_pattern=pattern,
                show_progress=show_progress,
                allow_non_finite=allow_non_finite,
            )
        text_config.save_pretrained(tmp / "text_encoder")
        unet.save_config(tmp / "unet")
        vae.save_config(tmp / "vae")
        index_pipeline.save_config(tmp)
        write_model_card(
            tmp,
            "viscpm_paint",
            variant=variant,
            variant_description=variant_description,
            source_file=source.path.name,
            converter_version=__version__,
            repo_id=push_to_hub or Path(output_dir).name,  # never a local absolute path
            snippet_steps=ORIGINAL_STEPS,
            snippet_size=image_size,
            title=f"VisCPM-Paint ({variant})",
            pipeline_tag="text-to-image",
            dtype=str(out_dtype).removeprefix("torch."),
        )
        if remote_code:
            export_remote_code(tmp, "viscpm_paint")
    if push_to_hub:
        push_folder_to_hub(
            output_dir,
            push_to_hub,
            private=private,
            commit_message=f"Add VisCPM-Paint converted from {source.path.name} (transformers-viscpm {__version__})",
        )
    return output_dir


def _parser() -> argparse.ArgumentParser:
    parser = converter_parser(
        "viscpm_paint",
        "Convert an original VisCPM-Paint checkpoint and a Stable Diffusion 2.1 base folder into a "
        "diffusers VisCPMPaintPipeline repository (weights, configs, tokenizer, model card).",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="original state dict (e.g. viscpm_paint_balance_checkpoint.pt, torch.save zip format) or a directory of "
        "pytorch_model*.bin shards",
    )
    parser.add_argument(
        "--sd-base",
        required=True,
        help="local stabilityai/stable-diffusion-2-1-base folder (vae/, scheduler/, unet/config.json)",
    )
    parser.add_argument("--output", required=True, help="output folder (created atomically)")
    parser.add_argument("--llm-config", help="original CPM-Bee config JSON (default: the released 10B)")
    add_output_arguments(parser, remote_code=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (1 with a one-line message for a bad input or output)."""
    return run_converter_cli(
        _parser(),
        argv,
        lambda args, options: convert_viscpm_paint(
            args.checkpoint, args.sd_base, args.output, llm_config=args.llm_config, **options
        ),
    )
