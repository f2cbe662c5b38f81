"""Convert an original VisCPM-Chat checkpoint (`VLU_CPMBee.state_dict()`) into a transformers folder.

The output holds ``config.json``, ``generation_config.json`` (the original ``chat()`` decoding), sharded safetensors
named as ``VisCPMChatForConditionalGeneration`` expects, the tokenizer, the image processor, the processor with its
chat template, and a model card.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from .. import __version__
from ..hub import export_remote_code
from ..models.cpmbee.configuration_cpmbee import CpmBeeConfig
from ..models.cpmbee.generation_cpmbee import CpmBeeBeamSearchSettings
from ..models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer
from ..models.viscpm_chat.configuration_viscpm_chat import VisCPMChatConfig, VisCPMChatVisionConfig
from ..models.viscpm_chat.image_processing_viscpm_chat import VisCPMChatImageProcessor
from ..models.viscpm_chat.modeling_viscpm_chat import VisCPMChatForConditionalGeneration
from ..models.viscpm_chat.processing_viscpm_chat import VisCPMChatProcessor
from ._io import (
    CheckpointError,
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
    push_folder_to_hub,
    require_kind,
    resolve_output_dtype,
    run_converter_cli,
    write_model_card,
    write_safetensors_shards,
)
from .convert_cpmbee import check_vocabulary, read_original_config

# Original VLU_CPMBee names -> names in VisCPMChatForConditionalGeneration (first match wins).
VISCPM_CHAT_KEY_TABLE: tuple[KeyRule, ...] = (
    KeyRule(r"vpm\.mim_head\..+", None, "BEiT-3 masked-image-modelling head, unused at inference"),
    KeyRule(r"vpm\.beit3\.text_embed\.weight", None, "BEiT-3 text embedding, only used to initialise the queries"),
    KeyRule(r"vpm\.beit3\.vision_embed\.mask_token", None, "masked-image-modelling token, unused at inference"),
    KeyRule(r"vpm\.beit3\.(.+)", r"model.vision_model.\1"),
    KeyRule(r"query", "model.query"),
    KeyRule(r"mapping\.([02])\.(weight|bias)", r"model.mapping.\1.\2"),
    KeyRule(r"llm\.(.+)", r"model.language_model.\1"),
)

# The original `VisCPMChat.chat` decoding (VisCPM/viscpm_chat.py).
# The original `VisCPMChat.chat` decoding, kept for `chat()` in the generation config's own field.
CHAT_BEAM_SEARCH = CpmBeeBeamSearchSettings(
    num_beams=3, max_new_tokens=512, repetition_penalty=1.1, length_penalty=3.0, temperature=0.7
)

# Released files of openbmb/VisCPM-Chat and what they are (for the model card).
_VARIANTS = {
    "balance": "balanced Chinese and English ability",
    "zhplus": "stronger Chinese ability",
    "v1": "version 1.1, balanced Chinese and English ability",
}


def _variant(source_file: str) -> tuple[str, str]:
    for key, description in _VARIANTS.items():
        if key in source_file:
            return key, description
    return "custom", "a VisCPM-Chat checkpoint"


def build_config(
    checkpoint: OriginalCheckpoint,
    llm_config: str | os.PathLike | Mapping[str, Any] | None,
    vision_config: Mapping[str, Any] | VisCPMChatVisionConfig | None,
) -> VisCPMChatConfig:
    """The config of the converted model: CPM-Bee from the original config JSON (default: the released 10B), BEiT-3
    large with `vision_config` overrides, and the query count read from the checkpoint's `query`."""
    text_config = CpmBeeConfig() if llm_config is None else read_original_config(llm_config)
    if isinstance(vision_config, VisCPMChatVisionConfig):
        vision = vision_config
    else:
        vision = VisCPMChatVisionConfig(**dict(vision_config or {}))
    if "query" not in checkpoint:
        raise CheckpointError(f"{checkpoint.path}: has no 'query' tensor (the learned BEiT-3 queries)")
    query_shape = checkpoint.specs["query"].shape
    if len(query_shape) != 2:
        raise CheckpointError(f"{checkpoint.path}: 'query' has shape {list(query_shape)}, expected [query_num, width]")
    return VisCPMChatConfig(vision_config=vision, text_config=text_config, query_num=query_shape[0])


def convert_viscpm_chat(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    llm_config: str | os.PathLike | Mapping[str, Any] | None = None,
    vision_config: Mapping[str, Any] | VisCPMChatVisionConfig | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    push_to_hub: str | None = None,
    private: bool = False,
    remote_code: bool = True,
    allow_non_finite: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Convert ``checkpoint`` (a file, or a directory of ``pytorch_model*.bin`` shards) into ``output_dir``.

    ``llm_config`` is the original CPM-Bee config (JSON path or dict; default: the released 10B); ``vision_config``
    overrides fields of the BEiT-3 large configuration. ``dtype=None`` keeps the checkpoint's dtype. Nothing is
    written unless the whole checkpoint checks out, and ``output_dir`` appears only once complete; an existing
    non-empty ``output_dir`` is replaced only with ``overwrite``. Bad inputs raise :class:`CheckpointError`. With
    ``push_to_hub`` the finished folder is uploaded to that repo.
    The folder ships the modelling code too (``trust_remote_code=True`` loading without the plugin) unless
    ``remote_code=False``.
    """
    output_dir = check_output_dir(output_dir, overwrite)
    source = OriginalCheckpoint(checkpoint)
    require_kind(source, "viscpm_chat")
    where = str(source.path)
    if identify_checkpoint_kind(source.keys())[0] != "viscpm_chat":
        raise CheckpointError(
            f"{where}: has no vpm.*, query or mapping.* keys, so it is not a VisCPM-Chat checkpoint (a plain CPM-Bee "
            "one converts with `viscpm convert cpmbee`)"
        )
    config = build_config(source, llm_config, vision_config)
    mapping = map_keys(source.keys(), VISCPM_CHAT_KEY_TABLE)
    expected = expected_specs(build_meta_model(VisCPMChatForConditionalGeneration, config))
    check_against_expected(mapping, source.specs, expected, where)
    out_dtype = resolve_output_dtype(source.specs.values(), dtype)
    config.dtype = out_dtype

    tokenizer = CpmBeeTokenizer()
    check_vocabulary(config.text_config, tokenizer, where)
    processor = VisCPMChatProcessor(VisCPMChatImageProcessor(), tokenizer, query_num=config.query_num)
    variant, variant_description = _variant(source.path.name)
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        write_safetensors_shards(
            source,
            mapping.target_to_source,
            expected,
            tmp,
            out_dtype,
            max_shard_size=max_shard_size,
            show_progress=show_progress,
            allow_non_finite=allow_non_finite,
        )
        config.save_pretrained(tmp)
        # Plain `generate()` keeps the stock defaults (greedy); `chat()` reads the original's settings.
        generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        CHAT_BEAM_SEARCH.save_to(generation_config).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_model_card(
            tmp,
            "viscpm_chat",
            variant=variant,
            variant_description=variant_description,
            source_file=source.path.name,
            converter_version=__version__,
            repo_id=push_to_hub or Path(output_dir).name,  # never a local absolute path
            title=f"VisCPM-Chat ({variant})",
            pipeline_tag="image-text-to-text",
            dtype=str(out_dtype).removeprefix("torch."),
            dropped_keys=", ".join(sorted(mapping.dropped)) or "none",
        )
        if remote_code:
            export_remote_code(tmp, "viscpm_chat")
    if push_to_hub:
        push_folder_to_hub(
            output_dir,
            push_to_hub,
            private=private,
            commit_message=f"Add VisCPM-Chat converted from {source.path.name} (transformers-viscpm {__version__})",
        )
    return output_dir


def _parser() -> argparse.ArgumentParser:
    parser = converter_parser(
        "viscpm_chat",
        "Convert an original VisCPM-Chat checkpoint into a transformers VisCPMChatForConditionalGeneration "
        "folder (weights, configs, tokenizer, processor, chat template, model card).",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="original state dict (e.g. viscpm_chat_balance_checkpoint.pt, torch.save zip format) or a directory of "
        "pytorch_model*.bin shards",
    )
    parser.add_argument("--output", required=True, help="output folder (created atomically)")
    parser.add_argument("--llm-config", help="original CPM-Bee config JSON (default: the released 10B)")
    parser.add_argument(
        "--vision-config",
        metavar="JSON",
        help="BEiT-3 overrides as JSON, e.g. '{\"num_hidden_layers\": 12}' (default: BEiT-3 large)",
    )
    add_output_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (1 with a one-line message for a bad input or output)."""
    parser = _parser()

    def convert(args: argparse.Namespace, options: dict[str, Any]) -> Path:
        try:
            vision_config = json.loads(args.vision_config) if args.vision_config else None
        except ValueError as e:
            parser.error(f"--vision-config is not valid JSON: {e}")
        if vision_config is not None and not isinstance(vision_config, dict):
            parser.error("--vision-config must be a JSON object")
        return convert_viscpm_chat(
            args.checkpoint, args.output, llm_config=args.llm_config, vision_config=vision_config, **options
        )

    return run_converter_cli(parser, argv, convert)
