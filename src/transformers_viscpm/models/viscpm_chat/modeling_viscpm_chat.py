"""PyTorch VisCPM-Chat: BEiT-3 encodes an image with learned queries, CPM-Bee answers questions about it.

The original (`VisCPM/models/vlu_cpmbee.py`, `VisCPM/viscpm_chat.py`) runs BEiT-3 on `[image tokens, queries]`, maps the
query outputs to the CPM-Bee width (Linear-GELU-Linear) and writes them over the `<unk>` placeholders of the prompt's
`"image"` segment before CPM-Bee runs. The placeholders are located by `image_bound` (the segment's token range), not by
their id: question text the vocabulary cannot spell is also encoded as `<unk>`.

The shape is LLaVA's: [`VisCPMChatModel`] is the vision tower, the queries, the mapping and the CPM-Bee transformer
([`CpmBeeModel`], no vocabulary head); [`VisCPMChatForConditionalGeneration`] calls `self.model(...)` and adds the
tied `lm_head` with CPM-Bee's ext-table logits (`cpmbee_logits`) and CPM-Bee's generation (`CpmBeeGenerationMixin`,
the original-exact beam search). Module names follow the original checkpoint (`vpm.beit3.*` ->
`model.vision_model.*`, `query` -> `model.query`, `mapping.*` -> `model.mapping.*`, `llm.*` ->
`model.language_model.*`), so conversion is a small key table.
"""

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation.streamers import BaseStreamer
from transformers.image_utils import ImageInput
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from ...quantization import embedding_execution_device, memory_footprint, own_weights_loaded
from ..cpmbee.generation_cpmbee import CpmBeeGenerationMixin, cpmbee_beam_search
from ..cpmbee.modeling_cpmbee import CpmBeeModel, cpmbee_logits_and_loss
from ..cpmbee.structure_cpmbee import (
    CHAT_KEYS,
    EXT_TABLE_KEYS,
    GENERATION_KEYS,
    CpmBeeInputKwargs,
    CpmBeeStructureKwargs,
    VisCPMChatImageKwargs,
    pop_keys,
)
from ..cpmbee.tokenization_cpmbee import check_vocabulary_matches
from .configuration_viscpm_chat import VisCPMChatConfig
from .modeling_beit3 import VisCPMChatVisionModel

if TYPE_CHECKING:
    from .processing_viscpm_chat import VisCPMChatProcessor


class VisCPMChatModelKwargs(VisCPMChatImageKwargs, CpmBeeStructureKwargs, TransformersKwargs, total=False):
    """Keyword arguments of [`VisCPMChatModel.forward`]: the image inputs, CPM-Bee's structure, the stock ones."""


class VisCPMChatCausalLMKwargs(VisCPMChatImageKwargs, CpmBeeInputKwargs, TransformersKwargs, total=False):
    """Keyword arguments of [`VisCPMChatForConditionalGeneration.forward`]: every tensor of the processor."""


class _VisionHiddenStates:
    """`vision_hidden_states`: the mapped query features written into the `"image"` segment, i.e.
    `image_outputs.pooler_output` `(batch, query_num, text hidden size)`; pass them back as `vision_hidden_states`
    to skip the vision tower on later turns about the same image."""

    @property
    def vision_hidden_states(self) -> torch.FloatTensor | None:
        return None if self.image_outputs is None else self.image_outputs.pooler_output


@dataclass
class VisCPMChatModelOutputWithPast(_VisionHiddenStates, MultimodalBaseModelOutputWithPast):
    r"""CPM-Bee's last hidden states; `image_outputs` holds the vision tower's outputs (`pooler_output`: the mapped
    features, also reachable as `vision_hidden_states`)."""


@dataclass
class VisCPMChatCausalLMOutputWithPast(_VisionHiddenStates, MultimodalCausalLMOutputWithPast):
    r"""Logits over the vocabulary then the batch ext table; `image_outputs` as in [`VisCPMChatModelOutputWithPast`]."""


class VisCPMChatPreTrainedModel(PreTrainedModel):
    config: VisCPMChatConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["VisCPMChatVisionEmbeddings", "VisCPMChatVisionEncoderLayer", "CpmBeeTransformerBlock"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    # Counts the packed data of quantized weights (transformers' own counts their unquantized size).
    get_memory_footprint = memory_footprint

    def _init_weights(self, module: nn.Module) -> None:
        """VisCPM's `construct_query_parameter`: queries from a normal truncated at one std (0.02)."""
        super()._init_weights(module)
        if isinstance(module, VisCPMChatModel):
            std = self.config.initializer_range
            init.trunc_normal_(module.query, mean=0.0, std=std, a=-std, b=std)


class VisCPMChatModel(VisCPMChatPreTrainedModel):
    """The vision tower, the queries, the mapping and the CPM-Bee transformer; returns CPM-Bee's last hidden states."""

    def __init__(self, config: VisCPMChatConfig):
        super().__init__(config)
        vision_width, text_width = config.vision_config.hidden_size, config.text_config.hidden_size
        self.vision_model = VisCPMChatVisionModel._from_config(config.vision_config)
        self.query = nn.Parameter(torch.zeros(config.query_num, vision_width))
        self.mapping = nn.Sequential(nn.Linear(vision_width, text_width), nn.GELU(), nn.Linear(text_width, text_width))
        self.language_model = CpmBeeModel._from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.FloatTensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """Run BEiT-3 on the images and the queries; `pooler_output` holds the features mapped to the CPM-Bee width
        `(batch, query_num, text hidden size)`, `last_hidden_state` the raw query outputs."""
        with own_weights_loaded(self):  # `query` is this module's own weight, read outside `forward`
            vision_outputs = self.vision_model(pixel_values=pixel_values, query_embeds=self.query, **kwargs)
        return BaseModelOutputWithPooling(
            last_hidden_state=vision_outputs.last_hidden_state,
            pooler_output=self.mapping(vision_outputs.last_hidden_state),
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
        )

    def get_placeholder_mask(
        self, image_bound: torch.LongTensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.BoolTensor:
        """`(batch, length, 1)` mask of the `"image"` segment tokens from `image_bound` `(batch, N, 2)` ([start, end)
        ranges; empty ranges pad `N`). Each row must hold exactly one image's `query_num` placeholders."""
        batch, length = inputs_embeds.shape[:2]
        bound = image_bound.to(inputs_embeds.device).view(batch, -1, 2)
        positions = torch.arange(length, device=inputs_embeds.device)[None, None, :]
        mask = ((positions >= bound[..., :1]) & (positions < bound[..., 1:])).any(dim=1)
        counts = mask.sum(dim=1)
        if image_features.shape[:1] != (batch,) or bool((counts != image_features.shape[1]).any()):
            raise ValueError(
                f"Image features {tuple(image_features.shape[:2])} do not match the image segments: each of the "
                f"{batch} prompts has {counts.tolist()} placeholder tokens."
            )
        return mask.unsqueeze(-1)

    def get_inputs_embeds(
        self,
        input_ids: torch.LongTensor,
        input_id_subs: torch.LongTensor | None = None,
        image_bound: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        vision_hidden_states: torch.FloatTensor | None = None,
    ) -> tuple[torch.Tensor, BaseModelOutputWithPooling | None]:
        """CPM-Bee input embeddings with the image features in the `"image"` segment (the original
        `get_vllm_embedding`), and the image outputs used (`pooler_output`: the mapped features;
        `vision_hidden_states` of an earlier call stand in for the vision tower)."""
        if pixel_values is not None and vision_hidden_states is not None:
            raise ValueError("Pass either pixel_values or vision_hidden_states, not both.")
        inputs_embeds = self.language_model.embed_input_ids(input_ids, input_id_subs)
        if pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values)
        elif vision_hidden_states is not None:
            image_outputs = BaseModelOutputWithPooling(pooler_output=vision_hidden_states)
        else:
            return inputs_embeds, None
        if image_bound is None:
            raise ValueError("Image features need `image_bound` (from the processor) to find the image segment.")
        features = image_outputs.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
        # NaN/Inf pixels or features would decode to `<sep><sep>...`; one check on the (batch, 64, dim) features.
        if not torch.compiler.is_compiling() and not torch.isfinite(features).all():
            source = "pixel_values" if pixel_values is not None else "vision_hidden_states"
            raise ValueError(f"The image features from `{source}` contain NaN or infinite values.")
        mask = self.get_placeholder_mask(image_bound, inputs_embeds, features)
        return inputs_embeds.masked_scatter(mask, features), image_outputs

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[VisCPMChatModelKwargs],
    ) -> VisCPMChatModelOutputWithPast:
        r"""
        Takes the tensors of [`VisCPMChatProcessor`] (CPM-Bee's structure plus `image_bound` and `pixel_values`);
        `vision_hidden_states` (mapped features of an earlier call) can stand in for `pixel_values`.
        `inputs_embeds` are used as given (no image is written into them).
        """
        image = pop_keys(kwargs, CHAT_KEYS)
        image_outputs = None
        if inputs_embeds is None:
            inputs_embeds, image_outputs = self.get_inputs_embeds(input_ids, kwargs.get("input_id_subs"), **image)
        kwargs.pop("input_id_subs", None)
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        return VisCPMChatModelOutputWithPast(**outputs, image_outputs=image_outputs)


class VisCPMChatImageSafetyChecker:
    """The original's optional image screen: diffusers' `StableDiffusionSafetyChecker` on CLIP-preprocessed images.

    Unlike the original (which gave the CLIP preprocessing a NumPy array of the image and ignored the verdict), it
    preprocesses the PIL image itself and its verdict stops `chat`. Call it on a list of images to get one
    flag per image (True: flagged).
    """

    def __init__(self, checker: nn.Module, feature_extractor: Any):
        self.checker = checker.eval()
        self.feature_extractor = feature_extractor

    @classmethod
    def from_pretrained(
        cls,
        checker: str = "CompVis/stable-diffusion-safety-checker",
        feature_extractor: str = "openai/clip-vit-base-patch32",
        **kwargs: Any,
    ) -> "VisCPMChatImageSafetyChecker":
        """The checker and the CLIP preprocessing the original downloads (keyword arguments go to both loaders)."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        return cls(
            StableDiffusionSafetyChecker.from_pretrained(checker, **kwargs),
            CLIPImageProcessor.from_pretrained(feature_extractor, **kwargs),
        )

    @torch.no_grad()
    def __call__(self, images: list[PIL.Image.Image]) -> list[bool]:
        rgb = [image.convert("RGB") for image in images]
        parameter = next(self.checker.parameters())
        clip_input = self.feature_extractor(images=rgb, return_tensors="pt").pixel_values
        arrays = [np.asarray(image, dtype=np.float32) / 255.0 for image in rgb]
        _, flagged = self.checker(clip_input=clip_input.to(parameter.device, parameter.dtype), images=arrays)
        return [bool(flag) for flag in flagged]


class UnsafeImageError(ValueError):
    """The configured image safety checker flagged the image given to `chat`."""


class VisCPMChatForConditionalGeneration(VisCPMChatPreTrainedModel, CpmBeeGenerationMixin):
    """VisCPM-Chat with CPM-Bee's tied output layer: logits over the vocabulary followed by the batch ext table.

    Three ways to answer: [`~VisCPMChatForConditionalGeneration.chat`] (the original API and decoding, beam search
    reproduced token for token), `generate(**processor_outputs)` (any transformers decoding, streaming included; the
    image features are computed once, before the first step), and the `image-text-to-text` pipeline.

    `image_safety_checker` is off (None) unless set, e.g. to `VisCPMChatImageSafetyChecker.from_pretrained()`; `chat`
    then raises [`UnsafeImageError`] for a flagged image.
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.input_embedding.weight"}

    def __init__(self, config: VisCPMChatConfig):
        super().__init__(config)
        self.model = VisCPMChatModel(config)
        text_config = config.get_text_config()
        self.lm_head = nn.Linear(text_config.dim_model, text_config.vocab_size, bias=False)
        self.image_safety_checker: VisCPMChatImageSafetyChecker | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def embed_input_ids(self, input_ids: torch.Tensor, input_id_subs: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.language_model.embed_input_ids(input_ids, input_id_subs)

    def get_image_features(
        self, pixel_values: torch.FloatTensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[VisCPMChatCausalLMKwargs],
    ) -> VisCPMChatCausalLMOutputWithPast:
        r"""
        Inputs as [`VisCPMChatModel`], plus `ext_table_ids` / `ext_table_sub` (the batch ext table, whose logits
        follow the vocabulary's), `labels` and `logits_to_keep` as in [`CpmBeeForCausalLM`]. The generation-only
        inputs of the processor are accepted so that `model(**processor_outputs)` works; they do not change the
        logits.
        """
        ext_table = pop_keys(kwargs, EXT_TABLE_KEYS)
        pop_keys(kwargs, GENERATION_KEYS)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        logits, loss = cpmbee_logits_and_loss(
            self, outputs.last_hidden_state, labels, logits_to_keep, ext_table, kwargs
        )
        return VisCPMChatCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> torch.LongTensor | Any:
        """transformers `generate` on [`VisCPMChatProcessor`] outputs: the image features are written into the prompt
        embeddings once, then CPM-Bee's generation runs (its step inputs carry the CPM-Bee structure of every
        generated token; ext and `<unk>` ids a prompt cannot produce are masked). Returns what `generate` returns:
        the prompt ids followed by the new tokens, unless `return_dict_in_generate`.

        This is stock decoding (greedy, sampling, transformers beam search); for the original's beam search use
        [`~VisCPMChatForConditionalGeneration.chat`].
        """
        image = pop_keys(kwargs, CHAT_KEYS)
        inputs_embeds, _ = self.model.get_inputs_embeds(input_ids, kwargs.get("input_id_subs"), **image)
        return super().generate(
            input_ids=input_ids, inputs_embeds=inputs_embeds, generation_config=generation_config, **kwargs
        )

    @cached_property
    def default_processor(self) -> "VisCPMChatProcessor":
        """The processor `chat` uses when none is given: the released tokenizer and image preprocessing."""
        from ..cpmbee.tokenization_cpmbee import CpmBeeTokenizer
        from .image_processing_viscpm_chat import VisCPMChatImageProcessor
        from .processing_viscpm_chat import VisCPMChatProcessor

        return VisCPMChatProcessor(VisCPMChatImageProcessor(), CpmBeeTokenizer(), query_num=self.config.query_num)

    @torch.no_grad()
    def chat(
        self,
        image: ImageInput | None,
        question: str,
        context: str = "",
        vision_hidden_states: torch.FloatTensor | None = None,
        processor: "VisCPMChatProcessor | None" = None,
        generation_config: GenerationConfig | None = None,
        streamer: BaseStreamer | None = None,
        **kwargs: Any,
    ) -> tuple[str, str, torch.FloatTensor]:
        """Answer `question` about `image`, as the original `VisCPMChat.chat`.

        Returns `(answer, new_context, vision_hidden_states)`: `new_context` is `context + "User: <question>\\n" +
        "AI: <answer>\\n"`, to pass back with `vision_hidden_states` (then `image` is not needed and may be None) for
        the next turn. Decoding is the original CPM-Bee beam search with `generation_config` (default: the model's,
        whose converted defaults are the original's: 3 beams, temperature 0.7, repetition penalty 1.1, length
        penalty 3, at most 512 new tokens); keyword arguments override single settings (`num_beams`,
        `max_new_tokens`, `temperature`, `repetition_penalty`, `length_penalty`, `repetition_window`).
        User text is plain text (`<` needs no escaping) and the answer is the real text.

        A beam search answer is only known once decoding ends, so a `streamer` (e.g. `TextStreamer(tokenizer)`)
        receives the answer's tokens then, in one `put`; token-by-token streaming needs greedy `generate()`. A
        streamer with `decode_kwargs` (`TextStreamer`, `TextIteratorStreamer`) gets this prompt's ext table there
        (`decode_kwargs["ext_table"]`), so rare characters of the answer decode; the tokenizer is not touched.
        """
        processor = processor if processor is not None else self.default_processor
        if vision_hidden_states is None and image is None:
            raise ValueError("chat() needs an image, or the vision_hidden_states of an earlier turn about it.")
        if vision_hidden_states is None and self.image_safety_checker is not None:
            if not isinstance(image, PIL.Image.Image):
                raise TypeError(f"the image safety checker takes a PIL image, got {type(image).__name__}")
            if self.image_safety_checker([image])[0]:
                raise UnsafeImageError(
                    "The image safety checker flagged this image; VisCPM-Chat will not describe it."
                )
        check_vocabulary_matches(processor.tokenizer, self.config.text_config.vocab_size, "the model")
        inputs, infos = processor.encode(
            images=image if vision_hidden_states is None else None, text=question, context=context
        )
        inputs = inputs.to(embedding_execution_device(self))
        pixel_values = inputs.pop("pixel_values", None)
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.dtype)
        inputs_embeds, image_outputs = self.model.get_inputs_embeds(
            inputs["input_ids"], inputs["input_id_subs"], inputs["image_bound"], pixel_values, vision_hidden_states
        )
        vision_hidden_states = image_outputs.pooler_output
        results = cpmbee_beam_search(self, inputs, infos, generation_config, inputs_embeds=inputs_embeds, **kwargs)
        answer = processor.decode_answers(results, infos)[0]
        if streamer is not None:
            if isinstance(getattr(streamer, "decode_kwargs", None), dict):
                streamer.decode_kwargs["ext_table"] = inputs.ext_table
            streamer.put(
                torch.tensor([token for token, _ in results[0] if token != self.config.text_config.eos_token_id])
            )
            streamer.end()
        return answer, f"{context}User: {question}\nAI: {answer}\n", vision_hidden_states


__all__ = [
    "UnsafeImageError",
    "VisCPMChatForConditionalGeneration",
    "VisCPMChatImageSafetyChecker",
    "VisCPMChatModel",
    "VisCPMChatPreTrainedModel",
]
