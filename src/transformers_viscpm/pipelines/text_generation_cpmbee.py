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
"""The `text-generation` pipeline for CPM-Bee's native prompts.

Stock `TextGenerationPipeline` hands `generate()` only `input_ids` and `attention_mask`, and decodes without the
prompt's ext table; a CPM-Bee prompt also needs its structure tensors. This subclass keeps the stock interface
(`pipeline("text-generation", model=cpmbee, tokenizer=tok, pipeline_class=CpmBeeTextGenerationPipeline)`) and
takes three kinds of prompt:

- a CPM-Bee prompt dict (`{"input": ..., "prompt": ..., "<ans>": ""}`): `generated_text` is the answer;
- a chat (messages): the tokenizer's chat template makes the prompt dict; the answer is appended as the assistant
  message, as stock does;
- a string: the prompt `{"input": text, "<ans>": ""}`; `generated_text` is the text and the answer (only the answer
  with `return_full_text=False`), as stock does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers.pipelines.text_generation import ReturnType, TextGenerationPipeline
from transformers.utils.chat_template_utils import Chat

# The prompt's ext table travels beside the tensors from `preprocess` to `postprocess` under this key.
_TABLE_KEY = "cpmbee_ext_table"
_STOCK_INPUTS = ("input_ids", "attention_mask", "prompt_text")


class CpmBeeTextGenerationPipeline(TextGenerationPipeline):
    """`TextGenerationPipeline` for CPM-Bee: prompt dicts, chats and strings in, answer text out (see the module)."""

    def preprocess(self, prompt_text: Any, **kwargs: Any) -> dict[str, Any]:
        if isinstance(prompt_text, Chat):
            inputs = super().preprocess(prompt_text, **kwargs)  # the tokenizer's chat template: the prompt dict
        else:
            prompt = prompt_text if isinstance(prompt_text, Mapping) else {"input": prompt_text, "<ans>": ""}
            inputs = self.tokenizer(prompt, return_tensors="pt")
            inputs["prompt_text"] = prompt_text
        if inputs.ext_table is None:
            raise ValueError("CpmBeeTextGenerationPipeline takes one prompt per call of `preprocess`")
        return {**inputs, _TABLE_KEY: inputs.ext_table}

    def _forward(self, model_inputs: dict[str, Any], **generate_kwargs: Any) -> dict[str, Any]:
        table = model_inputs.pop(_TABLE_KEY)
        structure = {key: value for key, value in model_inputs.items() if key not in _STOCK_INPUTS}
        stock = {key: value for key, value in model_inputs.items() if key in _STOCK_INPUTS}
        outputs = super()._forward(stock, **generate_kwargs, **structure)
        outputs[_TABLE_KEY] = table
        return outputs

    def postprocess(
        self,
        model_outputs: dict[str, Any],
        return_type: ReturnType = ReturnType.FULL_TEXT,
        clean_up_tokenization_spaces: bool | None = None,
        skip_special_tokens: bool | None = None,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        """Decodes the new tokens with the prompt's ext table; the answer ends at `</s>` (a special token)."""
        table = model_outputs[_TABLE_KEY]
        prompt_text = model_outputs["prompt_text"]
        prompt_length = model_outputs["input_ids"].shape[-1]
        records = []
        for sequence in model_outputs["generated_sequence"][0].tolist():
            if return_type == ReturnType.TENSORS:
                records.append({"generated_token_ids": sequence})
                continue
            answer = self.tokenizer.decode(
                sequence[prompt_length:],
                skip_special_tokens=True if skip_special_tokens is None else skip_special_tokens,
                clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                ext_table=table,
            )
            if isinstance(prompt_text, Chat):
                text: Any = [*prompt_text.messages, {"role": "assistant", "content": answer}]
            elif isinstance(prompt_text, str) and return_type == ReturnType.FULL_TEXT:
                text = prompt_text + answer
            else:
                text = answer
            records.append({"generated_text": text})
        return records


__all__ = ["CpmBeeTextGenerationPipeline"]
