"""CPM-Bee language model: parity with the original (golden fixtures), generation, dtypes, training, save/load."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from transformers import (
    CompileConfig,
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StaticCache,
)
from transformers.generation.streamers import BaseStreamer

from transformers_viscpm.models.cpmbee.configuration_cpmbee import CpmBeeConfig
from transformers_viscpm.models.cpmbee.modeling_cpmbee import (
    CpmBeeAttention,
    CpmBeeForCausalLM,
    cpmbee_attention_layout,
)
from transformers_viscpm.synthetic.cpmbee import original_cpmbee_state_dict, tiny_cpmbee_config

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_NAMES = ["small", "masked", "real_buckets"]
VOCAB = 86583
ATOL = 1e-4


@cache
def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"modeling_cpmbee_{name}.json").read_text())


def build_model(original_config: dict, seed: int, attn_implementation: str = "sdpa") -> CpmBeeForCausalLM:
    """Our model carrying the seeded original-layout weights (`cpmbee.` prefix, lm_head tied)."""
    config = CpmBeeConfig.from_original_config(original_config, attn_implementation=attn_implementation)
    model = CpmBeeForCausalLM(config).eval()
    state = {f"cpmbee.{k}": v for k, v in original_cpmbee_state_dict(original_config, seed).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    assert model.lm_head.weight is model.cpmbee.input_embedding.weight
    return model


@cache
def fixture_model(name: str, attn_implementation: str = "sdpa") -> CpmBeeForCausalLM:
    fixture = load_fixture(name)
    model = build_model(fixture["original_config"], fixture["seed"], attn_implementation)
    # The fixtures feed EOS to move to the second answer, so generation must not stop there.
    model.generation_config.eos_token_id = None
    return model


def fixture_inputs(fixture: dict) -> dict[str, torch.Tensor]:
    """The original's encoded batch under our input names (DESIGN.md structured-input table)."""
    inputs = {k: torch.tensor(v) for k, v in fixture["inputs"].items()}
    inputs["attention_mask"] = (inputs["num_segments"] != 0).long()
    batch = inputs["input_ids"].shape[0]
    for key in ("ext_table_ids", "ext_table_sub"):  # the original's (E,) table, one row per sample
        inputs[key] = inputs[key][None].expand(batch, -1).contiguous()
    return inputs


def answer_segment_ids(fixture: dict) -> torch.Tensor:
    width = max(len(row) for row in fixture["answer_segment_ids"])
    return torch.tensor([row + [-1] * (width - len(row)) for row in fixture["answer_segment_ids"]])


def assert_matches_record(logits: torch.Tensor, record: dict, subset: list[int]) -> None:
    """logits (B, V+E) against a recorded subset of values and row statistics."""
    expected = torch.tensor(record["values"], dtype=torch.float32)
    torch.testing.assert_close(logits[:, subset], expected, atol=ATOL, rtol=0)
    for row, stats in zip(logits, record["stats"]):
        assert abs(row.max().item() - stats["max"]) <= ATOL
        assert abs(row.min().item() - stats["min"]) <= ATOL
        assert abs(row.mean().item() - stats["mean"]) <= 1e-5
        assert int(row.argmax()) == stats["argmax"]


class ForceTokens(LogitsProcessor):
    """Makes greedy decoding pick the given token per row and step."""

    def __init__(self, tokens: list[list[int]]) -> None:
        self.tokens = torch.tensor(tokens)
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        forced = torch.full_like(scores, -float("inf"))
        forced.scatter_(1, self.tokens[:, self.step, None].to(scores.device), 0.0)
        self.step += 1
        return forced


class OriginalMasking(LogitsProcessor):
    """The original beam search's masking: `<unk>` unless the sample's table maps it, ext ids of other samples."""

    def __init__(self, allow_unk: list[bool], ext_allowed: list[list[int]]) -> None:
        self.allow_unk = allow_unk
        self.ext_allowed = ext_allowed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for row in range(scores.shape[0]):
            if not self.allow_unk[row]:
                scores[row, 1] = -10000
            for ext_id in range(VOCAB, scores.shape[1]):
                if ext_id not in self.ext_allowed[row]:
                    scores[row, ext_id] = -10000
        return scores


def generate_steps(model, fixture, processor=None, steps=4, **kwargs):
    """Greedy `generate` on the fixture's batch, on the model's device, returning the per-step logits."""
    config = GenerationConfig(
        max_new_tokens=steps,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    inputs = {**fixture_inputs(fixture), "answer_segment_ids": answer_segment_ids(fixture)}
    return model.generate(
        **{key: value.to(model.device) for key, value in inputs.items()},
        generation_config=config,
        logits_processor=LogitsProcessorList([processor] if processor is not None else []),
    )


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_synthetic_state_dict_is_the_originals(name):
    fixture = load_fixture(name)
    state = original_cpmbee_state_dict(fixture["original_config"], fixture["seed"])
    assert list(state) == list(fixture["state_dict_sha256"])
    for key, tensor in state.items():
        assert hashlib.sha256(tensor.numpy().tobytes()).hexdigest() == fixture["state_dict_sha256"][key], key


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_prefill_matches_original(name, attn_implementation):
    fixture = load_fixture(name)
    model = fixture_model(name, attn_implementation)
    positions = fixture["prefill"]["positions"]
    with torch.no_grad():
        logits = model(**fixture_inputs(fixture), logits_to_keep=torch.tensor(positions)).logits
    assert logits.shape == (2, len(positions), VOCAB + len(fixture["inputs"]["ext_table_ids"]))
    for i, record in enumerate(fixture["prefill"]["logits"]):
        assert_matches_record(logits[:, i], record, fixture["vocab_subset"])


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_incremental_steps_match_original(name):
    """Stock generate() with forced tokens: an ext id fed back as (id, sub), EOS moving to the second answer."""
    fixture = load_fixture(name)
    out = generate_steps(fixture_model(name), fixture, ForceTokens(fixture["forced"]["tokens"]))
    assert out.sequences[:, -4:].tolist() == fixture["forced"]["tokens"]
    for logits, record in zip(out.logits, fixture["forced"]["steps"], strict=True):
        assert_matches_record(logits, record, fixture["vocab_subset"])


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_greedy_generate_matches_original(name):
    fixture = load_fixture(name)
    processor = OriginalMasking(fixture["allow_unk"], fixture["ext_allowed"])
    out = generate_steps(fixture_model(name), fixture, processor)
    assert out.sequences[:, -4:].tolist() == fixture["greedy"]["tokens"]
    for logits, record in zip(out.logits, fixture["greedy"]["steps"], strict=True):
        assert_matches_record(logits, record, fixture["vocab_subset"])


def test_cache_path_equals_full_recompute():
    fixture = load_fixture("masked")
    model = fixture_model("masked")
    cached = generate_steps(model, fixture, ForceTokens(fixture["forced"]["tokens"]))
    full = generate_steps(model, fixture, ForceTokens(fixture["forced"]["tokens"]), use_cache=False)
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.logits, full.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["masked", "real_buckets"])
def test_static_cache_steps_match_original(name):
    """`cache_implementation="static"`: preallocated keys, the unused slots masked; the answer's `<s>` has a slot."""
    fixture = load_fixture(name)
    forced = ForceTokens(fixture["forced"]["tokens"])
    out = generate_steps(fixture_model(name), fixture, forced, cache_implementation="static")
    assert out.sequences[:, -4:].tolist() == fixture["forced"]["tokens"]
    for logits, record in zip(out.logits, fixture["forced"]["steps"], strict=True):
        assert_matches_record(logits, record, fixture["vocab_subset"])


def test_too_small_static_cache_is_one_clear_error():
    fixture = load_fixture("small")
    cache = StaticCache(config=fixture_model("small").config, max_cache_len=4)
    with pytest.raises(ValueError, match=r"The cache holds 4 tokens, but this step needs \d+ \(0 cached"):
        fixture_model("small")(**fixture_inputs(fixture), cache=cache, use_cache=True)


def test_static_cache_is_compiled_automatically_on_accelerators(monkeypatch):
    """Decoding steps on a static cache have fixed shapes, so stock `generate` may compile them on a GPU."""
    model = fixture_model("small")
    monkeypatch.setattr(CpmBeeForCausalLM, "device", property(lambda self: torch.device("cuda")))
    static = {"cache": StaticCache(config=model.config, max_cache_len=8)}
    assert model._valid_auto_compile_criteria(static, GenerationConfig(cache_implementation="static"))
    assert not model._valid_auto_compile_criteria({"cache": DynamicCache()}, GenerationConfig())


def test_single_low_precision_query_takes_the_eager_maths_under_sdpa():
    """CPU SDPA is 4-5x slower than two matmuls for one bf16 query, so decoding steps use the eager maths there."""
    outputs = {}
    for implementation in ("sdpa", "eager"):
        config = CpmBeeConfig.from_original_config(tiny_cpmbee_config(), attn_implementation=implementation)
        torch.manual_seed(0)
        attention = CpmBeeAttention(config, cache_idx=0).to(torch.bfloat16).eval()
        generator = torch.Generator().manual_seed(1)
        past = [torch.randn(1, 2, 37, 32, generator=generator).to(torch.bfloat16) for _ in range(2)]
        cache = DynamicCache()
        cache.update(*past, 0)
        hidden = torch.randn(1, 1, 64, generator=generator).to(torch.bfloat16)
        bias = torch.randn(1, 2, 1, 38, generator=generator).to(torch.bfloat16)
        with torch.no_grad():
            outputs[implementation], _ = attention(hidden, bias, torch.ones(1, 1, dtype=torch.bool), cache=cache)
    assert torch.equal(outputs["sdpa"], outputs["eager"])


def test_eager_and_sdpa_agree_on_incremental_steps():
    fixture = load_fixture("small")
    forced = ForceTokens(fixture["forced"]["tokens"])
    sdpa = generate_steps(fixture_model("small", "sdpa"), fixture, forced)
    forced.step = 0
    eager = generate_steps(fixture_model("small", "eager"), fixture, forced)
    for a, b in zip(sdpa.logits, eager.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_output_attentions_and_hidden_states():
    fixture = load_fixture("masked")
    inputs = fixture_inputs(fixture)
    with torch.no_grad():
        out = fixture_model("masked", "eager")(
            **inputs, logits_to_keep=1, output_attentions=True, output_hidden_states=True
        )
    assert len(out.hidden_states) == 4 and len(out.attentions) == 2  # embeddings + 3 layers; 2 attention layers
    for weights in out.attentions:
        row_sums = weights.sum(-1)  # (B, heads, L)
        expected = inputs["attention_mask"][:, None, :].float().expand_as(row_sums)
        torch.testing.assert_close(row_sums, expected, atol=1e-5, rtol=0)  # padding rows attend to nothing
        assert (weights * (1 - inputs["attention_mask"])[:, None, None, :]).abs().max() == 0  # nor are seen


def test_inputs_embeds_generation_matches_input_ids():
    """VisCPM-Chat generates from injected embeddings: the prompt rows come from `inputs_embeds`."""
    fixture = load_fixture("small")
    model = fixture_model("small")
    inputs = fixture_inputs(fixture)
    embeds = model.embed_input_ids(inputs["input_ids"], inputs["input_id_subs"])
    config = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    extra = {"answer_segment_ids": answer_segment_ids(fixture), "generation_config": config}
    from_ids = model.generate(**inputs, **extra)
    inputs["inputs_embeds"] = embeds
    from_embeds = model.generate(**inputs, **extra)
    assert torch.equal(from_ids, from_embeds)


def test_beam_search_scores_equal_teacher_forced_log_probs():
    fixture = load_fixture("small")
    model = fixture_model("small")
    inputs = fixture_inputs(fixture)
    answers = answer_segment_ids(fixture)
    config = GenerationConfig(
        max_new_tokens=3,
        num_beams=3,
        num_return_sequences=3,
        length_penalty=0.0,
        eos_token_id=None,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    out = model.generate(**inputs, answer_segment_ids=answers, generation_config=config)
    assert out.sequences.shape == (6, inputs["input_ids"].shape[1] + 3)
    # Teacher forcing without a cache: the whole prompt + generated sequence in one forward.
    expanded = {k: v.repeat_interleave(3, dim=0) for k, v in inputs.items() if k != "input_ids"}
    model_inputs = model.prepare_inputs_for_generation(
        out.sequences[:, :-1], answer_segment_ids=answers.repeat_interleave(3, dim=0), **expanded
    )
    with torch.no_grad():
        logits = model(**model_inputs, logits_to_keep=3).logits
    log_probs = logits.log_softmax(-1).gather(2, out.sequences[:, -3:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(log_probs, out.sequences_scores, atol=1e-4, rtol=0)


def test_streamer_receives_generated_tokens():
    class Collect(BaseStreamer):
        def __init__(self) -> None:
            self.chunks = []

        def put(self, value: torch.Tensor) -> None:
            self.chunks.append(value.clone())

        def end(self) -> None:
            self.chunks.append(None)

    fixture = load_fixture("small")
    inputs = {k: v[:1] for k, v in fixture_inputs(fixture).items()}
    streamer = Collect()
    config = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = fixture_model("small").generate(
        **inputs, answer_segment_ids=answer_segment_ids(fixture)[:1], generation_config=config, streamer=streamer
    )
    assert streamer.chunks[-1] is None
    assert torch.cat([c.flatten() for c in streamer.chunks[1:-1]]).tolist() == out[0, -3:].tolist()


def test_plain_input_ids_are_a_causal_lm():
    """Without structure tensors: one segment, nothing is context, positions from the attention mask."""
    model = build_model(tiny_cpmbee_config(), seed=3)
    ids = torch.randint(10, 5000, (2, 10), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 6:] = 42
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3
    # Left padding changes nothing for the real tokens.
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        c = model(input_ids=padded, attention_mask=mask).logits
    torch.testing.assert_close(c[:, 3:], a, atol=1e-5, rtol=0)
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    cached = model.generate(input_ids=padded, attention_mask=mask, generation_config=config)
    config.use_cache = False
    recomputed = model.generate(input_ids=padded, attention_mask=mask, generation_config=config)
    assert torch.equal(cached, recomputed)
    config.use_cache, config.cache_implementation = True, "static"
    assert torch.equal(model.generate(input_ids=padded, attention_mask=mask, generation_config=config), cached)


def test_attention_layout_rules():
    """Context / non-context order, in-context samples, segment relations and padding, on a hand-made batch."""
    position = torch.tensor([[0, 0, 1, 2, 3, 0]])
    context = torch.tensor([[False, True, True, True, False, False]])
    sample = torch.tensor([[0, 0, 0, 1, 0, 0]])
    segment = torch.tensor([[0, 1, 1, 0, 2, 2]])
    num_segments = torch.tensor([[0, 3, 3, 1, 3, 3]])
    offset = torch.tensor([[0, 0, 0, 9, 0, 0]])
    # Segment relations of the query sample (3 segments): 1 -> 2 is relation 7, 2 -> 1 is relation 5.
    segment_rel = torch.tensor([[0, 0, 0, 0, 0, 7, 0, 5, 0, 0]])
    valid = num_segments != 0
    buckets, mask, query_valid = cpmbee_attention_layout(
        valid,
        6,
        32,
        128,
        position_ids=position,
        context=context,
        sample_ids=sample,
        segment_ids=segment,
        num_segments=num_segments,
        segment_rel_offset=offset,
        segment_rel=segment_rel,
    )
    assert query_valid.tolist() == [[False, True, True, True, True, True]]
    assert not mask[0, 0].any()  # padding query
    assert not mask[0, :, 0].any()  # padding key
    assert mask[0, 1].tolist() == [False, True, True, True, False, False]  # context sees context only
    assert mask[0, 3].tolist() == [False, False, False, True, False, False]  # sample 1 sees sample 1
    assert mask[0, 5].tolist() == [False, True, True, True, True, True]  # non-context: context + earlier
    assert mask[0, 4].tolist() == [False, True, True, True, True, False]
    assert buckets[0, 1, 3] == 32  # other sample: relation 1 -> num_buckets
    assert buckets[0, 1, 4] == 32 + 7 - 1  # segment 1 -> 2
    assert buckets[0, 4, 2] == 32 + 5 - 1  # segment 2 -> 1
    assert buckets[0, 1, 2] == 16 + 1  # same segment, key one position later
    assert buckets[0, 2, 1] == 1  # same segment, key one position earlier


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_fp32(dtype):
    fixture = load_fixture("small")
    model = build_model(fixture["original_config"], fixture["seed"])
    inputs = fixture_inputs(fixture)
    with torch.no_grad():
        reference = model(**inputs, logits_to_keep=1).logits.float()
        low = model.to(dtype)(**inputs, logits_to_keep=1).logits.float()
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    similarity = torch.nn.functional.cosine_similarity(low.flatten(1), reference.flatten(1))
    assert similarity.min() > 0.99
    config = GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = model.generate(**inputs, answer_segment_ids=answer_segment_ids(fixture), generation_config=config)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = tiny_cpmbee_config(num_layers=3, mask_modules=[[False, False], [True, False], [False, True]])
    fixture = load_fixture("masked")
    inputs = fixture_inputs(fixture)
    grads = []
    for checkpointing in (False, True):
        model = build_model(cfg, seed=5).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        # a scalar of every logit (labels on this all-context prompt would be refused: CPM-Bee learns answers only)
        loss = model(**inputs, use_cache=False).logits.float().square().mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(model.parameters()))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_save_and_load_roundtrip(tmp_path):
    fixture = load_fixture("masked")
    model = fixture_model("masked")
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys
    assert "cpmbee.encoder.layers.1.ffn.ffn.w_in.w_0.weight" in keys
    assert "cpmbee.encoder.layers.1.self_att.self_attention.project_q.weight" not in keys
    assert "cpmbee.encoder.layers.2.ffn.layernorm_before_ffn.weight" not in keys
    loaded = CpmBeeForCausalLM.from_pretrained(tmp_path, device_map="auto")
    assert loaded.lm_head.weight is loaded.cpmbee.input_embedding.weight
    loaded_state = loaded.state_dict()  # "auto" is the GPU where there is one
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded_state[name].cpu(), tensor, atol=0, rtol=0, msg=name)
    inputs = fixture_inputs(fixture)
    with torch.no_grad():
        # Not bit-exact: MKL's summation order in the vocabulary projection depends on the weights' alignment.
        logits = loaded(**{k: v.to(loaded.device) for k, v in inputs.items()}, logits_to_keep=2).logits.cpu()
        tolerance = 1e-6 if loaded.device.type == "cpu" else ATOL
        torch.testing.assert_close(logits, model(**inputs, logits_to_keep=2).logits, atol=tolerance, rtol=tolerance)


def test_config_from_original_file_and_aliases():
    config = CpmBeeConfig.from_original_config(Path(__file__).parent / "fixtures" / "cpm-bee-10b.json")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.head_dim) == (
        4096,
        48,
        32,
        128,
    )
    assert config.intermediate_size == 10240 and config.vocab_size == VOCAB and config.tie_word_embeddings
    assert (config.pad_token_id, config.unk_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 6, 7)
    with pytest.raises(ValueError, match="Unknown keys"):
        CpmBeeConfig.from_original_config({"dim_model": 8, "bogus": 1})
    with pytest.raises(Exception, match="mask_modules"):
        CpmBeeConfig(num_layers=2, mask_modules=[[False, False]])


COMPILED_STEPS = 20


def static_greedy_decode(model: CpmBeeForCausalLM, forward, fixture: dict) -> torch.Tensor:
    """Prefill and `COMPILED_STEPS` greedy steps on a static cache, each step's inputs from
    `prepare_inputs_for_generation` (the fixed-shape per-slot structure) and run by `forward`."""
    inputs = {**fixture_inputs(fixture), "answer_segment_ids": answer_segment_ids(fixture)}
    ids = inputs.pop("input_ids")
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + COMPILED_STEPS + 2)
    for step in range(COMPILED_STEPS + 1):
        step_inputs = model.prepare_inputs_for_generation(ids, cache=cache, is_first_iteration=step == 0, **inputs)
        with torch.no_grad():
            logits = forward(**step_inputs).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_fullgraph_compile_builds_prefill_and_decoding_once():
    """`torch.compile(fullgraph=True)`: no graph break, one graph for the prefill and one for all 20 decoding steps
    (their inputs have the same shapes), and the tokens of the eager model."""
    fixture = load_fixture("small")
    model = build_model(fixture["original_config"], fixture["seed"])
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = static_greedy_decode(model, torch.compile(model, fullgraph=True, backend=counter), fixture)
    assert counter.frame_count <= 2
    eager = static_greedy_decode(model, model, fixture)
    assert torch.equal(compiled, eager)
    assert len(set(eager[0, -COMPILED_STEPS:].tolist())) > 1, "the decoded tokens vary"


def test_generate_compiles_static_cache_decoding():
    """`generate(cache_implementation="static", compile_config=...)` compiles the decoding step once (full graph) and
    returns the tokens of eager decoding."""
    fixture = load_fixture("small")
    model = build_model(fixture["original_config"], fixture["seed"])
    model.generation_config.eos_token_id = None
    inputs = {**fixture_inputs(fixture), "answer_segment_ids": answer_segment_ids(fixture)}
    settings = {"max_new_tokens": COMPILED_STEPS, "do_sample": False, "pad_token_id": 0}
    compile_config = CompileConfig(backend="aot_eager", fullgraph=True, mode=None)
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told otherwise
    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(**inputs, **settings, cache_implementation="static", compile_config=compile_config)
    assert 1 <= counters["stats"]["unique_graphs"] <= 2
    assert torch.equal(compiled, model.generate(**inputs, **settings))


def test_inductor_compiled_static_decoding_matches_eager():
    """The one inductor test (it compiles C++ kernels): a 1-layer CPM-Bee, decoding through `generate` on a static
    cache with the step compiled by the default backend, gives the tokens of eager decoding."""
    config = CpmBeeConfig(
        vocab_size=256, dim_model=32, dim_ff=64, num_layers=1, num_heads=2, dim_head=16, eos_token_id=None
    )
    config.position_bias_num_buckets = config.position_bias_num_segment_buckets = 16
    config.position_bias_max_distance = 64
    torch.manual_seed(0)
    model = CpmBeeForCausalLM(config).eval()
    input_ids = torch.randint(10, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode=None)
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(input_ids, **settings, cache_implementation="static", compile_config=compile_config)
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(compiled, model.generate(input_ids, **settings))
    assert len(set(compiled[0, 12:].tolist())) > 1
