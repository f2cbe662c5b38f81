"""VisCPMPaintPipeline against images recorded from the original VisCPM-Paint, and diffusers conventions.

Golden values: tests/fixtures/paint_golden.json, recorded by tests/fixtures/record/record_paint.py from the
original `VisCPMPaint.build_input` + `VLG_CPMBee.generate` with the tiny seeded parts of
`transformers_viscpm.synthetic.paint` (32x32 images, 3 DDPM steps).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion import StableDiffusionSafetyChecker
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    ChineseCLIPConfig,
    ChineseCLIPModel,
    ChineseCLIPProcessor,
    CLIPConfig,
)
from transformers.models.chinese_clip.image_processing_pil_chinese_clip import ChineseCLIPImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import transformers_viscpm  # noqa: F401  (registers the pipeline with diffusers)
from transformers_viscpm.models.cpmbee.encoding_cpmbee import encode_structured
from transformers_viscpm.models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer
from transformers_viscpm.pipelines.viscpm_paint import (
    VisCPMPaintPipeline,
    VisCPMPaintTextEncoder,
    VisCPMPaintTextEncoderConfig,
    paint_prompt,
)
from transformers_viscpm.synthetic.paint import (
    TINY_PAINT_CPMBEE,
    TINY_PAINT_SCHEDULER,
    TINY_PAINT_SEEDS,
    TINY_PAINT_UNET,
    TINY_PAINT_VAE,
    original_paint_state_dict,
    tiny_paint_cpmbee_config,
    tiny_paint_vae,
    write_sd_base,
)

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "paint_golden.json").read_text())
CASES = {case["name"]: case for case in GOLDEN["cases"]}
SIZE, STEPS, SEED = 32, 3, 42
TOLERANCE = 1e-3  # max abs on [0, 1] images, fp32


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd-base")
    write_sd_base(folder)
    return folder


def build_pipeline(sd_base: Path, **optional) -> VisCPMPaintPipeline:
    """Our pipeline over the tiny original-layout checkpoint (the converter owns the real key map)."""
    state = original_paint_state_dict()
    config = VisCPMPaintTextEncoderConfig(
        cpmbee_config=tiny_paint_cpmbee_config(), projection_dim=TINY_PAINT_UNET["cross_attention_dim"]
    )
    text_encoder = VisCPMPaintTextEncoder(config)
    text_encoder.load_state_dict(
        {f"cpmbee.{k[4:]}" if k.startswith("llm.") else k: v for k, v in state.items() if not k.startswith("unet.")}
    )
    unet = UNet2DConditionModel(**TINY_PAINT_UNET)
    unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
    pipe = VisCPMPaintPipeline(
        vae=AutoencoderKL.from_pretrained(sd_base / "vae"),
        text_encoder=text_encoder.eval(),
        tokenizer=CpmBeeTokenizer(),
        unet=unet,
        scheduler=DDPMScheduler.from_pretrained(sd_base / "scheduler"),
        **optional,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(sd_base: Path) -> VisCPMPaintPipeline:
    return build_pipeline(sd_base)


def generate(pipe: VisCPMPaintPipeline, prompt="一只可爱的猫，油画风格", seed: int = SEED, **kwargs):
    kwargs = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "output_type": "np", **kwargs}
    if "generator" not in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return pipe(prompt, **kwargs)


def generate_case(pipe: VisCPMPaintPipeline, case: dict) -> np.ndarray:
    """The images of a golden case, from its seed on a CPU generator (the same draws whatever the pipeline's
    device)."""
    settings = ("negative_prompt", "guidance_scale", "num_images_per_prompt", "num_inference_steps", "height", "width")
    return generate(pipe, case["prompt"], seed=case["seed"], **{key: case[key] for key in settings}).images


def draws_match_float32(dtype: torch.dtype) -> bool:
    """Whether a CPU generator draws float32's normal samples (rounded) when asked for `dtype`.

    Only then does a 16-bit pipeline denoise the same noise as the fp32 one and its image compare with fp32's. torch
    2.13 draws so; with torch 2.11 (the GPU machine's) the fp16 image of the same seed was another picture (max
    difference 1.0, on CPU and GPU alike, though every component stayed within 3e-3 of fp32): its CPU sampler makes
    16-bit draws its own way (cf. pytorch/pytorch#166853).
    """
    shape = (2, 4, 8, 8)
    low = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    high = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return torch.allclose(low.float(), high, atol=0.02, rtol=0.01)


def max_diff(a, b) -> float:
    a, b = (x.detach().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64) for x in (a, b))
    return float(np.abs(a - b).max())


# --- the tiny parts are the ones the original ran ----------------------------------------------------------


def _checksum(tensors) -> list[float]:
    return [sum(t.double().sum().item() for t in tensors), sum(t.double().abs().sum().item() for t in tensors)]


def test_synthetic_parts_are_the_recorded_ones(sd_base: Path) -> None:
    assert GOLDEN["cpmbee"] == TINY_PAINT_CPMBEE
    assert GOLDEN["unet_config"] == TINY_PAINT_UNET
    assert GOLDEN["vae_config"] == TINY_PAINT_VAE
    assert GOLDEN["scheduler_config"] == TINY_PAINT_SCHEDULER
    assert GOLDEN["seeds"] == TINY_PAINT_SEEDS
    state = original_paint_state_dict()
    for part in ("llm", "unet", "trans_block"):
        got = _checksum([v for k, v in state.items() if k.startswith(f"{part}.")])
        assert got == pytest.approx(GOLDEN["checksums"][part], rel=1e-12), part
    assert _checksum(tiny_paint_vae().state_dict().values()) == pytest.approx(GOLDEN["checksums"]["vae"], rel=1e-12)
    # The base folder reads back as the original reads SD-2.1-base: a DDPMScheduler with these settings.
    scheduler = DDPMScheduler.from_pretrained(sd_base / "scheduler")
    assert json.loads((sd_base / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "PNDMScheduler"
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1
    assert json.loads((sd_base / "unet" / "config.json").read_text())["cross_attention_dim"] == 32


# --- parity with the original --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_images_match_original(pipe: VisCPMPaintPipeline, name: str) -> None:
    case = CASES[name]
    images = generate_case(pipe, case)
    golden = np.asarray(case["images"])
    assert images.shape == golden.shape == (case["num_images_per_prompt"], SIZE, SIZE, 3)
    assert max_diff(images, golden) <= TOLERANCE
    assert images.mean() == pytest.approx(case["image_mean"], abs=1e-5)
    if case["num_images_per_prompt"] == 2:
        assert max_diff(images[0], images[1]) > 0.1  # two draws, not one image twice


@pytest.mark.parametrize("name", list(CASES))
def test_prompt_embeds_match_original(pipe: VisCPMPaintPipeline, name: str) -> None:
    """Same states per token; the original pads on the right, we on the left (the UNet's cross-attention has no
    notion of key order), and the padding states equal the original's."""
    case = CASES[name]
    prompt_embeds, negative_embeds = pipe.encode_prompt(case["prompt"], "cpu", 1, True, case["negative_prompt"])
    golden_prompt = torch.tensor(case["prompt_embeds"])
    golden_negative = torch.tensor(case["negative_prompt_embeds"])
    length, negative_length = case["prompt_length"], case["negative_prompt_length"]
    total = max(length, negative_length)
    assert prompt_embeds.shape == negative_embeds.shape == (1, total, 32)
    for ours, golden, real in (
        (prompt_embeds[0], golden_prompt, length),
        (negative_embeds[0], golden_negative, negative_length),
    ):
        assert max_diff(ours[total - real :], golden[:real]) < 1e-5
        if total > real:
            assert max_diff(ours[: total - real], golden[real:]) < 1e-5


# --- call conventions ----------------------------------------------------------------------------------------


def test_precomputed_embeddings_give_the_same_images(pipe: VisCPMPaintPipeline) -> None:
    case = CASES["en_negative_two_images"]
    reference = generate(pipe, case["prompt"], negative_prompt=case["negative_prompt"]).images
    prompt_embeds, negative_embeds = pipe.encode_prompt(case["prompt"], "cpu", 1, True, case["negative_prompt"])
    both = generate(pipe, None, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds).images
    assert max_diff(both, reference) < 1e-5
    # Only the prompt precomputed (alone, so shorter): the negative text is padded to its length.
    alone, _ = pipe.encode_prompt(case["prompt"], "cpu", 1, False)
    assert alone.shape[1] == case["prompt_length"]
    mixed = generate(pipe, None, prompt_embeds=alone, negative_prompt=case["negative_prompt"]).images
    assert max_diff(mixed, reference) < 1e-5
    # A text longer than the given embeddings cannot be lined up with them.
    short, _ = pipe.encode_prompt("", "cpu", 1, False)
    with pytest.raises(ValueError, match="CPM-Bee tokens"):
        generate(pipe, None, prompt_embeds=short, negative_prompt=case["negative_prompt"])
    with pytest.raises(ValueError, match="same shape"):
        generate(pipe, None, prompt_embeds=alone, negative_prompt_embeds=short)


def test_batch_of_prompts_matches_single_prompts(pipe: VisCPMPaintPipeline) -> None:
    """A prompt list gives prompt-major images; with one generator per image each equals its own run when the
    batch pads to the same length (the Chinese prompt is the longest here)."""
    prompts = ["一只可爱的猫，油画风格", "a red car on the beach"]
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    batch = generate(pipe, prompts, generator=generators, num_images_per_prompt=2).images
    assert batch.shape == (4, SIZE, SIZE, 3)
    single = generate(
        pipe, prompts[0], generator=[torch.Generator().manual_seed(s) for s in range(2)], num_images_per_prompt=2
    ).images
    assert max_diff(batch[:2], single) < 1e-5
    with pytest.raises(ValueError, match="negative_prompt"):
        generate(pipe, prompts, negative_prompt=["x"])


def test_guidance_scale_one_disables_guidance(pipe: VisCPMPaintPipeline) -> None:
    calls: list[int] = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        plain = generate(pipe, guidance_scale=1.0).images
        with_negative = generate(pipe, guidance_scale=1.0, negative_prompt="模糊").images
        generate(pipe, guidance_scale=7.5)
    finally:
        hook.remove()
    assert calls == [1] * STEPS * 2 + [2] * STEPS
    assert max_diff(plain, with_negative) == 0.0


def test_output_types(pipe: VisCPMPaintPipeline) -> None:
    as_np = generate(pipe).images
    as_pt = generate(pipe, output_type="pt").images
    as_pil = generate(pipe, output_type="pil").images
    latents = generate(pipe, output_type="latent").images
    assert isinstance(as_pt, torch.Tensor) and as_pt.shape == (1, 3, SIZE, SIZE)
    assert max_diff(as_pt.permute(0, 2, 3, 1).numpy(), as_np) == 0.0
    assert isinstance(as_pil[0], PIL.Image.Image) and as_pil[0].size == (SIZE, SIZE)
    assert np.array_equal(np.asarray(as_pil[0]), (as_np[0] * 255).round().astype(np.uint8))
    assert latents.shape == (1, 4, SIZE // 2, SIZE // 2)
    images, nsfw = generate(pipe, return_dict=False)
    assert max_diff(images, as_np) == 0.0 and nsfw is None


def test_latents_argument_replaces_the_draw(pipe: VisCPMPaintPipeline) -> None:
    shape = (1, 4, SIZE // 2, SIZE // 2)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
    # DDPM's own noise still comes from `generator`: reseed it identically, skipping the latent draw.
    generator = torch.Generator().manual_seed(SEED)
    torch.randn(shape, generator=generator)
    given = generate(pipe, latents=latents, generator=generator).images
    assert max_diff(given, generate(pipe).images) < 1e-6


def test_callback_on_step_end(pipe: VisCPMPaintPipeline) -> None:
    seen: list[tuple[int, tuple, tuple]] = []

    def record(pipeline, step, timestep, kwargs):
        seen.append((step, tuple(kwargs["latents"].shape), tuple(kwargs["prompt_embeds"].shape)))
        return {}

    reference = generate(
        pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]
    ).images
    length = CASES["zh_cfg"]["prompt_length"]
    assert seen == [(i, (1, 4, 16, 16), (2, length, 32)) for i in range(STEPS)]
    assert max_diff(reference, generate(pipe).images) == 0.0

    def interrupt(pipeline, step, timestep, kwargs):
        pipeline._interrupt = True
        return {"latents": kwargs["latents"] * 0}

    calls: list[int] = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        stopped = generate(pipe, callback_on_step_end=interrupt, output_type="latent").images
    finally:
        hook.remove()
    assert len(calls) == 1 and float(stopped.abs().max()) == 0.0
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        generate(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise_pred"])


def test_prompt_text_is_escaped(pipe: VisCPMPaintPipeline) -> None:
    """`<` is text: the original would fail on `a < b` and turn `<b>` into a special token."""
    prompt = "a < b <b>"
    embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    markup = pipe.tokenizer.escape(prompt)
    assert markup == "a << b <<b>"
    encoding, _ = encode_structured(pipe.tokenizer, [paint_prompt(markup)], markup=True)
    inputs = {key: encoding[key] for key in pipe.text_encoder.encoder_input_names}
    assert max_diff(embeds, pipe.text_encoder(**inputs).last_hidden_state) == 0.0
    assert np.isfinite(generate(pipe, prompt).images).all()


def test_scheduler_is_swappable(sd_base: Path) -> None:
    pipe = build_pipeline(sd_base)
    ddpm = generate(pipe).images
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    euler = generate(pipe).images
    assert np.isfinite(euler).all() and max_diff(euler, generate(pipe).images) == 0.0
    assert max_diff(euler, ddpm) > 1e-2


def test_default_size_and_input_checks(pipe: VisCPMPaintPipeline) -> None:
    assert pipe.vae_scale_factor == 2
    assert generate(pipe, height=None, width=None, num_inference_steps=1).images.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="divisible"):
        generate(pipe, height=33)
    with pytest.raises(ValueError, match="either"):
        pipe(num_inference_steps=1)


# --- save / load, offload, dtypes ------------------------------------------------------------------------


def test_save_pretrained_round_trip(pipe: VisCPMPaintPipeline, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "VisCPMPaintPipeline"
    assert index["text_encoder"] == ["transformers_viscpm", "VisCPMPaintTextEncoder"]
    assert index["tokenizer"] == ["transformers_viscpm", "CpmBeeTokenizer"] and index["safety_checker"] == [None, None]
    reference = generate(pipe).images
    for loader in (VisCPMPaintPipeline, DiffusionPipeline):
        loaded = loader.from_pretrained(tmp_path)
        assert isinstance(loaded, VisCPMPaintPipeline)
        assert isinstance(loaded.text_encoder, VisCPMPaintTextEncoder)
        assert isinstance(loaded.tokenizer, CpmBeeTokenizer)
        assert loaded.text_encoder.config.projection_dim == 32
        assert loaded.text_encoder.config.cpmbee_config.dim_model == 64
        loaded.set_progress_bar_config(disable=True)
        assert max_diff(generate(loaded).images, reference) == 0.0


def test_model_cpu_offload(sd_base: Path) -> None:
    """The offload hooks wrap each component's forward; on this CPU-only machine they target the CPU."""
    pipe = build_pipeline(sd_base)
    reference = generate(pipe).images
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.text_encoder, "_hf_hook") and hasattr(pipe.unet, "_hf_hook")
    assert max_diff(generate(pipe).images, reference) == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(sd_base: Path, dtype: torch.dtype) -> None:
    pipe = build_pipeline(sd_base)
    reference = generate(pipe).images
    pipe.to(dtype)
    embeds, _ = pipe.encode_prompt("一只可爱的猫", "cpu", 1, False)
    assert embeds.dtype == dtype
    images = generate(pipe).images
    assert images.dtype == np.float32 and np.isfinite(images).all()
    if draws_match_float32(dtype):
        assert max_diff(images, reference) < 0.1


# --- optional components -----------------------------------------------------------------------------------

_TINY_BERT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
_TINY_VIT = dict(_TINY_BERT, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory) -> BertTokenizer:
    vocab = tmp_path_factory.mktemp("bert") / "vocab.txt"
    chars = sorted(set("一只可爱的猫油画风格海边日落模糊") | set("abcdefghijklmnopqrstuvwxyz"))
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]) + "\n")
    return BertTokenizer(str(vocab))


def prompt_checker(tokenizer: BertTokenizer, unsafe: bool) -> BertForSequenceClassification:
    """A classifier that answers label 1 (unsafe) or label 0 with probability ~1 for every prompt."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), **_TINY_BERT)).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 10.0] if unsafe else [10.0, 0.0]))
    return model


def image_checker(flag_everything: bool) -> StableDiffusionSafetyChecker:
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(text_config=_TINY_BERT, vision_config=_TINY_VIT, projection_dim=16)
    )
    with torch.no_grad():
        # A concept fires when cosine - weight > 0: -2 fires always, 2 never.
        checker.concept_embeds_weights.fill_(-2.0 if flag_everything else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    return checker.eval()


def reranker(tokenizer: BertTokenizer) -> tuple[ChineseCLIPModel, ChineseCLIPProcessor]:
    torch.manual_seed(0)
    config = ChineseCLIPConfig(
        text_config=dict(_TINY_BERT, vocab_size=len(tokenizer)), vision_config=_TINY_VIT, projection_dim=16
    )
    processor = ChineseCLIPProcessor(
        image_processor=ChineseCLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
    )
    return ChineseCLIPModel(config).eval(), processor


def feature_extractor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def test_image_safety_checker(sd_base: Path, pipe: VisCPMPaintPipeline) -> None:
    reference = generate(pipe, num_images_per_prompt=2).images
    flagged = build_pipeline(sd_base, safety_checker=image_checker(True), feature_extractor=feature_extractor())
    output = generate(flagged, num_images_per_prompt=2)
    assert output.nsfw_content_detected == [True, True]
    assert float(np.abs(output.images).max()) == 0.0  # black, as the original
    clean = build_pipeline(sd_base, safety_checker=image_checker(False), feature_extractor=feature_extractor())
    output = generate(clean, num_images_per_prompt=2)
    assert output.nsfw_content_detected == [False, False]
    assert max_diff(output.images, reference) == 0.0


def test_prompt_safety_checker(sd_base: Path, pipe: VisCPMPaintPipeline, bert_tokenizer: BertTokenizer) -> None:
    unsafe = build_pipeline(
        sd_base, prompt_safety_checker=prompt_checker(bert_tokenizer, True), prompt_safety_tokenizer=bert_tokenizer
    )
    with pytest.raises(ValueError, match=r"flagged prompt\(s\) \[0, 1\]"):
        generate(unsafe, ["一只猫", "海边"])
    safe = build_pipeline(
        sd_base, prompt_safety_checker=prompt_checker(bert_tokenizer, False), prompt_safety_tokenizer=bert_tokenizer
    )
    assert max_diff(generate(safe).images, generate(pipe).images) == 0.0


def test_reranker_keeps_the_best_candidate(
    sd_base: Path, pipe: VisCPMPaintPipeline, bert_tokenizer: BertTokenizer
) -> None:
    model, processor = reranker(bert_tokenizer)
    ranked = build_pipeline(sd_base, reranker=model, reranker_processor=processor)
    prompt, candidates = "一只可爱的猫，油画风格", 3
    chosen = generate(ranked, prompt, num_images_per_prompt=2, num_rerank_candidates=candidates).images
    assert chosen.shape == (2, SIZE, SIZE, 3)
    # The same draws without the reranker: 6 candidates, scored here by hand.
    pool = generate(pipe, prompt, num_images_per_prompt=2 * candidates).images
    inputs = processor(
        text=[prompt], images=pipe.image_processor.numpy_to_pil(pool), return_tensors="pt", padding=True
    )
    with torch.no_grad():
        scores = model(**inputs).logits_per_image[:, 0].view(2, candidates)
    best = scores.argmax(dim=-1) + torch.arange(0, 2 * candidates, candidates)
    assert max_diff(chosen, pool[best.numpy()]) < 1e-6
    assert scores.max() - scores.min() > 1e-4  # the choice is not a tie
    # No prompt text or no pixels: nothing to rank, one draw per image.
    assert generate(ranked, prompt, output_type="latent").images.shape[0] == 1


def test_round_trip_with_optional_components(sd_base: Path, bert_tokenizer: BertTokenizer, tmp_path: Path) -> None:
    model, processor = reranker(bert_tokenizer)
    pipe = build_pipeline(
        sd_base,
        safety_checker=image_checker(False),
        feature_extractor=feature_extractor(),
        prompt_safety_checker=prompt_checker(bert_tokenizer, False),
        prompt_safety_tokenizer=bert_tokenizer,
        reranker=model,
        reranker_processor=processor,
    )
    reference = generate(pipe, num_rerank_candidates=2)
    pipe.save_pretrained(tmp_path)
    loaded = VisCPMPaintPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert {type(getattr(loaded, name)).__name__ for name in VisCPMPaintPipeline._optional_components} == {
        "StableDiffusionSafetyChecker",
        "CLIPImageProcessorPil",
        "BertForSequenceClassification",
        "BertTokenizer",
        "ChineseCLIPModel",
        "ChineseCLIPProcessor",
    }
    output = generate(loaded, num_rerank_candidates=2)
    assert output.nsfw_content_detected == reference.nsfw_content_detected == [False]
    assert max_diff(output.images, reference.images) == 0.0


def test_text_encoder_save_load(tmp_path: Path) -> None:
    config = VisCPMPaintTextEncoderConfig(cpmbee_config=tiny_paint_cpmbee_config(), projection_dim=8)
    torch.manual_seed(0)
    encoder = VisCPMPaintTextEncoder(config).eval()
    assert encoder.trans_block.layernorm.eps == 1e-6
    assert {k for k in encoder.state_dict() if k.startswith("trans_block.")} == {
        "trans_block.w_out_res.weight",
        "trans_block.layernorm.weight",
        "trans_block.layernorm.bias",
    }
    encoder.save_pretrained(tmp_path)
    loaded = VisCPMPaintTextEncoder.from_pretrained(tmp_path).eval()
    assert loaded.config.to_dict()["cpmbee_config"]["dim_model"] == 64
    encoding, _ = encode_structured(CpmBeeTokenizer(), [paint_prompt("猫"), paint_prompt("")])
    inputs = {key: encoding[key] for key in encoder.encoder_input_names}
    with torch.no_grad():
        expected = encoder(**inputs).last_hidden_state
        got = loaded(**inputs).last_hidden_state
    assert got.shape == (2, expected.shape[1], 8) and max_diff(got, expected) == 0.0
    # LayerNorm output: zero mean over the projection width at every position, padding included.
    assert float(got.mean(dim=-1).abs().max()) < 1e-5
    assert math.isfinite(float(got.abs().sum()))


# --- bad arguments and batch invariance ------------------------------------------------------------------------


def test_a_prompt_draws_the_same_image_alone_and_in_a_batch_with_a_longer_prompt(pipe: VisCPMPaintPipeline) -> None:
    """Batching pads prompts to one length; that padding is masked, so it never changes a prompt's image."""
    short, long = "a red car", "一只可爱的猫，油画风格，" * 6 + " in the snow at night under the moon"
    alone = generate(pipe, short, generator=[torch.Generator().manual_seed(7)]).images
    batch = generate(pipe, [short, long], generator=[torch.Generator().manual_seed(s) for s in (7, 8)]).images
    long_alone = generate(pipe, long, generator=[torch.Generator().manual_seed(8)]).images
    assert max_diff(batch[0], alone[0]) < 1e-5
    assert max_diff(batch[1], long_alone[0]) < 1e-5
    # Without guidance and with a negative list too.
    kwargs = {"guidance_scale": 1.0}
    alone = generate(pipe, short, generator=[torch.Generator().manual_seed(7)], **kwargs).images
    batch = generate(pipe, [short, long], generator=[torch.Generator().manual_seed(s) for s in (7, 8)], **kwargs)
    assert max_diff(batch.images[0], alone[0]) < 1e-5
    negatives = ["模糊", "blurry, low quality, " * 5]
    alone = generate(pipe, short, negative_prompt=negatives[0], generator=[torch.Generator().manual_seed(7)]).images
    batch = generate(
        pipe, [short, long], negative_prompt=negatives, generator=[torch.Generator().manual_seed(s) for s in (7, 8)]
    ).images
    assert max_diff(batch[0], alone[0]) < 1e-5
    with torch.no_grad():
        embeds, negative_embeds, mask = pipe.encode_prompt([short, long], "cpu", 1, True, return_attention_mask=True)
    assert embeds.shape == negative_embeds.shape and mask.shape == embeds.shape[:2]
    assert mask[1].all() and not mask[0].all() and float(embeds[0][mask[0] == 0].abs().max()) == 0.0


LATENT = (1, 4, SIZE // 2, SIZE // 2)
BAD_ARGUMENTS = [
    ({"prompt": []}, "`prompt` is an empty list"),
    ({"prompt": ["ok", 3]}, "`prompt` has to be"),
    ({"negative_prompt": 5}, "`negative_prompt` has to be"),
    ({"num_images_per_prompt": 0}, "`num_images_per_prompt`"),
    ({"num_images_per_prompt": -1}, "`num_images_per_prompt`"),
    ({"num_images_per_prompt": 1.5}, "`num_images_per_prompt`"),
    ({"num_inference_steps": 0}, "`num_inference_steps`"),
    ({"num_inference_steps": -3}, "`num_inference_steps`"),
    ({"height": 0}, "`height`"),
    ({"height": -32}, "`height`"),
    ({"width": 32.0}, "`width`"),
    ({"height": "32"}, "`height`"),
    ({"width": True}, "`width`"),
    ({"height": 33}, "divisible"),
    ({"latents": torch.zeros(2, 4, SIZE // 2, SIZE // 2)}, "`latents` must have shape"),
    ({"latents": torch.zeros(1, 3, SIZE // 2, SIZE // 2)}, "`latents` must have shape"),
    ({"latents": torch.zeros(1, 4, 8, 8)}, "`latents` must have shape"),
    ({"latents": torch.zeros(4, SIZE // 2, SIZE // 2)}, "`latents` must be a 4-D"),
    ({"latents": torch.zeros(LATENT, dtype=torch.long)}, "`latents` must be a floating-point"),
    ({"latents": torch.full(LATENT, float("nan"))}, "`latents` contains NaN"),
    ({"latents": torch.full(LATENT, float("inf"))}, "`latents` contains NaN"),
    ({"guidance_scale": float("nan")}, "`guidance_scale` must be finite"),
    ({"guidance_scale": float("inf")}, "`guidance_scale` must be finite"),
    ({"guidance_scale": "7.5"}, "`guidance_scale` must be a number"),
    ({"output_type": "bogus"}, "`output_type` must be one of"),
    ({"num_rerank_candidates": 0}, "`num_rerank_candidates`"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS, ids=[str(i) for i in range(len(BAD_ARGUMENTS))])
def test_bad_arguments_are_one_clear_value_error(pipe: VisCPMPaintPipeline, kwargs: dict, message: str) -> None:
    calls: list[int] = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=re.escape(message)):
            generate(pipe, **{"prompt": "一只猫", "num_inference_steps": 1, **kwargs})
    finally:
        hook.remove()
    if "latents" not in kwargs or "shape" not in message:
        assert calls == []  # rejected before any model ran


def test_bad_precomputed_embeddings_are_rejected(pipe: VisCPMPaintPipeline) -> None:
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt("一只猫", "cpu", 1, True)
    for bad, name in ((embeds.clone().fill_(float("nan")), "prompt_embeds"), (embeds[0], "prompt_embeds")):
        with pytest.raises(ValueError, match=f"`{name}`"):
            generate(pipe, None, prompt_embeds=bad, negative_prompt_embeds=negative)
    with pytest.raises(ValueError, match="`negative_prompt_embeds` contains NaN"):
        generate(pipe, None, prompt_embeds=embeds, negative_prompt_embeds=negative * float("inf"))
    # Floating latents of another precision are cast to the pipeline's dtype, as the drawn ones are.
    latents = torch.randn(LATENT, generator=torch.Generator().manual_seed(SEED))
    as_double = generate(pipe, latents=latents.double(), num_inference_steps=1).images
    assert max_diff(as_double, generate(pipe, latents=latents, num_inference_steps=1).images) < 1e-6
