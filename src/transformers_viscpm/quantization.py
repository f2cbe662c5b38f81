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
"""Running the 10B models on small machines: memory that quantized weights really take, the device an offloaded
model computes its embeddings on, and the quantization configs behind the CLI's `--quantize`.

The tied embedding / output matrix (86,583 x 4,096 = 355M parameters at the 10B shapes, 709 MB in bf16) is shared by
the embedding lookup and the vocabulary projection. transformers keeps tied weights unquantized by default; torchao
can quantize it once for both uses (`TorchAoConfig(FqnToConfig({"_default": ...}),
include_input_output_embeddings=True)`, what `quantization_config(..., embeddings=True)` builds), saving 355 MB at
int8. Quantizing the head alone would untie it and add a copy, so quanto and bitsandbytes keep it as loaded.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch is imported where it is used: the CLI reads QUANTIZE_CHOICES before anything heavy
    import torch
    from torch import nn

QUANTIZE_CHOICES = ("int8", "int4")


def _storages(tensor: torch.Tensor) -> dict[tuple[int, str], int]:
    """The storages holding `tensor`'s data, by (pointer, device): plain tensors hold one; quantized tensor subclasses
    (torchao, optimum-quanto, bitsandbytes) hold their packed data and scales in inner tensors."""
    import torch
    from torch import nn

    if tensor.device.type == "meta":
        return {}
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        storages = {}
        for name in tensor.__tensor_flatten__()[0]:
            storages.update(_storages(getattr(tensor, name)))
        return storages
    storage = tensor.untyped_storage()
    return {(storage.data_ptr(), str(tensor.device)): storage.nbytes()}


def memory_footprint(model: nn.Module, return_buffers: bool = True) -> int:
    """Bytes the model's parameters (and buffers) occupy: quantized weights count their packed data and scales,
    shared storage (tied weights) counts once, offloaded (meta) weights not at all.

    transformers' `get_memory_footprint` multiplies element counts by the *logical* dtype size, which for a quantized
    tensor subclass is that of the unquantized weight: it reports no saving at all.
    """
    storages: dict[tuple[int, str], int] = {}
    for tensor in [*model.parameters(), *(model.buffers() if return_buffers else ())]:
        storages.update(_storages(tensor))
    return sum(storages.values())


def embedding_execution_device(model: nn.Module) -> torch.device:
    """Where the input embedding computes, which is where the inputs must go.

    `model.device` is the device of the first parameter: `meta` or `cpu` when accelerate offloads the weights
    (`device_map` with `max_memory` / `offload_folder`, sequential CPU offload); its hooks then move the weights to
    their execution device at each call, and the inputs must already be there.
    """
    import torch

    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    weight = embedding.weight
    return weight.device if weight.device.type != "meta" else model.device


def own_weights_loaded(module: nn.Module) -> AbstractContextManager:
    """A context in which `module`'s own (not its children's) offloaded weights are on its execution device.

    accelerate loads an offloaded module's weights in hooks around its `forward`; a method that reads them directly
    (VisCPM-Chat's `get_image_features` reads the learned queries) needs them loaded explicitly.
    """
    if getattr(module, "_hf_hook", None) is None:  # only accelerate's dispatch adds hooks
        return nullcontext()
    from accelerate.utils import align_module_device

    return align_module_device(module)


def quantization_config(bits: Literal["int8", "int4"], embeddings: bool = True):
    """The weight-only quantization behind `--quantize`, for every device: torchao int8 (the tied embedding / head
    matrix too when `embeddings`) or optimum-quanto int4 (packed two weights a byte on CPU and GPU alike, where
    torchao's int4 needs a CUDA kernel; the tied matrix stays as loaded).

    Any other transformers quantization config (`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`,
    torchao int4 on CUDA, ...) works the same way through `from_pretrained(quantization_config=...)`.
    """
    from transformers import QuantoConfig, TorchAoConfig

    if bits == "int8":
        from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig

        if embeddings:
            # The tied matrix by name (its name in every VisCPM model), linear layers by default, other embeddings
            # (BEiT-3's position tables) as loaded. An explicit `modules_to_not_convert` replaces transformers'
            # default skip list, which holds the tied weights; "bias" keeps biases out of the `_default` rule.
            rules = {r"re:(.*\.)?input_embedding": Int8WeightOnlyConfig(), "_default": Int8WeightOnlyConfig()}
            return TorchAoConfig(FqnToConfig(rules), modules_to_not_convert=["bias"])
        return TorchAoConfig(Int8WeightOnlyConfig())
    if bits == "int4":
        return QuantoConfig(weights="int4")
    raise ValueError(f"Unknown quantization {bits!r}: choose one of {', '.join(QUANTIZE_CHOICES)}.")
