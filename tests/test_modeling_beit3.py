"""The BEiT-3 vision tower against golden outputs of the original (VisCPM BEiT3Wrapper on torchscale 0.2.0).

Fixtures: tests/fixtures/beit3_*.json, recorded by tests/fixtures/record/record_beit3.py from seeded weights that
`transformers_viscpm.synthetic.beit3` rebuilds exactly (checked here through per-parameter checksums).
"""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from transformers_viscpm.models.viscpm_chat.configuration_viscpm_chat import VisCPMChatVisionConfig
from transformers_viscpm.models.viscpm_chat.modeling_beit3 import VisCPMChatVisionModel
from transformers_viscpm.synthetic.beit3 import beit3_original_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
CASES = ["beit3_tiny_224", "beit3_small_32"]
ORIGINAL_PREFIX = "vpm.beit3."
UNUSED_KEYS = {"vpm.beit3.text_embed.weight", "vpm.beit3.vision_embed.mask_token"}
TOLERANCE = 1e-4


def load_case(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def config_for(case: dict) -> VisCPMChatVisionConfig:
    return VisCPMChatVisionConfig(
        image_size=case["image_size"],
        patch_size=case["patch_size"],
        hidden_size=case["hidden_size"],
        num_attention_heads=case["num_attention_heads"],
        intermediate_size=case["intermediate_size"],
        num_hidden_layers=case["num_hidden_layers"],
        max_text_positions=case["max_text_positions"],
    )


def converted(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint key map: drop what inference never reads, strip the `vpm.beit3.` prefix."""
    return {
        key.removeprefix(ORIGINAL_PREFIX): value
        for key, value in state_dict.items()
        if key.startswith(ORIGINAL_PREFIX) and key not in UNUSED_KEYS
    }


def build_model(case: dict, attn_implementation: str = "eager") -> VisCPMChatVisionModel:
    config = config_for(case)
    original = beit3_original_state_dict(
        config, seed=case["seed"], std=case["std"], text_vocab_size=case["text_vocab_size"], include_mim_head=False
    )
    model = VisCPMChatVisionModel._from_config(config, attn_implementation=attn_implementation)
    model.load_state_dict(converted(original), strict=True)
    return model.eval()


def make_inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Same draws as `make_inputs` in the recorder."""
    g = torch.Generator().manual_seed(case["seed"] + 1)
    pixel_values = torch.randn(case["batch_size"], 3, case["image_size"], case["image_size"], generator=g)
    query = 0.5 * torch.randn(case["num_queries"], case["hidden_size"], generator=g)
    return pixel_values, query


@pytest.mark.parametrize("name", CASES)
def test_synthetic_builder_reproduces_original_weights(name):
    golden = load_case(name)
    case = golden["case"]
    state_dict = beit3_original_state_dict(
        config_for(case), seed=case["seed"], std=case["std"], text_vocab_size=case["text_vocab_size"], prefix=""
    )
    assert list(state_dict) == list(golden["param_checksums"])
    for key, (total, abs_total) in golden["param_checksums"].items():
        value = state_dict[key].double()
        assert value.sum().item() == pytest.approx(total, rel=1e-9, abs=1e-9), key
        assert value.abs().sum().item() == pytest.approx(abs_total, rel=1e-9), key


def test_builder_skipping_mim_head_or_continuing_a_generator():
    case = load_case("beit3_small_32")["case"]
    config = config_for(case)
    full = beit3_original_state_dict(config, seed=3, text_vocab_size=10)
    without_head = beit3_original_state_dict(config, seed=3, text_vocab_size=10, include_mim_head=False)
    assert set(full) - set(without_head) == {"vpm.mim_head.weight", "vpm.mim_head.bias"}
    assert all(torch.equal(full[k], v) for k, v in without_head.items())

    g = torch.Generator().manual_seed(3)
    first = torch.randn(4, generator=g)
    continued = beit3_original_state_dict(config, generator=g, text_vocab_size=10, include_mim_head=False)
    g2 = torch.Generator().manual_seed(3)
    assert torch.equal(first, torch.randn(4, generator=g2))
    assert torch.equal(continued["vpm.beit3.text_embed.weight"], 0.2 * torch.randn(10, 48, generator=g2))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", CASES)
def test_query_outputs_match_original(name, attn_implementation):
    golden = load_case(name)
    case = golden["case"]
    model = build_model(case, attn_implementation)
    assert model.config._attn_implementation == attn_implementation
    assert model.config.num_image_tokens == golden["num_image_tokens"]
    pixel_values, query = make_inputs(case)
    with torch.no_grad():
        out = model(pixel_values, query).last_hidden_state

    assert list(out.shape) == golden["output_shape"]
    sample0 = torch.tensor(golden["output_sample0"])
    assert (out[0, : sample0.shape[0]] - sample0).abs().max().item() <= TOLERANCE
    assert (out[:, -1] - torch.tensor(golden["output_last_rows"])).abs().max().item() <= TOLERANCE
    per_sample = out.double().sum(dim=(1, 2))
    assert per_sample.tolist() == pytest.approx(golden["output_per_sample_sum"], abs=1e-3)
    assert out.double().abs().sum().item() == pytest.approx(golden["output_abs_sum"], rel=1e-5)


def test_checkpoint_keys_are_a_prefix_swap():
    case = load_case("beit3_tiny_224")["case"]
    config = config_for(case)
    original = beit3_original_state_dict(config, text_vocab_size=case["text_vocab_size"])
    ours = VisCPMChatVisionModel(config).state_dict()
    assert set(converted(original)) == set(ours)
    dropped = set(original) - {ORIGINAL_PREFIX + key for key in ours}
    assert dropped == UNUSED_KEYS | {"vpm.mim_head.weight", "vpm.mim_head.bias"}
    assert ours["encoder.embed_positions.A.weight"].shape == (199, case["hidden_size"])


def test_eager_and_sdpa_agree_and_batch_is_independent():
    case = load_case("beit3_small_32")["case"]
    eager, sdpa = build_model(case, "eager"), build_model(case, "sdpa")
    pixel_values, query = make_inputs(case)
    with torch.no_grad():
        out_eager = eager(pixel_values, query).last_hidden_state
        out_sdpa = sdpa(pixel_values, query).last_hidden_state
        single = eager(pixel_values[1:2], query).last_hidden_state
        per_sample_queries = eager(pixel_values, query.expand(case["batch_size"], -1, -1)).last_hidden_state
    assert (out_eager - out_sdpa).abs().max().item() <= 1e-5
    assert (single[0] - out_eager[1]).abs().max().item() <= 1e-5
    assert torch.equal(per_sample_queries, out_eager)


def test_hidden_states_and_attentions_cover_the_whole_sequence():
    case = load_case("beit3_small_32")["case"]
    model = build_model(case, "eager")
    pixel_values, query = make_inputs(case)
    with torch.no_grad():
        out = model(pixel_values, query, output_hidden_states=True, output_attentions=True)
    seq_len = model.config.num_image_tokens + case["num_queries"]
    assert len(out.hidden_states) == case["num_hidden_layers"] + 1
    assert out.hidden_states[0].shape == (case["batch_size"], seq_len, case["hidden_size"])
    assert len(out.attentions) == case["num_hidden_layers"]
    attn = out.attentions[0]
    assert attn.shape == (case["batch_size"], case["num_attention_heads"], seq_len, seq_len)
    assert torch.allclose(attn.sum(-1), torch.ones(()), atol=1e-5)
    # The final multiway layer norm is not a layer: the last hidden state is the un-normed query stream.
    assert not torch.allclose(out.hidden_states[-1][:, model.config.num_image_tokens :], out.last_hidden_state)


def test_bfloat16_model_accepts_float32_inputs():
    case = load_case("beit3_small_32")["case"]
    model = build_model(case)
    pixel_values, query = make_inputs(case)
    with torch.no_grad():
        reference = model(pixel_values, query).last_hidden_state
        low = model.to(torch.bfloat16)(pixel_values, query).last_hidden_state
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max().item() < 0.1


def test_save_and_reload(tmp_path):
    case = load_case("beit3_small_32")["case"]
    model = build_model(case)
    model.save_pretrained(tmp_path)
    reloaded = VisCPMChatVisionModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    for field in ("hidden_size", "num_hidden_layers", "image_size", "patch_size", "max_text_positions"):
        assert getattr(reloaded.config, field) == getattr(model.config, field)
    pixel_values, query = make_inputs(case)
    with torch.no_grad():
        assert torch.equal(
            reloaded(pixel_values, query).last_hidden_state, model(pixel_values, query).last_hidden_state
        )


def test_bad_inputs_raise_value_error():
    case = load_case("beit3_small_32")["case"]
    model = build_model(case)
    pixel_values, query = make_inputs(case)
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(pixel_values[..., :16, :16], query)
    with pytest.raises(ValueError, match="query_embeds must be"):
        model(pixel_values, query[:, :8])
    with pytest.raises(ValueError, match="text positions"):
        model(pixel_values, torch.zeros(case["max_text_positions"] - 1, case["hidden_size"]))


def test_config_defaults_are_viscpm_beit3_large():
    config = VisCPMChatVisionConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1024, 24, 16)
    assert (config.intermediate_size, config.image_size, config.patch_size) == (4096, 224, 16)
    assert (config.layer_norm_eps, config.max_text_positions, config.hidden_act) == (1e-5, 1024, "gelu")
    assert config.num_image_tokens == 197
    with pytest.raises(StrictDataclassClassValidationError, match="multiple of num_attention_heads"):
        VisCPMChatVisionConfig(hidden_size=100, num_attention_heads=16)
    with pytest.raises(StrictDataclassClassValidationError, match="multiple of patch_size"):
        VisCPMChatVisionConfig(image_size=100, patch_size=16)
