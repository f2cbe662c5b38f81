# Copyright 2025 The transformers-viscpm developers. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The VisCPM-Paint text encoder: CPM-Bee followed by the `trans_block` projection.

The projection lives here, not in the UNet, because of the original data flow
(`SDWrapper.generate`): `trans_block` maps CPM-Bee's hidden states once per prompt, before the
denoising loop, to the width of the UNet's cross-attention. Keeping it with CPM-Bee means

- `prompt_embeds` / `negative_prompt_embeds` are what diffusers pipelines expect: tensors the UNet consumes
  directly, which users can precompute and reuse;
- the UNet stays a stock `UNet2DConditionModel` (the released `unet.*` weights load unchanged, and anything
  written for SD-2.1 UNets applies);
- model CPU offload moves the projection with the model that produces its input.

Weight names keep the original ones: `cpmbee.*` (DESIGN.md) and `trans_block.w_out_res.weight`,
`trans_block.layernorm.{weight,bias}`.
"""

from __future__ import annotations

import math

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput
from transformers.processing_utils import Unpack
from transformers.utils.type_validators import interval

from ...models.cpmbee.configuration_cpmbee import CpmBeeConfig, positive_int
from ...models.cpmbee.modeling_cpmbee import CpmBeeModel
from ...models.cpmbee.structure_cpmbee import STOCK_KEYS, STRUCTURE_KEYS, CpmBeeStructureKwargs
from ...quantization import memory_footprint

__all__ = ["VisCPMPaintTextEncoder", "VisCPMPaintTextEncoderConfig"]


@strict
class VisCPMPaintTextEncoderConfig(PreTrainedConfig):
    r"""
    Configuration of [`VisCPMPaintTextEncoder`]. Defaults describe the released VisCPM-Paint (CPM-Bee 10B, SD-2.1).

    Args:
        cpmbee_config (`dict` or [`CpmBeeConfig`], *optional*): the CPM-Bee language model.
        projection_dim (`int`, defaults to 1024): output width, the UNet's `cross_attention_dim`.
        layer_norm_eps (`float`, defaults to 1e-6): epsilon of the projection's LayerNorm (the original's value).
    """

    model_type = "viscpm_paint_text_encoder"
    sub_configs_defaults = {"cpmbee_config": CpmBeeConfig}

    cpmbee_config: dict | CpmBeeConfig | None = None
    projection_dim: int = positive_int(default=1024)
    layer_norm_eps: float = interval(min=0, exclude_min=True)(default=1e-6)


class VisCPMPaintTransBlock(nn.Module):
    """Linear (no bias) to the cross-attention width, then LayerNorm: the original `CPMBeeTransBlock`."""

    def __init__(self, config: VisCPMPaintTextEncoderConfig) -> None:
        super().__init__()
        self.w_out_res = nn.Linear(config.cpmbee_config.dim_model, config.projection_dim, bias=False)
        self.layernorm = nn.LayerNorm(config.projection_dim, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layernorm(self.w_out_res(hidden_states))


class VisCPMPaintTextEncoder(PreTrainedModel):
    """CPM-Bee over a structured prompt, projected to UNet cross-attention states for every position.

    Every position is returned, left padding included: the original UNet attends to all of them (its padded
    positions carry CPM-Bee's output for `<pad>`, which this model reproduces), so the padding is part of the
    conditioning the released weights were trained with.
    """

    config_class = VisCPMPaintTextEncoderConfig
    base_model_prefix = "text_encoder"
    main_input_name = "input_ids"
    _no_split_modules = ["CpmBeeTransformerBlock"]
    _supports_sdpa = True
    # The CPM-Bee tensors of a structured encoding (DESIGN.md) that `forward` takes.
    encoder_input_names = (*STOCK_KEYS, *STRUCTURE_KEYS)
    # Counts the packed data of quantized weights (transformers' own counts their unquantized size).
    get_memory_footprint = memory_footprint

    def __init__(self, config: VisCPMPaintTextEncoderConfig) -> None:
        super().__init__(config)
        self.cpmbee = CpmBeeModel(config.cpmbee_config)
        self.trans_block = VisCPMPaintTransBlock(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is self.trans_block.w_out_res:
            init.normal_(module.weight, mean=0.0, std=1.0 / math.sqrt(module.in_features))
        elif module is self.trans_block.layernorm:
            init.ones_(module.weight)
            init.zeros_(module.bias)
        else:
            # CPM-Bee's own rule, read from its own config.
            self.cpmbee._init_weights(module)

    def get_input_embeddings(self) -> nn.Module:
        return self.cpmbee.input_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.cpmbee.input_embedding = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        **structure: Unpack[CpmBeeStructureKwargs],
    ) -> BaseModelOutput:
        """The full CPM-Bee forward over the (left-padded) encoding, then `trans_block` on every position."""
        hidden_states = self.cpmbee(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **structure,
        ).last_hidden_state
        return BaseModelOutput(last_hidden_state=self.trans_block(hidden_states))
