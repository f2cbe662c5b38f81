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
"""VisCPM-Paint text-to-image: a CPM-Bee text encoder conditioning a Stable Diffusion 2.1 UNet.

The released model (OpenBMB VisCPM, `viscpm_paint.py`) encodes `{"caption": prompt, "objects": ""}`
with the full CPM-Bee forward, maps every hidden state to the UNet cross-attention width with
`trans_block`, and runs a stock SD-2.1 UNet / VAE with DDPM and classifier-free guidance. This pipeline
reproduces it step for step (same prompt dicts, same padding, same latent draws, same guidance
arithmetic), with diffusers' calling conventions on top.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput, StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor

from ...models.cpmbee.encoding_cpmbee import encode_structured
from ...models.cpmbee.structure_cpmbee import PER_TOKEN_KEYS
from ...models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer, check_vocabulary_matches
from .text_encoder_viscpm_paint import VisCPMPaintTextEncoder

__all__ = ["VisCPMPaintPipeline", "paint_prompt"]

# The released prompt checker (a BERT classifier) calls a prompt unsafe when label 1 wins with p > 0.75.
PROMPT_UNSAFE_LABEL = 1
PROMPT_UNSAFE_THRESHOLD = 0.75


def paint_prompt(caption: str) -> dict[str, str]:
    """The CPM-Bee input the released model was trained with; `""` is the unconditional caption."""
    return {"caption": caption, "objects": ""}


def _left_pad(encoding: Mapping[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """More left padding, so text encoded alone lines up with precomputed embeddings of `length` tokens."""
    current = encoding["input_ids"].shape[1]
    if current > length:
        raise ValueError(
            f"The text needs {current} CPM-Bee tokens but the given embeddings have {length}; pass both"
            " `prompt_embeds` and `negative_prompt_embeds` (from `encode_prompt`) or neither."
        )
    padded = dict(encoding)
    for key in PER_TOKEN_KEYS:
        value = encoding[key]
        padded[key] = torch.cat([value.new_zeros(value.shape[0], length - current), value], dim=1)
    return padded


def _pad_batch(pairs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack per-prompt `(captions, length, dim)` states into `(batch, captions, length, dim)`, left-padding the
    shorter ones with zeros; also the `(batch, length)` mask of that padding, or None when there is none."""
    length = max(pair.shape[1] for pair in pairs)
    if all(pair.shape[1] == length for pair in pairs):
        return torch.stack(pairs), None
    padded = [
        torch.cat([pair.new_zeros(pair.shape[0], length - pair.shape[1], pair.shape[2]), pair], 1) for pair in pairs
    ]
    mask = torch.zeros(len(pairs), length, dtype=torch.long, device=pairs[0].device)
    for i, pair in enumerate(pairs):
        mask[i, length - pair.shape[1] :] = 1
    return torch.stack(padded), mask


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_tensor(name: str, value: torch.Tensor | None, ndim: int) -> None:
    if value is None:
        return
    if not isinstance(value, torch.Tensor) or value.ndim != ndim:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"`{name}` must be a {ndim}-D tensor, got {shape}.")
    if not value.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got {value.dtype}.")
    if not torch.isfinite(value).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class VisCPMPaintPipeline(DiffusionPipeline, StableDiffusionMixin):
    r"""
    Text-to-image generation with VisCPM-Paint (Chinese and English prompts).

    Args:
        vae ([`AutoencoderKL`]): the SD-2.1 VAE.
        text_encoder ([`VisCPMPaintTextEncoder`]): CPM-Bee plus the `trans_block` projection; its output is the
            UNet's `encoder_hidden_states`.
        tokenizer ([`CpmBeeTokenizer`]): CPM-Bee tokenizer. Prompts are text: `<` in a prompt is escaped.
        unet ([`UNet2DConditionModel`]): the VisCPM-Paint UNet (SD-2.1 architecture).
        scheduler ([`SchedulerMixin`]): the released model samples with `DDPMScheduler`; any diffusers scheduler
            with the same config works.
        safety_checker ([`StableDiffusionSafetyChecker`], *optional*): blacks out images flagged as NSFW.
        feature_extractor ([`CLIPImageProcessor`], *optional*): the safety checker's image processor.
        prompt_safety_checker ([`PreTrainedModel`], *optional*): a sequence classifier (the released one is a BERT
            in `openbmb/VisCPM-Paint/text-security-checker`); label 1 with probability above 0.75 rejects the
            prompt with a `ValueError`, as the original refuses to draw it.
        prompt_safety_tokenizer ([`PreTrainedTokenizerBase`], *optional*): tokenizer of `prompt_safety_checker`.
        reranker ([`PreTrainedModel`], *optional*): an image-text model returning `logits_per_image` (the original
            uses `OFA-Sys/chinese-clip-vit-base-patch16`): each image is the best of `num_rerank_candidates`
            generated candidates for its prompt.
        reranker_processor ([`ProcessorMixin`], *optional*): the reranker's processor.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = [
        "safety_checker",
        "feature_extractor",
        "prompt_safety_checker",
        "prompt_safety_tokenizer",
        "reranker",
        "reranker_processor",
    ]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: VisCPMPaintTextEncoder,
        tokenizer: CpmBeeTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: BaseImageProcessor | None = None,
        prompt_safety_checker: PreTrainedModel | None = None,
        prompt_safety_tokenizer: PreTrainedTokenizerBase | None = None,
        reranker: PreTrainedModel | None = None,
        reranker_processor: ProcessorMixin | None = None,
    ):
        super().__init__()
        if safety_checker is not None and feature_extractor is None:
            raise ValueError("`safety_checker` needs `feature_extractor` to prepare its input.")
        if (prompt_safety_checker is None) != (prompt_safety_tokenizer is None):
            raise ValueError("`prompt_safety_checker` and `prompt_safety_tokenizer` go together.")
        if (reranker is None) != (reranker_processor is None):
            raise ValueError("`reranker` and `reranker_processor` go together.")
        if tokenizer is not None and text_encoder is not None:
            check_vocabulary_matches(tokenizer, text_encoder.config.cpmbee_config.vocab_size, "the text encoder")
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            prompt_safety_checker=prompt_safety_checker,
            prompt_safety_tokenizer=prompt_safety_tokenizer,
            reranker=reranker,
            reranker_processor=reranker_processor,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def _encode_captions(self, captions: list[str], device: torch.device, length: int | None = None) -> torch.Tensor:
        """Captions in one left-padded CPM-Bee batch, so they share one length as the original pads them."""
        encoding, _ = encode_structured(self.tokenizer, [paint_prompt(caption) for caption in captions])
        if length is not None:
            encoding = _left_pad(encoding, length)
        inputs = {key: encoding[key].to(device) for key in self.text_encoder.encoder_input_names}
        return self.text_encoder(**inputs).last_hidden_state

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        return_attention_mask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        r"""
        Encode the prompt (and the unconditional / negative prompt) into UNet cross-attention states.

        Each prompt runs through CPM-Bee together with its own negative prompt, padded to the longer of the two: the
        original pads the caption and the unconditional caption to one length and the UNet attends to every position,
        padding included, so that padding is part of the conditioning. Prompts of different lengths are then
        left-padded with zeros to one batch length, and that batching padding is masked out of the UNet's attention
        (`encoder_attention_mask`): a prompt gives the same image alone or in any batch. The negative prompt
        defaults to `""`.

        Returns:
            `(prompt_embeds, negative_prompt_embeds)`, each repeated `num_images_per_prompt` times;
            `negative_prompt_embeds` is None without classifier-free guidance. With `return_attention_mask`, also the
            `(batch, length)` mask of the batching padding (1 = attend), or None when no prompt needed any.
        """
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            batch_size = len(prompts)
        else:
            prompts = []
            batch_size = prompt_embeds.shape[0]

        negatives: list[str] = []
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None:
                negatives = [""] * batch_size
            elif isinstance(negative_prompt, str):
                negatives = [negative_prompt] * batch_size
            elif len(negative_prompt) != batch_size:
                raise ValueError(
                    f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has {batch_size}; they must"
                    " match."
                )
            else:
                negatives = list(negative_prompt)

        attention_mask = None
        if prompts or negatives:
            given = prompt_embeds if prompt_embeds is not None else negative_prompt_embeds
            length = None if given is None else given.shape[1]
            # One CPM-Bee batch per prompt: its caption and its negative, padded to their own common length.
            pairs = [
                self._encode_captions(prompts[i : i + 1] + negatives[i : i + 1], device, length)
                for i in range(batch_size)
            ]
            encoded, attention_mask = _pad_batch(pairs)
            if prompt_embeds is None:
                prompt_embeds = encoded[:, 0]
            if negatives:
                negative_prompt_embeds = encoded[:, -1]

        # As stock SD pipelines: the text encoder's dtype, so that prompts encode without a UNet.
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device).repeat_interleave(num_images_per_prompt, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device).repeat_interleave(num_images_per_prompt, dim=0)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        else:
            negative_prompt_embeds = None
        if return_attention_mask:
            return prompt_embeds, negative_prompt_embeds, attention_mask
        return prompt_embeds, negative_prompt_embeds

    def check_prompt_safety(self, prompts: list[str], device: torch.device) -> None:
        """Refuse prompts the prompt safety classifier flags (the original prints a warning and draws nothing)."""
        inputs = self.prompt_safety_tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(device)
        probs = self.prompt_safety_checker(**inputs).logits.float().softmax(dim=-1)[:, PROMPT_UNSAFE_LABEL]
        flagged = [i for i, p in enumerate(probs.tolist()) if p > PROMPT_UNSAFE_THRESHOLD]
        if flagged:
            raise ValueError(f"The prompt safety checker flagged prompt(s) {flagged} as unsafe; nothing was drawn.")

    def run_safety_checker(
        self, image: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, list[bool] | None]:
        if self.safety_checker is None:
            return image, None
        pil_images = self.image_processor.postprocess(image, output_type="pil")
        checker_input = self.feature_extractor(pil_images, return_tensors="pt").to(device)
        return self.safety_checker(images=image, clip_input=checker_input.pixel_values.to(dtype))

    def rerank(
        self, image: torch.Tensor, prompts: list[str], num_candidates: int, device: torch.device
    ) -> torch.Tensor:
        """Indices of the best of each group of `num_candidates` consecutive images, by reranker score.

        Images are ordered prompt-major (`num_images_per_prompt * num_candidates` per prompt); an image's score is
        its `logits_per_image` entry for its own prompt.
        """
        pil_images = self.image_processor.postprocess(image, output_type="pil")
        inputs = self.reranker_processor(text=prompts, images=pil_images, return_tensors="pt", padding=True)
        inputs = inputs.to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.reranker.dtype)
        logits = self.reranker(**inputs).logits_per_image
        per_prompt = image.shape[0] // len(prompts)
        prompt_index = torch.arange(image.shape[0], device=logits.device) // per_prompt
        scores = logits[torch.arange(image.shape[0], device=logits.device), prompt_index]
        best = scores.view(-1, num_candidates).argmax(dim=-1)
        return torch.arange(0, image.shape[0], num_candidates, device=best.device) + best

    def prepare_extra_step_kwargs(self, generator: torch.Generator | list[torch.Generator] | None, eta: float):
        # Not all schedulers take `eta` (DDIM only) or `generator` (stochastic ones, DDPM included).
        parameters = set(inspect.signature(self.scheduler.step).parameters)
        extra_step_kwargs: dict[str, Any] = {}
        if "eta" in parameters:
            extra_step_kwargs["eta"] = eta
        if "generator" in parameters:
            extra_step_kwargs["generator"] = generator
        return extra_step_kwargs

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        height: int,
        width: int,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 1,
        guidance_scale: float = 1.0,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        num_rerank_candidates: int = 1,
    ) -> None:
        """Reject every bad argument up front, naming it, instead of failing deep in the UNet or drawing noise."""
        for name, value in (("height", height), ("width", width)):
            if not _is_positive_int(value):
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if height % self.vae_scale_factor != 0 or width % self.vae_scale_factor != 0:
            raise ValueError(
                f"`height` and `width` have to be divisible by {self.vae_scale_factor} but are {height} and {width}."
            )
        for name, value in (
            ("num_images_per_prompt", num_images_per_prompt),
            ("num_inference_steps", num_inference_steps),
            ("num_rerank_candidates", num_rerank_candidates),
        ):
            if not _is_positive_int(value):
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
            raise ValueError(f"`guidance_scale` must be a number, got {guidance_scale!r}.")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"`guidance_scale` must be finite, got {guidance_scale!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"`output_type` must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}."
            )
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found"
                f" {[k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]}"
            )
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Cannot forward both `prompt` and `prompt_embeds`; pass only one of them.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`.")
        for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if value is None or isinstance(value, str):
                continue
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise ValueError(f"`{name}` has to be a `str` or a list of `str`, but is {value!r:.80}")
            if not value:
                raise ValueError(f"`{name}` is an empty list: give at least one prompt.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Cannot forward both `negative_prompt` and `negative_prompt_embeds`; pass only one.")
        _check_tensor("prompt_embeds", prompt_embeds, 3)
        _check_tensor("negative_prompt_embeds", negative_prompt_embeds, 3)
        _check_tensor("latents", latents, 4)
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, but"
                    f" got {tuple(prompt_embeds.shape)} != {tuple(negative_prompt_embeds.shape)}."
                )

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but requested an effective batch"
                f" size of {batch_size}. Make sure the batch size matches the length of the generators."
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"`latents` must have shape {shape} (batch = prompts x images per prompt x rerank candidates,"
                f" latent channels, height and width / {self.vae_scale_factor}), got {tuple(latents.shape)}."
            )
        else:
            latents = latents.to(device=device, dtype=dtype)
        # scale the initial noise by the standard deviation required by the scheduler
        return latents * self.scheduler.init_noise_sigma

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        num_rerank_candidates: int = 4,
    ) -> StableDiffusionPipelineOutput | tuple:
        r"""
        Generate images from Chinese or English prompts.

        Args:
            prompt (`str` or `list[str]`, *optional*): the prompt(s); plain text (escaped for CPM-Bee).
            height (`int`, *optional*): image height, default `unet.config.sample_size * vae_scale_factor` (512).
            width (`int`, *optional*): image width, same default.
            num_inference_steps (`int`, defaults to 50): denoising steps.
            guidance_scale (`float`, defaults to 7.5): classifier-free guidance scale; `<= 1` disables guidance.
            negative_prompt (`str` or `list[str]`, *optional*): replaces the empty unconditional caption.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            eta (`float`, defaults to 0.0): DDIM's eta; ignored by other schedulers.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): makes generation deterministic.
            latents (`torch.Tensor`, *optional*): initial noise (with a reranker: one per candidate).
            prompt_embeds (`torch.Tensor`, *optional*): precomputed text conditioning (see `encode_prompt`).
            negative_prompt_embeds (`torch.Tensor`, *optional*): precomputed unconditional conditioning.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to True): return a [`StableDiffusionPipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): called after each step as
                `callback_on_step_end(self, step, timestep, callback_kwargs)`; may return replacements.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): tensors passed in `callback_kwargs`
                (from `._callback_tensor_inputs`), default `["latents"]`.
            num_rerank_candidates (`int`, defaults to 4): with a `reranker`, candidates generated per image (the
                original draws 4). Reranking needs the prompt text and pixels: it is skipped for `prompt_embeds`
                input and for `output_type="latent"`.

        Returns:
            [`StableDiffusionPipelineOutput`] or `(images, nsfw_content_detected)`; `nsfw_content_detected` is None
            without a safety checker.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]

        # 0. Default height and width to unet
        default_size = self.unet.config.sample_size * self.vae_scale_factor
        height = default_size if height is None else height
        width = default_size if width is None else width

        # 1. Check inputs
        self.check_inputs(
            prompt,
            height,
            width,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            callback_on_step_end_tensor_inputs,
            num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            latents=latents,
            output_type=output_type,
            num_rerank_candidates=num_rerank_candidates,
        )
        self._guidance_scale = guidance_scale
        self._interrupt = False

        # 2. Define call parameters
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        device = self._execution_device
        rerank = self.reranker is not None and prompts is not None and output_type != "latent"
        num_candidates = num_rerank_candidates if rerank else 1
        if prompts is not None and self.prompt_safety_checker is not None:
            self.check_prompt_safety(prompts, device)

        # 3. Encode input prompt
        prompt_embeds, negative_prompt_embeds, encoder_attention_mask = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt * num_candidates,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            return_attention_mask=True,
        )
        # One UNet batch for both halves of classifier-free guidance, unconditional first (as the original).
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            if encoder_attention_mask is not None:
                encoder_attention_mask = torch.cat([encoder_attention_mask, encoder_attention_mask])

        # 4. Prepare timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 5. Prepare latent variables
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt * num_candidates,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 6. Prepare extra step kwargs
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 7. Denoising loop
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                # expand the latents if we are doing classifier free guidance
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

                # predict the noise residual
                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    encoder_attention_mask=encoder_attention_mask,
                    return_dict=False,
                )[0]

                # perform guidance
                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)

                # compute the previous noisy sample x_t -> x_t-1
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)

                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 8. Decode, safety check, rerank
        if output_type == "latent":
            image, has_nsfw_concept = latents, None
        else:
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
            if rerank:
                keep = self.rerank(image, prompts, num_candidates, device)
                image = image[keep.to(image.device)]
                if has_nsfw_concept is not None:
                    has_nsfw_concept = [has_nsfw_concept[i] for i in keep.tolist()]

        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not n for n in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image, has_nsfw_concept)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)
