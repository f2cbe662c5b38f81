"""Convert an original CPM-Bee checkpoint (VisCPM / cpm_live / openbmb/cpm-bee-*) into a transformers folder.

The output holds ``config.json``, ``generation_config.json``, sharded safetensors named as ``CpmBeeForCausalLM``
expects (``cpmbee.<original name>``; the lm_head is tied and not written), the tokenizer files and a model card.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import GenerationConfig

from .. import __version__
from ..hub import export_remote_code
from ..models.cpmbee.configuration_cpmbee import CpmBeeConfig
from ..models.cpmbee.generation_cpmbee import CpmBeeBeamSearchSettings
from ..models.cpmbee.modeling_cpmbee import CpmBeeForCausalLM
from ..models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer
from ._io import (
    CheckpointError,
    KeyMapping,
    KeyRule,
    OriginalCheckpoint,
    TensorSpec,
    add_output_arguments,
    atomic_output_dir,
    build_meta_model,
    check_against_expected,
    check_output_dir,
    converter_parser,
    expected_specs,
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

logger = logging.getLogger(__name__)

_LAYER = r"encoder\.layers\.\d+\."
# Original CPMBeeTorch names (after any `llm.` / `cpmbee.` prefix) -> names in CpmBeeForCausalLM.
CPMBEE_KEY_TABLE: tuple[KeyRule, ...] = (
    *(
        KeyRule(pattern, r"cpmbee.\g<0>")
        for pattern in (
            r"input_embedding\.weight",
            r"position_bias\.relative_attention_bias",
            _LAYER + r"self_att\.layernorm_before_attention\.weight",
            _LAYER + r"self_att\.self_attention\.project_[qkv]\.weight",
            _LAYER + r"self_att\.self_attention\.attention_out\.weight",
            _LAYER + r"ffn\.layernorm_before_ffn\.weight",
            _LAYER + r"ffn\.ffn\.w_in\.w_[01]\.weight",
            _LAYER + r"ffn\.ffn\.w_out\.weight",
            r"encoder\.output_layernorm\.weight",
        )
    ),
    KeyRule(r"lm_head\.weight", None, "the lm_head is tied to cpmbee.input_embedding.weight"),
)
# `llm.` wraps CPM-Bee inside a VisCPM model; `cpmbee.` is how the openbmb/cpm-bee-* remote-code repos save it.
_SOURCE_PREFIXES = ("llm.", "cpmbee.")


def _source_prefix(keys: Sequence[str]) -> str:
    """The prefix every CPM-Bee key of the checkpoint carries, or ``""``."""
    for prefix in _SOURCE_PREFIXES:
        if any(k.startswith(prefix) for k in keys) and all(
            k.startswith(prefix) or k == "lm_head.weight" for k in keys
        ):
            return prefix
    return ""


def read_original_config(original: str | os.PathLike | Mapping[str, Any]) -> CpmBeeConfig:
    """Our config from an original CPM-Bee config (JSON path or dict); a bad one is a CheckpointError naming it."""
    shown = "the given CPM-Bee config" if isinstance(original, Mapping) else str(original)
    try:
        return CpmBeeConfig.from_original_config(dict(original) if isinstance(original, Mapping) else original)
    except (OSError, ValueError, TypeError, AttributeError, StrictDataclassError) as e:
        raise CheckpointError(f"{shown}: not a usable original CPM-Bee config ({' '.join(str(e).split())})") from e


def check_vocabulary(config: CpmBeeConfig, tokenizer: CpmBeeTokenizer, where: str) -> None:
    """The tokenizer written with the model must number its ext-table ids from the model's ``vocab_size``."""
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"{where}: the config has vocab_size={config.vocab_size} but the CPM-Bee vocabulary has "
            f"{tokenizer.vocab_size} entries; the converted tokenizer and model would disagree on every ext id"
        )


def _check_config_matches(mapping: KeyMapping, specs: dict[str, TensorSpec], config: CpmBeeConfig, where: str) -> None:
    """Name a layer-count or vocabulary mismatch plainly before the key-by-key comparison."""
    layers = {
        int(m.group(1))
        for target in mapping.target_to_source
        if (m := re.match(r"cpmbee\.encoder\.layers\.(\d+)\.", target))
    }
    found = max(layers) + 1 if layers else 0
    if found != config.num_layers:
        raise CheckpointError(
            f"{where}: the checkpoint has {found} layers but the config has num_layers={config.num_layers}"
        )
    embedding = mapping.target_to_source.get("cpmbee.input_embedding.weight")
    if embedding is not None and specs[embedding].shape[0] != config.vocab_size:
        raise CheckpointError(
            f"{where}: {embedding!r} has {specs[embedding].shape[0]} rows but the config has "
            f"vocab_size={config.vocab_size}"
        )


def _size_name(num_parameters: int) -> str:
    """``10B`` / ``2B`` / ``5M``: how the releases name their size."""
    if num_parameters >= 1e9:
        return f"{num_parameters / 1e9:.0f}B"
    return f"{max(1, round(num_parameters / 1e6))}M"


def convert_cpmbee(
    checkpoint: str | os.PathLike,
    original_config_json: str | os.PathLike | dict,
    output_dir: str | os.PathLike,
    *,
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

    ``dtype=None`` keeps the checkpoint's dtype. Nothing is written unless the whole checkpoint checks out, and
    ``output_dir`` appears only once complete; an existing non-empty ``output_dir`` is replaced only with
    ``overwrite``. Bad inputs raise :class:`CheckpointError`. With ``push_to_hub`` the finished folder is uploaded.
    The folder ships the modelling code too (``trust_remote_code=True`` loading without the plugin) unless
    ``remote_code=False``.
    """
    output_dir = check_output_dir(output_dir, overwrite)
    dtype, max_shard_size = parse_dtype(dtype), parse_size(max_shard_size)
    config = read_original_config(original_config_json)
    source = OriginalCheckpoint(checkpoint)
    require_kind(source, "cpmbee")
    where = str(source.path)
    mapping = map_keys(source.keys(), CPMBEE_KEY_TABLE, strip_prefix=_source_prefix(source.keys()))
    _check_config_matches(mapping, source.specs, config, where)
    expected = expected_specs(build_meta_model(CpmBeeForCausalLM, config))
    check_against_expected(mapping, source.specs, expected, where)
    out_dtype = resolve_output_dtype(source.specs.values(), dtype)
    config.dtype = out_dtype

    for key, reason in mapping.dropped.items():
        logger.info("not converted: %s (%s)", key, reason)
    tokenizer = CpmBeeTokenizer()
    check_vocabulary(config, tokenizer, where)
    # Plain `generate()` keeps the stock defaults (greedy); `generate_answers()` reads the original's beam search
    # defaults (VLLMCPMBeeBeamSearch.generate: beam 3, 100 new tokens, no penalties) from their own field.
    beam_search = CpmBeeBeamSearchSettings(num_beams=3, max_new_tokens=100)
    generation = beam_search.save_to(
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    variant = _size_name(sum(spec.numel for spec in expected.values()))
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
        generation.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_model_card(
            tmp,
            "cpmbee",
            title=f"CPM-Bee {variant}",
            variant=variant,
            source_file=source.path.name,
            converter_version=__version__,
            repo_id=push_to_hub or Path(output_dir).name,  # never a local absolute path
            snippet_max_new_tokens=beam_search.max_new_tokens,
            dtype=str(out_dtype).removeprefix("torch."),
        )
        if remote_code:
            export_remote_code(tmp, "cpmbee")
    if push_to_hub:
        push_folder_to_hub(
            output_dir,
            push_to_hub,
            private=private,
            commit_message=f"Add CPM-Bee converted from {source.path.name} (transformers-viscpm {__version__})",
        )
    return output_dir


def _parser() -> argparse.ArgumentParser:
    parser = converter_parser(
        "cpmbee",
        "Convert an original CPM-Bee checkpoint into a transformers CpmBeeForCausalLM folder.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="original state dict (.pt/.bin, torch.save zip format) or a directory of pytorch_model*.bin shards",
    )
    parser.add_argument("--config", required=True, help="original CPM-Bee config JSON (e.g. cpm-bee-10b.json)")
    parser.add_argument("--output", required=True, help="output folder (created atomically)")
    add_output_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (1 with a one-line message for a bad input or output)."""
    return run_converter_cli(
        _parser(), argv, lambda args, options: convert_cpmbee(args.checkpoint, args.config, args.output, **options)
    )
