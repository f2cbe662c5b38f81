"""CPM-Bee configuration."""

from __future__ import annotations

import json
import os
from typing import Any

from huggingface_hub.dataclasses import as_validated_field, strict
from transformers import PreTrainedConfig
from transformers.utils.type_validators import interval, probability


@as_validated_field
def positive_int(value: int) -> None:
    """A size or count: an integer >= 1 (checked here: annotations are not evaluated under postponed evaluation)."""
    if type(value) is not int or value < 1:
        raise ValueError(f"must be a positive integer, got {value!r}")


# Keys of the original `CPMBeeConfig` JSON that map one-to-one onto our fields.
_ORIGINAL_KEYS = (
    "vocab_size",
    "dim_model",
    "dim_ff",
    "num_layers",
    "num_heads",
    "dim_head",
    "dropout_p",
    "position_bias_num_buckets",
    "position_bias_num_segment_buckets",
    "position_bias_max_distance",
    "eps",
    "mask_modules",
)


@strict
class CpmBeeConfig(PreTrainedConfig):
    r"""
    Configuration of a CPM-Bee language model (the text core of VisCPM-Chat and VisCPM-Paint).

    The field names are those of the original `CPMBeeConfig` so that released config files read as they are (see
    [`~CpmBeeConfig.from_original_config`]); the usual transformers names (`hidden_size`, `num_hidden_layers`, ...)
    are aliases. Defaults describe the released 10B model.

    Args:
        vocab_size (`int`, defaults to 86583): size of the released CPM-Bee vocabulary. Logits have
            `vocab_size + E` entries where `E` is the width of the batch ext table.
        dim_model (`int`, defaults to 4096): hidden size.
        dim_ff (`int`, defaults to 10240): width of the gated-GELU feed-forward layer.
        num_layers (`int`, defaults to 48): number of transformer blocks.
        num_heads (`int`, defaults to 32): attention heads.
        dim_head (`int`, defaults to 128): size of each head (`num_heads * dim_head` need not equal `dim_model`).
        dropout_p (`float`, defaults to 0.0): dropout on attention weights, inside the FFN and on each block output.
        position_bias_num_buckets (`int`, defaults to 256): relative-position buckets used inside a segment.
        position_bias_num_segment_buckets (`int`, defaults to 256): segment-relation buckets used across segments.
        position_bias_max_distance (`int`, defaults to 2048): distance at which the log-spaced buckets saturate.
        eps (`float`, defaults to 1e-6): RMSNorm epsilon.
        mask_modules (`list[list[bool]]`, *optional*): per layer `[mask_att, mask_ffn]`; a masked sub-block does not
            exist (the 1b/2b/5b releases drop some attention and FFN blocks).
        init_std (`float`, defaults to 1.0): std of freshly initialised weights. CPM-Bee linears divide by
            `sqrt(fan_in)`, so unit-variance weights keep activations well scaled.
    """

    model_type = "cpmbee"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "hidden_size": "dim_model",
        "intermediate_size": "dim_ff",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "head_dim": "dim_head",
        "rms_norm_eps": "eps",
        "attention_dropout": "dropout_p",
    }
    # `from_pretrained(..., tp_plan="auto")`: heads and FFN columns sharded like llama's. The position-bias table
    # `(buckets, heads)` is sharded on its head dimension ("rowwise" is the style that shards a parameter's last
    # dimension) and its module runs on the local shard, so each rank biases only its own heads.
    base_model_tp_plan = {
        "position_bias.relative_attention_bias": "rowwise",
        "position_bias": "local_params",
        "encoder.layers.*.self_att.self_attention.project_q": "colwise",
        "encoder.layers.*.self_att.self_attention.project_k": "colwise",
        "encoder.layers.*.self_att.self_attention.project_v": "colwise",
        "encoder.layers.*.self_att.self_attention.attention_out": "rowwise",
        "encoder.layers.*.ffn.ffn.w_in.w_0": "colwise",
        "encoder.layers.*.ffn.ffn.w_in.w_1": "colwise",
        "encoder.layers.*.ffn.ffn.w_out": "rowwise",
    }

    vocab_size: int = positive_int(default=86583)
    dim_model: int = positive_int(default=4096)
    dim_ff: int = positive_int(default=10240)
    num_layers: int = positive_int(default=48)
    num_heads: int = positive_int(default=32)
    dim_head: int = positive_int(default=128)
    dropout_p: float | int = probability(default=0.0)
    position_bias_num_buckets: int = positive_int(default=256)
    position_bias_num_segment_buckets: int = positive_int(default=256)
    position_bias_max_distance: int = positive_int(default=2048)
    eps: float = interval(min=0, exclude_min=True)(default=1e-6)
    mask_modules: list[list[bool]] | None = None
    init_std: float = interval(min=0)(default=1.0)
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    unk_token_id: int | None = 1
    bos_token_id: int | None = 6
    eos_token_id: int | list[int] | None = 7

    def __post_init__(self, **kwargs):
        if self.mask_modules is not None:
            self.mask_modules = [[bool(mask_att), bool(mask_ffn)] for mask_att, mask_ffn in self.mask_modules]
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation: `mask_modules` must give `[mask_att, mask_ffn]` for every layer."""
        if self.mask_modules is not None:
            if len(self.mask_modules) != self.num_layers:
                raise ValueError(
                    f"`mask_modules` has {len(self.mask_modules)} entries but the model has {self.num_layers} layers."
                )
            if any(len(mask) != 2 for mask in self.mask_modules):
                raise ValueError("Each `mask_modules` entry must be `[mask_att, mask_ffn]`.")

    def layer_has_attention(self, layer_idx: int) -> bool:
        return self.mask_modules is None or not self.mask_modules[layer_idx][0]

    def layer_has_ffn(self, layer_idx: int) -> bool:
        return self.mask_modules is None or not self.mask_modules[layer_idx][1]

    @classmethod
    def from_original_config(cls, path_or_dict: str | os.PathLike | dict[str, Any], **kwargs) -> CpmBeeConfig:
        """Build a config from an original CPM-Bee config (a JSON file such as `cpm-bee-10b.json`, or its dict).

        The original's `half` flag is ignored: choose the weight dtype with `dtype=` when loading.
        """
        if isinstance(path_or_dict, dict):
            original = dict(path_or_dict)
        else:
            with open(path_or_dict, encoding="utf-8") as f:
                original = json.load(f)
        unknown = set(original) - set(_ORIGINAL_KEYS) - {"half"}
        if unknown:
            raise ValueError(f"Unknown keys in the original CPM-Bee config: {sorted(unknown)}")
        fields = {key: original[key] for key in _ORIGINAL_KEYS if key in original}
        fields.update(kwargs)
        return cls(**fields)


__all__ = ["CpmBeeConfig", "positive_int"]
