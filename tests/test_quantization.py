"""Quantized loading through transformers' `quantization_config`: CPM-Bee, VisCPM-Chat and Paint's text encoder.

torchao (int8 weight-only; int4 weight-only as `IntxWeightOnlyConfig`, the int4 layout its CPU backend runs) and
optimum-quanto (int8, int4) run here on the CPU; bitsandbytes (8-bit, 4-bit NF4) needs CUDA and is skipped without
it. Each backend is checked against the unquantized model on converted tiny repos: logits (cosine >= 0.99 for 8 bits,
>= 0.95 for 4 bits), answers end to end (`generate_answers`, `chat`, `generate`), Paint images (PSNR) and
`get_memory_footprint()`. The repos are 64 wide (the tiny config's default) so that int4 groups of 32 fit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _repos import converted_repo
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BitsAndBytesConfig,
    QuantoConfig,
    TorchAoConfig,
)
from transformers.utils import is_bitsandbytes_available

from transformers_viscpm.models.cpmbee.encoding_cpmbee import encode_structured
from transformers_viscpm.quantization import quantization_config

torchao = pytest.importorskip("torchao")  # in the `test` extra: a missing backend is visible as a skip, not a pass
pytest.importorskip("optimum.quanto")

PROMPTS = [{"input": "今天天气真好", "prompt": "中翻英", "<ans>": ""}, {"question": "What is 1 + 1?", "<ans>": ""}]
MIN_COSINE = {8: 0.99, 4: 0.95}
CUDA = torch.cuda.is_available()


def torchao_int4() -> TorchAoConfig:
    """torchao's int4 weight-only as its CPU backend runs it (groups of 32; values stored unpacked, one a byte)."""
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))


def torchao_int8() -> TorchAoConfig:
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


# name -> (config factory, bits); every one runs on the CPU
CPU_BACKENDS = {
    "torchao-int8": (torchao_int8, 8),
    "torchao-int8-tied": (lambda: quantization_config("int8"), 8),  # the tied embedding / head matrix too
    "torchao-int4": (torchao_int4, 4),
    "quanto-int8": (lambda: QuantoConfig(weights="int8"), 8),
    "quanto-int4": (lambda: QuantoConfig(weights="int4"), 4),
}
CUDA_BACKENDS = {
    "bnb-8bit": (lambda: BitsAndBytesConfig(load_in_8bit=True), 8),
    "bnb-nf4": (lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"), 4),
}
needs_bnb = pytest.mark.skipif(not (CUDA and is_bitsandbytes_available()), reason="bitsandbytes needs CUDA")


@pytest.fixture(scope="module")
def bee_repo(tmp_path_factory) -> Path:
    from transformers_viscpm.conversion.convert_cpmbee import convert_cpmbee
    from transformers_viscpm.synthetic.cpmbee import original_cpmbee_state_dict, tiny_cpmbee_config

    folder = tmp_path_factory.mktemp("bee64")
    cfg = tiny_cpmbee_config()
    torch.save(original_cpmbee_state_dict(cfg, seed=3), folder / "cpm-bee-10b.pt")
    (folder / "cpm-bee-10b.json").write_text(json.dumps(cfg))
    return convert_cpmbee(folder / "cpm-bee-10b.pt", folder / "cpm-bee-10b.json", folder / "out", show_progress=False)


@pytest.fixture(scope="module")
def chat_repo(tmp_path_factory) -> Path:
    from transformers_viscpm.conversion.convert_viscpm_chat import convert_viscpm_chat
    from transformers_viscpm.synthetic.chat import TINY_CHAT_VISION, original_chat_state_dict, tiny_chat_llm_config

    folder = tmp_path_factory.mktemp("chat64")
    llm_config = tiny_chat_llm_config()
    torch.save(original_chat_state_dict(llm_config, include_mim_head=False), folder / "chat.pt")
    return convert_viscpm_chat(
        folder / "chat.pt", folder / "out", llm_config=llm_config, vision_config=TINY_CHAT_VISION, show_progress=False
    )


@pytest.fixture(scope="module")
def bee_reference(bee_repo):
    model = AutoModelForCausalLM.from_pretrained(bee_repo).eval()
    return model, AutoTokenizer.from_pretrained(bee_repo)


def forward_inputs(tokenizer) -> dict[str, torch.Tensor]:
    encoding, _ = encode_structured(tokenizer, PROMPTS)
    return {k: v for k, v in encoding.items() if k not in ("answer_segment_ids", "ext_table_mask", "allow_unk")}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def quantized_weights(model) -> set[str]:
    """Names of the parameters held by a quantized tensor subclass or a quantized module (quanto, bitsandbytes)."""
    return {name for name, param in model.named_parameters() if type(param.data) is not torch.Tensor}


def check_cpmbee(reference, tokenizer, quantized, bits: int, device: str = "cpu") -> None:
    inputs = forward_inputs(tokenizer)
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = quantized(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu()
    assert cosine(got, expected) >= MIN_COSINE[bits]
    answers = quantized.generate_answers(tokenizer, PROMPTS, max_new_tokens=4)
    assert [set(a) for a in answers] == [set(p) for p in PROMPTS]
    assert all(isinstance(a["<ans>"], str) for a in answers)
    encoding, _ = encode_structured(tokenizer, PROMPTS[:1])
    out = quantized.generate(**encoding.to(device), max_new_tokens=3, do_sample=False, num_beams=1)
    assert out.shape == (1, encoding["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("backend", list(CPU_BACKENDS))
def test_cpmbee_quantized_logits_close_and_answers(bee_repo, bee_reference, backend):
    factory, bits = CPU_BACKENDS[backend]
    reference, tokenizer = bee_reference
    model = AutoModelForCausalLM.from_pretrained(bee_repo, quantization_config=factory()).eval()
    names = quantized_weights(model)
    linears = {f"{n}.weight" for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    assert linears and linears <= names  # every linear of the transformer blocks
    assert ("cpmbee.input_embedding.weight" in names) == (backend == "torchao-int8-tied")
    assert model.lm_head.weight is model.cpmbee.input_embedding.weight  # still tied, whichever the choice
    check_cpmbee(reference, tokenizer, model, bits)


def test_memory_footprint_counts_packed_weights(bee_repo, bee_reference):
    """`get_memory_footprint()` reports the bytes quantized weights really hold (transformers' own reports the
    unquantized size: no saving at all), the tied matrix once."""
    reference, _ = bee_reference
    fp32 = reference.get_memory_footprint()
    assert fp32 == sum(p.nbytes for p in reference.parameters()) + sum(b.nbytes for b in reference.buffers())
    linears = [m for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    weights, rows = sum(m.weight.numel() for m in linears), sum(m.out_features for m in linears)
    vocab, dim = reference.cpmbee.input_embedding.weight.shape

    def saved(config) -> int:
        return fp32 - AutoModelForCausalLM.from_pretrained(bee_repo, quantization_config=config).get_memory_footprint()

    # int8: 1 byte a weight in place of 4, plus a few bytes of scale per output row
    assert 3 * weights - 8 * rows <= saved(torchao_int8()) <= 3 * weights
    assert 3 * weights - 8 * rows <= saved(QuantoConfig(weights="int8")) <= 3 * weights
    # the tied 86,583 x 64 matrix at int8 as well, counted once for the embedding and the head
    assert (
        3 * (weights + vocab * dim) - 8 * (rows + vocab)
        <= saved(quantization_config("int8"))
        <= 3 * (weights + vocab * dim)
    )
    # quanto packs two int4 weights a byte (plus a scale and a shift per group)
    assert 3.5 * weights - 8 * weights / 32 <= saved(QuantoConfig(weights="int4")) <= 3.5 * weights


def test_quantization_config_rejects_unknown_bits():
    with pytest.raises(ValueError, match="int8, int4"):
        quantization_config("int3")


@pytest.mark.parametrize("backend", ["torchao-int8-tied", "quanto-int4"])
def test_chat_quantized_close_and_answers(chat_repo, backend):
    factory, bits = CPU_BACKENDS[backend]
    reference = AutoModelForImageTextToText.from_pretrained(chat_repo).eval()
    model = AutoModelForImageTextToText.from_pretrained(chat_repo, quantization_config=factory()).eval()
    processor = AutoProcessor.from_pretrained(chat_repo)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    inputs = processor(images=image, text="图里有什么？")
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = model(**inputs).logits
    assert cosine(got, expected) >= MIN_COSINE[bits]
    assert any("vision_model" in n for n in quantized_weights(model))  # BEiT-3 and the mapping too
    assert model.get_memory_footprint() < reference.get_memory_footprint()

    answer, context, vision_hidden_states = model.chat(image, "图里有什么？", processor=processor, max_new_tokens=4)
    assert isinstance(answer, str) and context.endswith(f"AI: {answer}\n")
    again, _, _ = model.chat(
        None,
        "再说一遍",
        context=context,
        vision_hidden_states=vision_hidden_states,
        processor=processor,
        max_new_tokens=4,
    )
    assert isinstance(again, str)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=1)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of images in [0, 1]."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


# A quantized text encoder changes the prompt embeddings by ~1e-2 relative (int8) / ~1e-1 (int4); the tiny UNet
# turns that into changes of the same seed's image. Measured here: 41.8 dB for torchao int8, 20.5 dB for quanto int4,
# 10.2 dB for another seed's picture (the control below). 30 dB is a root-mean-square error of 3% of the range (the
# picture unchanged to the eye); 16 dB (16% rms) sits between 4-bit and "another picture" with a margin to both.
MIN_PSNR = {8: 30.0, 4: 16.0}
ANOTHER_PICTURE_MAX_PSNR = 13.0


def paint(pipe, seed: int = 42) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    kwargs = {"num_inference_steps": 3, "height": 32, "width": 32, "output_type": "np"}
    return pipe("一只可爱的猫，油画风格", generator=generator, **kwargs).images


@pytest.fixture(scope="module")
def paint_reference(tmp_path_factory):
    """The shared converted Paint repo, its unquantized pipeline and that pipeline's image."""
    from diffusers import DiffusionPipeline

    repo = converted_repo(tmp_path_factory, "viscpm_paint", False)
    pipe = DiffusionPipeline.from_pretrained(repo)
    pipe.set_progress_bar_config(disable=True)
    return repo, pipe, paint(pipe)


def test_psnr_tells_another_picture(paint_reference):
    """The control of the PSNR thresholds: another seed's picture scores below them."""
    _, pipe, expected = paint_reference
    assert psnr(paint(pipe, seed=7), expected) < ANOTHER_PICTURE_MAX_PSNR < MIN_PSNR[4]


@pytest.mark.parametrize("backend", ["torchao-int8-tied", "quanto-int4"])
def test_paint_quantized_text_encoder_image_close(paint_reference, backend):
    from diffusers import DiffusionPipeline
    from diffusers.quantizers import PipelineQuantizationConfig

    factory, bits = CPU_BACKENDS[backend]
    repo, reference, expected = paint_reference
    quantized = DiffusionPipeline.from_pretrained(
        repo, quantization_config=PipelineQuantizationConfig(quant_mapping={"text_encoder": factory()})
    )
    quantized.set_progress_bar_config(disable=True)
    assert quantized_weights(quantized.text_encoder) and not quantized_weights(quantized.unet)
    assert quantized.text_encoder.get_memory_footprint() < reference.text_encoder.get_memory_footprint()
    value = psnr(paint(quantized), expected)
    assert value >= MIN_PSNR[bits], value


@needs_bnb
@pytest.mark.parametrize("backend", list(CUDA_BACKENDS))
def test_cpmbee_bitsandbytes_on_cuda(bee_repo, bee_reference, backend):
    factory, bits = CUDA_BACKENDS[backend]
    reference, tokenizer = bee_reference
    model = AutoModelForCausalLM.from_pretrained(bee_repo, quantization_config=factory(), device_map="cuda").eval()
    assert model.get_memory_footprint() < reference.get_memory_footprint()
    check_cpmbee(reference, tokenizer, model, bits, device="cuda")


@needs_bnb
@pytest.mark.parametrize("backend", list(CUDA_BACKENDS))
def test_chat_bitsandbytes_on_cuda(chat_repo, backend):
    factory, bits = CUDA_BACKENDS[backend]
    model = AutoModelForImageTextToText.from_pretrained(chat_repo, quantization_config=factory(), device_map="cuda")
    processor = AutoProcessor.from_pretrained(chat_repo)
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    answer, _, _ = model.chat(image, "图里有什么？", processor=processor, max_new_tokens=4)
    assert isinstance(answer, str)
