"""The models and the Paint pipeline on a CUDA GPU, against the CPU results and the golden values of the original.

Skipped where no GPU is visible (CI). Every case uses the tiny seeded models of the other test modules, so that the
whole file runs in seconds on a GPU. fp32 matrix products and convolutions run without TF32 here (see `no_tf32`):
with TF32 (cuDNN's default for convolutions) fp32 results are rounded to 10 mantissa bits and the comparisons with
the CPU would measure TF32, not the port.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
)

from transformers_viscpm.models.cpmbee.encoding_cpmbee import encode_structured
from transformers_viscpm.models.cpmbee.generation_cpmbee import cpmbee_beam_search
from transformers_viscpm.models.cpmbee.modeling_cpmbee import CpmBeeForCausalLM
from transformers_viscpm.models.viscpm_chat.modeling_viscpm_chat import VisCPMChatForConditionalGeneration

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = "cuda"
FP32_ATOL = 1e-4  # GPU vs CPU fp32: only the summation order differs
# Low precision against fp32, relative to the largest fp32 logit. bf16 keeps 8 significant bits (relative rounding
# 2**-9 per value), fp16 11 bits; a few layers of accumulated rounding on O(1) activations stay well inside these.
LOW_PRECISION_REL_TOL = {torch.bfloat16: 0.05, torch.float16: 0.01}


def report(name: str, value: float) -> None:
    """The measured numbers, for the log of a GPU run (`pytest -s`)."""
    print(f"\nGPU-MEASURE {name} = {value:.3e}")


@pytest.fixture(autouse=True)
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def on(tensors: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float().cpu() - b.detach().float().cpu()).abs().max().item()


# --- CPM-Bee ---------------------------------------------------------------------------------------------------


def bee_model(name: str, attn_implementation: str = "sdpa", device: str = "cpu") -> CpmBeeForCausalLM:
    """A fresh copy of the fixture model (the other modules cache theirs on the CPU)."""
    from test_modeling_cpmbee import build_model, load_fixture

    fixture = load_fixture(name)
    model = build_model(fixture["original_config"], fixture["seed"], attn_implementation).to(device)
    model.generation_config.eos_token_id = None  # the fixtures feed EOS to move to the second answer
    return model


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["masked", "real_buckets"])
def test_cpmbee_fp32_logits_on_cuda_equal_cpu(name, attn_implementation):
    from test_modeling_cpmbee import assert_matches_record, fixture_inputs, load_fixture

    fixture = load_fixture(name)
    inputs = fixture_inputs(fixture)
    with torch.no_grad():
        cpu = bee_model(name, attn_implementation)(**inputs).logits
        gpu = bee_model(name, attn_implementation, CUDA)(**on(inputs, CUDA)).logits
    assert gpu.device.type == CUDA and gpu.dtype == torch.float32 and gpu.shape == cpu.shape
    difference = max_diff(gpu, cpu)
    report(f"cpmbee[{name},{attn_implementation}] fp32 cuda-cpu logits max abs", difference)
    assert difference <= FP32_ATOL
    positions = fixture["prefill"]["positions"]
    for i, record in enumerate(fixture["prefill"]["logits"]):  # and the original's values
        assert_matches_record(gpu[:, positions[i]].cpu(), record, fixture["vocab_subset"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpmbee_half_precision_on_cuda_close_to_fp32(dtype):
    from test_modeling_cpmbee import fixture_inputs, load_fixture

    model = bee_model("real_buckets", device=CUDA)
    inputs = on(fixture_inputs(load_fixture("real_buckets")), CUDA)
    with torch.no_grad():
        reference = model(**inputs).logits
        low = model.to(dtype)(**inputs).logits
    assert low.dtype == dtype and torch.isfinite(low).all()
    valid = inputs["attention_mask"].bool()  # padding rows attend to nothing: their logits carry no meaning
    relative = max_diff(low[valid], reference[valid]) / reference[valid].abs().max().item()
    similarity = torch.nn.functional.cosine_similarity(low[valid].float(), reference[valid], dim=-1).min().item()
    report(f"cpmbee {dtype} cuda vs fp32 logits max abs / max |logit|", relative)
    report(f"cpmbee {dtype} cuda vs fp32 logits min cosine", similarity)
    assert relative <= LOW_PRECISION_REL_TOL[dtype] and similarity > 0.999


@pytest.mark.parametrize("name", ["masked", "real_buckets"])
def test_cpmbee_cached_decoding_on_cuda_equals_full_recompute(name):
    """Forced tokens (an ext id fed back, EOS opening the next answer): the cache path, the no-cache path (the whole
    sequence each step) and the static cache agree on the GPU and with the original's recorded logits."""
    from test_modeling_cpmbee import ForceTokens, assert_matches_record, generate_steps, load_fixture

    fixture = load_fixture(name)
    model, tokens = bee_model(name, device=CUDA), fixture["forced"]["tokens"]
    cached = generate_steps(model, fixture, ForceTokens(tokens))
    full = generate_steps(model, fixture, ForceTokens(tokens), use_cache=False)
    # Without auto-compilation (see `CpmBeeForCausalLM._valid_auto_compile_criteria`); compiled, an H100 gave the
    # same tokens, logits within 3e-6, after 10-40 s of compiling.
    static = generate_steps(model, fixture, ForceTokens(tokens), cache_implementation="static")
    assert cached.sequences[:, -4:].tolist() == full.sequences[:, -4:].tolist() == tokens
    assert torch.equal(static.sequences, cached.sequences)
    differences = [max_diff(a, b) for a, b in zip(cached.logits, full.logits, strict=True)]
    static_differences = [max_diff(a, b) for a, b in zip(static.logits, cached.logits, strict=True)]
    report(f"cpmbee[{name}] cuda cached vs recomputed step logits max abs", max(differences))
    report(f"cpmbee[{name}] cuda static vs dynamic cache step logits max abs", max(static_differences))
    assert max(differences) <= FP32_ATOL and max(static_differences) <= FP32_ATOL
    for logits, record in zip(cached.logits, fixture["forced"]["steps"], strict=True):
        assert_matches_record(logits.cpu(), record, fixture["vocab_subset"])


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_cpmbee_greedy_generate_on_cuda_equals_cpu(cache_implementation):
    from test_modeling_cpmbee import OriginalMasking, generate_steps, load_fixture

    fixture = load_fixture("masked")
    masking = OriginalMasking(fixture["allow_unk"], fixture["ext_allowed"])
    extra = {"cache_implementation": cache_implementation}
    cpu = generate_steps(bee_model("masked"), fixture, masking, steps=4, **extra)
    gpu = generate_steps(bee_model("masked", device=CUDA), fixture, masking, steps=4, **extra)
    assert gpu.sequences.device.type == CUDA
    assert gpu.sequences.tolist() == cpu.sequences.tolist()
    assert gpu.sequences[:, -4:].tolist() == fixture["greedy"]["tokens"]  # the original's greedy tokens
    # Longer, with the model's own ext-table masking: still the same tokens.
    cpu = generate_steps(bee_model("masked"), fixture, steps=12, **extra)
    gpu = generate_steps(bee_model("masked", device=CUDA), fixture, steps=12, **extra)
    assert gpu.sequences.tolist() == cpu.sequences.tolist()


@pytest.mark.parametrize("name", ["batch_nested_chat", "batch_oov_chat", "batch_masked_window", "bos_nested_chat"])
def test_cpmbee_original_beam_search_on_cuda(name):
    from test_generation_cpmbee import CASES, model, settings_of, tokenizer

    case = CASES[name]
    cpu_model = model(case["config"])
    gpu_model = CpmBeeForCausalLM(cpu_model.config).eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.to(CUDA)
    encoding, infos = encode_structured(tokenizer(), case["data_list"])
    result = cpmbee_beam_search(gpu_model, encoding.to(CUDA), infos, **settings_of(case))
    assert [[list(pair) for pair in pairs] for pairs in result] == case["result_ids"]  # the original's ids
    settings = settings_of(case)
    on_cpu = cpu_model.generate_answers(tokenizer(), case["data_list"], **settings)
    on_gpu = gpu_model.generate_answers(tokenizer(), case["data_list"], **settings)
    assert on_gpu == on_cpu and any(isinstance(v, str) and v for out in on_gpu for v in _leaves(out["<ans>"]))


def _leaves(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _leaves(value)
    else:
        yield node


# --- from_pretrained on the GPU -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpmbee_folder(tmp_path_factory) -> Path:
    from _repos import converted_repo

    return converted_repo(tmp_path_factory, "cpmbee", remote_code=False)


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> Path:
    from test_modeling_viscpm_chat import convert_tiny_chat

    return convert_tiny_chat(tmp_path_factory.mktemp("chat-gpu"))


def assert_all_on(model: torch.nn.Module, dtype: torch.dtype) -> None:
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == CUDA for t in tensors)
    assert {p.dtype for p in model.parameters()} == {dtype}


@pytest.mark.parametrize("device_map", ["auto", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpmbee_from_pretrained_on_cuda(cpmbee_folder, device_map, dtype):
    from transformers_viscpm.models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(cpmbee_folder, device_map=device_map, dtype=dtype)
    assert isinstance(loaded, CpmBeeForCausalLM) and loaded.device.type == CUDA
    assert_all_on(loaded, dtype)
    assert loaded.lm_head.weight is loaded.cpmbee.input_embedding.weight
    reference = AutoModelForCausalLM.from_pretrained(cpmbee_folder)
    tokenizer = CpmBeeTokenizer.from_pretrained(cpmbee_folder)
    data = [{"input": "今天天气真好 <b>", "prompt": "中翻英", "<ans>": ""}, {"input": "hello", "<ans>": {"a": ""}}]
    encoding, _ = encode_structured(tokenizer, data)
    valid = encoding["attention_mask"].bool()
    with torch.no_grad():
        expected = reference(**encoding).logits
        logits = loaded(**on(encoding, CUDA)).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    difference = max_diff(logits.cpu()[valid], expected[valid])
    report(f"cpmbee from_pretrained(device_map={device_map}, {dtype}) vs cpu fp32 logits max abs", difference)
    tolerance = FP32_ATOL if dtype == torch.float32 else LOW_PRECISION_REL_TOL[dtype] * expected[valid].abs().max()
    assert difference <= tolerance
    settings = {"num_beams": 2, "max_new_tokens": 4}
    answers = loaded.generate_answers(tokenizer, data, **settings)
    assert [type(a["<ans>"]) for a in answers] == [str, dict]
    if dtype == torch.float32:
        assert answers == reference.generate_answers(tokenizer, data, **settings)


@pytest.mark.parametrize("device_map", ["auto", "cuda"])
def test_chat_from_pretrained_on_cuda_answers_as_on_cpu(chat_folder, device_map):
    from test_modeling_viscpm_chat import GOLDEN, _settings, make_image

    image = make_image(**GOLDEN["image"])
    cpu = VisCPMChatForConditionalGeneration.from_pretrained(chat_folder).eval()
    gpu = AutoModelForImageTextToText.from_pretrained(chat_folder, device_map=device_map).eval()
    assert isinstance(gpu, VisCPMChatForConditionalGeneration)
    assert_all_on(gpu, torch.float32)
    for name in ("en_default", "zh_greedy"):
        context, states = "", None
        for turn in GOLDEN["chats"][name]:
            answer, new_context, states = gpu.chat(image, turn["question"], context, states, **_settings(turn))
            assert states.device.type == CUDA
            assert answer == turn["original_answer"]  # the original's answer on the same weights
            assert (answer, new_context) == cpu.chat(image, turn["question"], context, **_settings(turn))[:2]
            context = new_context
    # Stock generate from the processor's tensors, greedy: the CPU's tokens.
    inputs = gpu.default_processor(images=image, text="请描述这张图片。")
    cpu_out = cpu.generate(**inputs, max_new_tokens=6, num_beams=1, do_sample=False)
    gpu_out = gpu.generate(**inputs.to(CUDA), max_new_tokens=6, num_beams=1, do_sample=False)
    assert gpu_out.tolist() == cpu_out.tolist()
    with torch.no_grad():
        difference = max_diff(gpu(**inputs).logits, cpu(**inputs.to("cpu")).logits)
    report(f"chat from_pretrained(device_map={device_map}) cuda vs cpu prefill logits max abs", difference)
    assert difference <= FP32_ATOL


def test_chat_bfloat16_on_cuda(chat_folder):
    from test_modeling_viscpm_chat import GOLDEN, make_image

    image = make_image(**GOLDEN["image"])
    cpu = VisCPMChatForConditionalGeneration.from_pretrained(chat_folder).eval()
    gpu = VisCPMChatForConditionalGeneration.from_pretrained(chat_folder, device_map="cuda", dtype=torch.bfloat16)
    assert_all_on(gpu, torch.bfloat16)
    inputs = gpu.default_processor(images=image, text="What is in the image?")
    with torch.no_grad():
        expected = cpu(**inputs).logits
        logits = gpu(**inputs.to(CUDA)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    similarity = torch.nn.functional.cosine_similarity(logits.float().cpu(), expected, dim=-1).min().item()
    report("chat bf16 cuda vs cpu fp32 prefill logits min cosine", similarity)
    assert similarity > 0.999
    answer, context, states = gpu.chat(image, "What is in the image?", max_new_tokens=8)
    assert isinstance(answer, str) and states.dtype == torch.bfloat16 and context.endswith(answer + "\n")


# --- VisCPM-Paint -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory) -> Path:
    from transformers_viscpm.synthetic.paint import write_sd_base

    folder = tmp_path_factory.mktemp("sd-base-gpu")
    write_sd_base(folder)
    return folder


@pytest.mark.parametrize("case_name", ["zh_cfg", "en_negative_two_images"])
def test_paint_on_cuda(sd_base, case_name):
    from test_pipeline_viscpm_paint import CASES, build_pipeline, draws_match_float32, generate_case

    case = CASES[case_name]
    golden = np.asarray(case["images"])
    cpu_images = generate_case(build_pipeline(sd_base), case)
    pipe = build_pipeline(sd_base).to(CUDA)
    assert pipe.device.type == CUDA
    images = generate_case(pipe, case)
    assert images.shape == golden.shape and np.isfinite(images).all()
    difference, golden_difference = np.abs(images - cpu_images).max(), np.abs(images - golden).max()
    report(f"paint[{case_name}] fp32 cuda vs cpu image max abs", difference)
    report(f"paint[{case_name}] fp32 cuda vs original image max abs", golden_difference)
    assert difference <= 1e-3 and golden_difference <= 1e-3

    pipe.to(torch.float16)
    half = generate_case(pipe, case)
    assert half.dtype == np.float32 and half.shape == golden.shape and np.isfinite(half).all()
    assert half.min() >= 0.0 and half.max() <= 1.0 and half.std() > 0.01  # a picture, not a constant
    report(f"paint[{case_name}] fp16 cuda vs fp32 image max abs", np.abs(half - images).max())
    if draws_match_float32(torch.float16):  # else fp16 denoises other noise (measured 1.0 with torch 2.11)
        assert np.abs(half - images).max() < 0.1  # the CPU half-precision test's bound


def test_paint_model_cpu_offload_to_cuda(sd_base):
    from test_pipeline_viscpm_paint import CASES, build_pipeline, generate_case

    case = CASES["zh_cfg"]
    reference = generate_case(build_pipeline(sd_base).to(CUDA), case)
    pipe = build_pipeline(sd_base)
    pipe.enable_model_cpu_offload()  # the GPU by default
    assert hasattr(pipe.text_encoder, "_hf_hook") and hasattr(pipe.unet, "_hf_hook")
    images = generate_case(pipe, case)
    assert pipe.unet.device.type == "cpu"  # moved back after use
    difference = np.abs(images - reference).max()
    report("paint model_cpu_offload vs pipe.to(cuda) image max abs", difference)
    assert difference <= 1e-6


def test_paint_converted_folder_on_cuda(tmp_path_factory):
    """The converted hub folder through DiffusionPipeline.from_pretrained, fp16 on the GPU."""
    from _repos import converted_repo
    from diffusers import DiffusionPipeline

    folder = converted_repo(tmp_path_factory, "viscpm_paint", remote_code=False)
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16).to(CUDA)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder.dtype == pipe.unet.dtype == torch.float16 and pipe.device.type == CUDA
    generator = torch.Generator().manual_seed(0)
    image = pipe("一只可爱的猫", num_inference_steps=2, height=32, width=32, generator=generator, output_type="np")
    assert image.images.shape == (1, 32, 32, 3) and np.isfinite(image.images).all()
