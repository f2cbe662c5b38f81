"""Offloaded models: `device_map` with CPU and disk offload (`max_memory`, `offload_folder`) runs `chat()`,
`generate_answers()` and `generate()` with the answers of the model in memory; Paint's memory savers (VAE slicing and
tiling, attention slicing) keep its images, and its model / sequential CPU offload run on a GPU (skipped without
CUDA). The converted tiny repos are the shared ones of `tests/_repos.py`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _repos import converted_repo
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from transformers_viscpm.models.cpmbee.encoding_cpmbee import encode_structured
from transformers_viscpm.quantization import embedding_execution_device

pytest.importorskip("accelerate")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
PROMPTS = [{"input": "今天天气真好", "prompt": "中翻英", "<ans>": ""}]
IMAGE = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8))


def offload_maps(folder, model) -> dict[str, dict]:
    """`from_pretrained` arguments: everything on disk; and CPU memory for all but half the CPM-Bee layers' bytes,
    so that `device_map="auto"` keeps the embedding / head on the CPU and puts the layers on disk."""
    layers = sum(p.nbytes for name, p in model.named_parameters() if ".encoder." in name and "vision" not in name)
    return {
        "disk": {"device_map": {"": "disk"}, "offload_folder": str(folder / "disk")},
        "cpu+disk": {
            "device_map": "auto",
            "max_memory": {"cpu": model.get_memory_footprint() - layers // 2},
            "offload_folder": str(folder / "auto"),
        },
    }


@pytest.fixture(scope="module")
def bee(tmp_path_factory):
    repo = converted_repo(tmp_path_factory, "cpmbee", False)
    model = AutoModelForCausalLM.from_pretrained(repo).eval()
    return repo, model, AutoTokenizer.from_pretrained(repo)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    repo = converted_repo(tmp_path_factory, "viscpm_chat", False)
    model = AutoModelForImageTextToText.from_pretrained(repo).eval()
    return repo, model, AutoProcessor.from_pretrained(repo)


@pytest.mark.parametrize("placement", ["disk", "cpu+disk"])
def test_cpmbee_offloaded_answers_equal(bee, tmp_path, placement):
    repo, reference, tokenizer = bee
    kwargs = offload_maps(tmp_path, reference)[placement]
    model = AutoModelForCausalLM.from_pretrained(repo, **kwargs).eval()
    assert "disk" in set(model.hf_device_map.values())
    if placement == "cpu+disk":
        assert "cpu" in set(model.hf_device_map.values())
    assert model.device.type == "meta" or placement != "disk"  # what `model.device` says: not where inputs go
    assert embedding_execution_device(model) == torch.device("cpu")
    assert model.get_memory_footprint() < reference.get_memory_footprint()  # disk weights are not in memory

    settings = {"max_new_tokens": 5}
    assert model.generate_answers(tokenizer, PROMPTS, **settings) == reference.generate_answers(
        tokenizer, PROMPTS, **settings
    )
    encoding, _ = encode_structured(tokenizer, PROMPTS)
    greedy = {"max_new_tokens": 4, "do_sample": False, "num_beams": 1}
    assert torch.equal(model.generate(**encoding, **greedy), reference.generate(**encoding, **greedy))


@pytest.mark.parametrize("placement", ["disk", "cpu+disk"])
def test_chat_offloaded_answers_equal(chat, tmp_path, placement):
    repo, reference, processor = chat
    kwargs = offload_maps(tmp_path, reference)[placement]
    model = AutoModelForImageTextToText.from_pretrained(repo, **kwargs).eval()
    assert "disk" in set(model.hf_device_map.values())

    settings = {"processor": processor, "max_new_tokens": 5}
    expected, expected_context, expected_states = reference.chat(IMAGE, "图里有什么？", **settings)
    answer, context, states = model.chat(IMAGE, "图里有什么？", **settings)
    assert (answer, context) == (expected, expected_context)
    torch.testing.assert_close(states, expected_states)
    second = model.chat(None, "再说一遍", context=context, vision_hidden_states=states, **settings)[0]
    assert second == reference.chat(None, "再说一遍", context=context, vision_hidden_states=states, **settings)[0]

    inputs = processor(images=IMAGE, text="图里有什么？")
    greedy = {"max_new_tokens": 4, "do_sample": False, "num_beams": 1}
    assert torch.equal(model.generate(**inputs, **greedy), reference.generate(**inputs, **greedy))


# --- Paint -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paint_repo(tmp_path_factory):
    return converted_repo(tmp_path_factory, "viscpm_paint", False)


def load_paint(repo, **kwargs):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(repo, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def paint(pipe, **kwargs) -> np.ndarray:
    settings = {"num_inference_steps": 3, "height": 32, "width": 32, "output_type": "np", **kwargs}
    prompts = ["一只可爱的猫，油画风格", "月静春山空"]
    return pipe(prompts, generator=torch.Generator().manual_seed(42), **settings).images


def test_paint_vae_slicing_and_attention_slicing_keep_the_images(paint_repo):
    """diffusers 0.42 dropped the pipelines' `enable_vae_slicing` / `enable_vae_tiling` for the VAE's own
    `enable_slicing` / `enable_tiling` (as its stock SD pipeline); attention slicing is the pipeline's."""
    pipe = load_paint(paint_repo)
    expected = paint(pipe)
    pipe.vae.enable_slicing()
    pipe.enable_attention_slicing(1)
    np.testing.assert_allclose(paint(pipe), expected, atol=1e-5)
    pipe.vae.disable_slicing()
    pipe.disable_attention_slicing()
    np.testing.assert_allclose(paint(pipe), expected, atol=1e-6)


def test_paint_vae_tiling_decodes_tiles(paint_repo, monkeypatch):
    """Tiling with tiles smaller than the image: the decode goes tile by tile and gives an image of the same size
    (blended tile seams differ from the untiled decode, so no equality here)."""
    pipe = load_paint(paint_repo)
    expected = paint(pipe)
    pipe.vae.enable_tiling()
    pipe.vae.tile_sample_min_size = 16  # the tile size is an attribute of diffusers 0.42's AutoencoderKL
    pipe.vae.tile_latent_min_size = 16 // pipe.vae_scale_factor
    calls = []
    tiled_decode = pipe.vae.tiled_decode
    monkeypatch.setattr(pipe.vae, "tiled_decode", lambda *a, **k: calls.append(1) or tiled_decode(*a, **k))
    tiled = paint(pipe)
    assert calls and tiled.shape == expected.shape and np.isfinite(tiled).all()
    assert 0 <= tiled.min() and tiled.max() <= 1


@needs_cuda
@pytest.mark.parametrize("offload", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_paint_cpu_offload_on_cuda_equals_gpu(paint_repo, offload):
    on_gpu = load_paint(paint_repo).to("cuda")
    expected = paint(on_gpu)
    del on_gpu
    pipe = load_paint(paint_repo)
    getattr(pipe, offload)()
    np.testing.assert_allclose(paint(pipe), expected, atol=1e-3)
    assert pipe.text_encoder.device.type in ("cpu", "meta")


@needs_cuda
def test_paint_quantized_text_encoder_with_model_offload_on_cuda(paint_repo):
    from diffusers.quantizers import PipelineQuantizationConfig

    from transformers_viscpm.quantization import quantization_config

    expected = paint(load_paint(paint_repo).to("cuda"))
    pipe = load_paint(
        paint_repo,
        quantization_config=PipelineQuantizationConfig(quant_mapping={"text_encoder": quantization_config("int8")}),
    )
    pipe.enable_model_cpu_offload()
    image = paint(pipe)
    mse = float(np.mean((image - expected) ** 2))
    assert 10 * np.log10(1 / max(mse, 1e-12)) >= 30  # the int8 threshold of test_quantization.py


@needs_cuda
def test_chat_cpu_offload_on_cuda(chat, tmp_path):
    repo, reference, processor = chat
    model = AutoModelForImageTextToText.from_pretrained(
        repo,
        device_map="auto",
        max_memory={0: reference.get_memory_footprint() // 2, "cpu": 10**10},
        offload_folder=str(tmp_path),
    )
    assert embedding_execution_device(model).type == "cuda" or "cpu" in set(model.hf_device_map.values())
    settings = {"processor": processor, "max_new_tokens": 5}
    assert model.chat(IMAGE, "图里有什么？", **settings)[0] == reference.chat(IMAGE, "图里有什么？", **settings)[0]
