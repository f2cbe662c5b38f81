"""Processor of VisCPM-Chat: images and questions (with the conversation so far) -> CPM-Bee model inputs.

VisCPM-Chat does not splice image tokens into a flat text: every prompt is the CPM-Bee structured prompt that the
original `VisCPMChat.chat` builds,

    {"image": "<unk>" * query_num, "context": context, "question": question, "<ans>": ""}

where `context` is the conversation so far in the original's format (`"User: q\\nAI: a\\n"` per finished turn).
The question and the context are user text and are escaped; the `"image"` value is markup (`query_num` `<unk>`
placeholders that the model overwrites with image features at `image_bound`).

The chat template renders a conversation (`{"type": "image"}` / `{"type": "text"}` contents, or plain strings) into
that prompt's text part as JSON, `{"context": ..., "question": ...}`; `__call__` recognises such a rendering and
encodes it as the structured prompt, so `apply_chat_template(..., tokenize=True)` and the `image-text-to-text`
pipeline work.

The processor keeps nothing between calls: what decoding needs (each prompt's `CpmBeeSampleInfo`, with the table of
the ext ids it can generate) comes back with the encoding, as the `sample_infos` / `ext_table` attributes of the
returned [`VisCPMChatBatchFeature`].
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack

from ..cpmbee.encoding_cpmbee import CpmBeeSampleInfo, encode_structured, image_placeholder
from ..cpmbee.structure_cpmbee import CHAT_KEYS, INPUT_KEYS

# Previous turns become the original context string; the last user message is the question.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(context='', question='', pending=false) -%}"
    "{%- for message in messages -%}"
    "{%- set text = namespace(value='') -%}"
    "{%- if message['content'] is string -%}{%- set text.value = message['content'] -%}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if ns.pending -%}{{ raise_exception('VisCPM-Chat expects user and assistant messages to alternate.') }}"
    "{%- endif -%}"
    "{%- set ns.question = text.value -%}{%- set ns.pending = true -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if not ns.pending -%}{{ raise_exception('An assistant message must answer a user message.') }}{%- endif -%}"
    "{%- set ns.context = ns.context + 'User: ' + ns.question + '\\n' + 'AI: ' + text.value + '\\n' -%}"
    "{%- set ns.pending = false -%}"
    "{%- else -%}{{ raise_exception('VisCPM-Chat supports only the user and assistant roles.') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if not ns.pending -%}{{ raise_exception('The conversation must end with a user message.') }}{%- endif -%}"
    "{{- {'context': ns.context, 'question': ns.question} | tojson -}}"
)
_PROMPT_KEYS = {"context", "question"}


class VisCPMChatBatchFeature(BatchFeature):
    """A `BatchFeature` that also carries what decoding needs, as attributes (never model inputs; `.to()` keeps them):
    `sample_infos`, one `CpmBeeSampleInfo` per prompt, and `ext_table`, the table of what a one-prompt batch
    generates (None for larger batches: decode row i with `sample_infos[i].ext_table`). See `CpmBeeBatchEncoding`."""

    def __init__(
        self,
        data: dict[str, Any] | None = None,
        tensor_type: Any = None,
        *,
        sample_infos: Sequence[CpmBeeSampleInfo] | None = None,
        ext_table: dict[int, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(data, tensor_type=tensor_type, **kwargs)
        self.sample_infos = list(sample_infos) if sample_infos is not None else None
        self.ext_table = ext_table


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def parse_rendered_prompt(text: str) -> tuple[str, str] | None:
    """`(context, question)` when `text` is a chat-template rendering (`{"context": ..., "question": ...}`), else
    None (then `text` is a plain question)."""
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or set(data) != _PROMPT_KEYS or not all(isinstance(v, str) for v in data.values()):
        return None
    return data["context"], data["question"]


class VisCPMChatProcessor(ProcessorMixin):
    r"""
    Builds VisCPM-Chat inputs: [`VisCPMChatImageProcessor`] for the images, [`CpmBeeTokenizer`] and the CPM-Bee
    structured encoder for the prompts (one image per prompt, left-padded batches).

    Args:
        image_processor ([`VisCPMChatImageProcessor`]):
            The image processor.
        tokenizer ([`CpmBeeTokenizer`]):
            The CPM-Bee tokenizer.
        chat_template (`str`, *optional*):
            Jinja template rendering a conversation into `{"context": ..., "question": ...}` (default: the original
            turn format).
        query_num (`int`, *optional*, defaults to 64):
            Number of `<unk>` placeholders of the `"image"` segment (the model's `config.query_num`).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template: str | None = None, query_num: int = 64):
        self.query_num = query_num
        super().__init__(
            image_processor, tokenizer, chat_template=CHAT_TEMPLATE if chat_template is None else chat_template
        )

    def build_prompts(self, text: str | Sequence[str], context: str | Sequence[str] | None = None) -> list[dict]:
        """The CPM-Bee prompt dict of every question (`context`: the conversation so far, one per question)."""
        texts = _as_list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"text must be a string or a list of strings, got {text!r}")
        contexts = [None] * len(texts) if context is None else _as_list(context)
        if len(contexts) != len(texts):
            raise ValueError(f"got {len(contexts)} contexts for {len(texts)} questions")
        prompts = []
        for question, history in zip(texts, contexts):
            rendered = parse_rendered_prompt(question)
            if rendered is not None:
                if history is not None:
                    raise ValueError("a chat-template rendering already holds the context; do not pass `context`")
                history, question = rendered
            prompts.append(
                {
                    "image": image_placeholder(self.query_num),
                    "context": history or "",
                    "question": question,
                    "<ans>": "",
                }
            )
        return prompts

    def encode(
        self,
        images: ImageInput | None = None,
        text: str | Sequence[str] | None = None,
        context: str | Sequence[str] | None = None,
        **kwargs: Unpack[ProcessingKwargs],
    ) -> tuple[VisCPMChatBatchFeature, list[CpmBeeSampleInfo]]:
        """`__call__`, with the per-prompt `CpmBeeSampleInfo`s (answer segments, ext table) that CPM-Bee beam search
        and answer decoding need also returned on their own (they are the encoding's `sample_infos` too)."""
        if text is None:
            raise ValueError("VisCPM-Chat needs a question (`text`) for every image")
        merged = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        return_tensors = merged["text_kwargs"].get("return_tensors") or "pt"
        prompts = self.build_prompts(text, context)
        encoding, infos = encode_structured(self.tokenizer, prompts, return_tensors=return_tensors)
        data = dict(encoding)
        if images is not None:
            flat = [image for item in _as_list(images) for image in _as_list(item)]
            if len(flat) != len(prompts):
                raise ValueError(
                    f"VisCPM-Chat takes one image per prompt: got {len(flat)} images, {len(prompts)} prompts"
                )
            data.update(self.image_processor(flat, **{**merged["images_kwargs"], "return_tensors": return_tensors}))
        feature = VisCPMChatBatchFeature(
            data, tensor_type=return_tensors, sample_infos=infos, ext_table=encoding.ext_table
        )
        return feature, infos

    def __call__(
        self,
        images: ImageInput | None = None,
        text: str | Sequence[str] | None = None,
        videos: None = None,
        audio: None = None,
        context: str | Sequence[str] | None = None,
        **kwargs: Unpack[ProcessingKwargs],
    ) -> VisCPMChatBatchFeature:
        """Encode one prompt per question: `text` holds questions (plain text) or chat-template renderings,
        `context` the conversation so far in the original format (`"User: q\\nAI: a\\n"` per turn). Without
        `images` there is no `pixel_values`: pass the model `vision_hidden_states` instead (later turns of a chat).
        Tensors are PyTorch unless `return_tensors` says otherwise.

        Returns the CPM-Bee tensors of `encode_structured` (with `image_bound`) and `pixel_values`, with the decoding
        bookkeeping as the `sample_infos` and `ext_table` attributes.
        """
        if videos is not None or audio is not None:
            raise ValueError("VisCPM-Chat takes images and text only")
        return self.encode(images, text, context, **kwargs)[0]

    def decode_answers(
        self, answers: Sequence[Sequence[tuple[int, int]]], infos: Sequence[CpmBeeSampleInfo]
    ) -> list[str]:
        """The answer text of each CPM-Bee beam search result (`(token_id, answer_id)` pairs)."""
        return [info.decode_answers(self.tokenizer, pairs).get(1, "") for pairs, info in zip(answers, infos)]

    @property
    def model_input_names(self) -> list[str]:
        return [*INPUT_KEYS, *CHAT_KEYS]


__all__ = ["VisCPMChatBatchFeature", "VisCPMChatProcessor", "parse_rendered_prompt"]
