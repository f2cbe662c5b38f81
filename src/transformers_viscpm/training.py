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
"""Fine-tuning VisCPM-Chat and CPM-Bee with the original objective: data collators, freezing, LoRA defaults.

The objective is the original VisCPM fine-tuning one (`finetune/ft_viscpm_chat`): one training sample per conversation
round, `{"image": <placeholders>, "context": earlier rounds, "question": q, "<ans>": a}` encoded with the answer
(`encoding_cpmbee` holds the label rule), mean cross-entropy over the answer tokens. Two defects of the original's
item builder are fixed: the context of round i is `"User: q\\nAI: a\\n"` per earlier round (what `chat()` sends at
inference), and user text is plain text. The collators return what the models' `forward` takes, `labels` included,
so `Trainer` computes the loss; give it `TrainingArguments(remove_unused_columns=False)`, since the records' columns
(`image`, `conversations`) are not model inputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from torch import nn

from .models.cpmbee.encoding_cpmbee import encode_structured
from .models.cpmbee.structure_cpmbee import GENERATION_KEYS

__all__ = [
    "LORA_TARGET_MODULES",
    "CpmBeeDataCollator",
    "VisCPMChatDataCollator",
    "conversation_rounds",
    "freeze_for_finetuning",
    "register_peft_defaults",
]

# LoRA's default targets (peft's `target_modules=None`): CPM-Bee's query and value projections, as peft does for
# llama's `q_proj`/`v_proj`. In VisCPM-Chat they are the language model's; the BEiT-3 projections are `q_proj.A`
# (image experts), `q_proj.B` (query experts), ... and can be named explicitly.
LORA_TARGET_MODULES = ["project_q", "project_v"]
IMAGE_TOKEN = "<image>"
_RECORD_ERROR = (
    "{cls} takes records with {keys}; got keys {got}. With Trainer, pass TrainingArguments("
    "remove_unused_columns=False): otherwise Trainer drops the record columns before the collator sees them."
)


def register_peft_defaults() -> None:
    """Register `LORA_TARGET_MODULES` for `cpmbee` and `viscpm_chat` with peft (no-op without peft)."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:
        return
    for model_type in ("cpmbee", "viscpm_chat"):
        mapping.setdefault(model_type, list(LORA_TARGET_MODULES))


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def conversation_rounds(record: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """`(context, question, answer)` of every round of a llava record (`conversations` of `from: human/gpt`) or of an
    HF messages record (`messages` of `role: user/assistant`). `<image>` markers are removed from questions and
    earlier rounds become the context as `chat()` builds it."""
    if "conversations" in record:
        turns = [(turn["from"], turn["value"]) for turn in record["conversations"]]
        user, assistant = "human", "gpt"
    elif "messages" in record:
        turns = [(m["role"], _message_text(m["content"])) for m in record["messages"] if m["role"] != "system"]
        user, assistant = "user", "assistant"
    else:
        raise KeyError("conversations")
    if not turns or len(turns) % 2:
        raise ValueError(f"A conversation needs alternating {user}/{assistant} turns, got {len(turns)} turns.")
    rounds, context = [], ""
    for (role_q, question), (role_a, answer) in zip(turns[::2], turns[1::2]):
        if (role_q, role_a) != (user, assistant):
            raise ValueError(f"Turns must alternate {user} then {assistant}, got {role_q!r} then {role_a!r}.")
        if not answer:
            raise ValueError(f"An empty {assistant} turn has nothing to train on (question {question!r}).")
        question = question.replace(IMAGE_TOKEN, "").strip()
        rounds.append((context, question, answer))
        context += f"User: {question}\nAI: {answer}\n"
    return rounds


def _training_batch(encoding: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in encoding.items() if key not in GENERATION_KEYS}


@dataclass
class CpmBeeDataCollator:
    """Batches CPM-Bee training dicts (`{"input": ..., "<ans>": "the answer"}`, answers filled in) for
    `CpmBeeForCausalLM`; `max_length` bounds a sample (a longer one raises)."""

    tokenizer: Any
    max_length: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not all("<ans>" in feature for feature in features):
            raise ValueError(
                _RECORD_ERROR.format(cls=type(self).__name__, keys="an '<ans>' key", got=list(features[0]))
            )
        encoding, _ = encode_structured(self.tokenizer, features, max_length=self.max_length)
        return _training_batch(encoding)


@dataclass
class VisCPMChatDataCollator:
    """Batches VisCPM-Chat fine-tuning records, one row per conversation round.

    Records are llava / llava_zh (`{"image": path or PIL image, "conversations": [{"from": "human", "value":
    "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}`) or HF messages (`{"images": [image], "messages":
    [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}`). Relative image paths are read from
    `image_folder`. `augment` (PIL -> PIL, e.g. a random resized crop and flip as the original trains with) runs once
    per record before the image processor; off by default, so that pixels are deterministic.
    """

    processor: Any
    image_folder: str | os.PathLike | None = None
    augment: Callable[[PIL.Image.Image], PIL.Image.Image] | None = None
    max_length: int | None = None

    def _image(self, record: Mapping[str, Any]) -> PIL.Image.Image:
        image = record.get("image")
        if image is None and record.get("images"):
            image = record["images"][0]
        if image is None:
            raise ValueError("A VisCPM-Chat record needs an image (`image`, or `images` with one entry).")
        if not isinstance(image, PIL.Image.Image):
            path = os.path.join(self.image_folder, image) if self.image_folder is not None else image
            with PIL.Image.open(path) as opened:
                image = opened.convert("RGB")
        image = image.convert("RGB")
        return self.augment(image) if self.augment is not None else image

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        prompts, images = [], []
        for record in features:
            try:
                rounds = conversation_rounds(record)
            except KeyError:
                raise ValueError(
                    _RECORD_ERROR.format(
                        cls=type(self).__name__, keys="'conversations' or 'messages'", got=list(record)
                    )
                ) from None
            image = self._image(record)
            contexts, questions, answers = zip(*rounds)
            for prompt, answer in zip(self.processor.build_prompts(list(questions), list(contexts)), answers):
                prompt["<ans>"] = answer
                prompts.append(prompt)
                images.append(image)
        encoding, _ = encode_structured(self.processor.tokenizer, prompts, max_length=self.max_length)
        batch = _training_batch(encoding)
        batch.update(self.processor.image_processor(images, return_tensors="pt"))
        return batch


def freeze_for_finetuning(model: nn.Module, tune_vision: bool = True, tune_llm: bool = True) -> nn.Module:
    """The original's switches: the patch embedding is always frozen, `tune_vision=False` freezes the vision
    tower's image-side ("A") experts, `tune_llm=False` the language model. Returns `model`."""
    base = model.model if hasattr(model, "model") else model
    base.vision_model.vision_embed.requires_grad_(False)
    if not tune_vision:
        for name, module in base.vision_model.named_modules():
            if name.split(".")[-1] == "A":
                module.requires_grad_(False)
    if not tune_llm:
        base.language_model.requires_grad_(False)
    return model
