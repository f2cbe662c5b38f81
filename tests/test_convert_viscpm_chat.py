"""convert_viscpm_chat: original VLU_CPMBee state dict -> transformers folder."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from transformers_viscpm.conversion._io import CheckpointError
from transformers_viscpm.conversion.convert_viscpm_chat import (
    VISCPM_CHAT_KEY_TABLE,
    convert_viscpm_chat,
    main,
)
from transformers_viscpm.models.viscpm_chat.modeling_viscpm_chat import VisCPMChatForConditionalGeneration
from transformers_viscpm.synthetic.chat import TINY_CHAT_VISION, original_chat_state_dict, tiny_chat_llm_config

DROPPED = [
    "vpm.beit3.text_embed.weight",
    "vpm.beit3.vision_embed.mask_token",
    "vpm.mim_head.bias",
    "vpm.mim_head.weight",
]


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return original_chat_state_dict()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, state_dict) -> Path:
    path = tmp_path_factory.mktemp("original") / "viscpm_chat_balance_checkpoint.pt"
    torch.save(state_dict, path)
    return path


def _convert(checkpoint, output, **kwargs):
    kwargs.setdefault("llm_config", tiny_chat_llm_config())
    kwargs.setdefault("vision_config", TINY_CHAT_VISION)
    return convert_viscpm_chat(checkpoint, output, show_progress=False, **kwargs)


def _saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def test_output_folder(checkpoint, state_dict, tmp_path):
    out = _convert(checkpoint, tmp_path / "out")
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "processor_config.json",
        "chat_template.jinja",
        "tokenizer_config.json",
        "vocab.txt",
        "README.md",
    } <= names

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "viscpm_chat" and config["query_num"] == 64
    assert config["text_config"]["dim_model"] == 64 and config["vision_config"]["hidden_size"] == 64
    generation = json.loads((out / "generation_config.json").read_text())
    # chat() decodes with the original's settings, kept in their own field; plain generate() stays greedy.
    assert generation["cpmbee_beam_search"] == {
        "num_beams": 3,
        "max_new_tokens": 512,
        "repetition_penalty": 1.1,
        "repetition_window": None,
        "length_penalty": 3.0,
        "temperature": 0.7,
    }
    assert not {"num_beams", "max_new_tokens", "temperature", "do_sample"} & set(generation)

    card = (out / "README.md").read_text(encoding="utf-8")
    assert "VisCPM-Chat (balance)" in card and "pipeline_tag: image-text-to-text" in card

    saved = _saved_tensors(out)
    assert torch.equal(saved["model.query"], state_dict["query"])
    assert torch.equal(saved["model.mapping.2.bias"], state_dict["mapping.2.bias"])
    assert torch.equal(
        saved["model.vision_model.encoder.layers.1.ffn.B.fc2.weight"],
        state_dict["vpm.beit3.encoder.layers.1.ffn.B.fc2.weight"],
    )
    assert torch.equal(saved["model.language_model.input_embedding.weight"], state_dict["llm.input_embedding.weight"])
    assert not any("lm_head" in name for name in saved)
    assert len(saved) == len(state_dict) - len(DROPPED)

    model = VisCPMChatForConditionalGeneration.from_pretrained(out)
    assert torch.equal(model.model.query, state_dict["query"])


def test_key_table_drops_exactly_the_unused_tensors(state_dict):
    from transformers_viscpm.conversion._io import map_keys

    mapping = map_keys(state_dict, VISCPM_CHAT_KEY_TABLE)
    assert sorted(mapping.dropped) == DROPPED
    assert mapping.unexpected == []
    assert mapping.target_to_source["model.mapping.0.weight"] == "mapping.0.weight"
    assert mapping.target_to_source["model.language_model.encoder.output_layernorm.weight"] == (
        "llm.encoder.output_layernorm.weight"
    )


def test_dtype_and_shards(checkpoint, tmp_path):
    out = _convert(checkpoint, tmp_path / "bf16", dtype="bfloat16", max_shard_size="4MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    saved = _saved_tensors(out)
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = VisCPMChatForConditionalGeneration.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_wrong_shapes_and_wrong_kinds(checkpoint, state_dict, tmp_path):
    with pytest.raises(CheckpointError, match="does not match the configuration"):
        _convert(checkpoint, tmp_path / "a", vision_config={**TINY_CHAT_VISION, "num_hidden_layers": 3})
    with pytest.raises(CheckpointError, match="does not match the configuration"):
        _convert(checkpoint, tmp_path / "b", llm_config=tiny_chat_llm_config(dim_model=32))

    llm_only = tmp_path / "cpmbee.pt"
    torch.save({k: v for k, v in state_dict.items() if k.startswith("llm.")}, llm_only)
    with pytest.raises(CheckpointError, match="not a VisCPM-Chat checkpoint"):
        _convert(llm_only, tmp_path / "c")

    paint = tmp_path / "paint.pt"
    torch.save(
        {"llm.input_embedding.weight": torch.zeros(2, 2), "trans_block.layernorm.weight": torch.zeros(2)}, paint
    )
    with pytest.raises(CheckpointError, match="VisCPM-Paint checkpoint"):
        _convert(paint, tmp_path / "d")
    assert not any(p.name in "abcd" for p in tmp_path.iterdir())


def test_cli(checkpoint, tmp_path, capsys):
    llm_config = tmp_path / "cpm-bee-tiny.json"
    llm_config.write_text(json.dumps(tiny_chat_llm_config()))
    args = ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "cli"), "--llm-config", str(llm_config)]
    args += ["--vision-config", json.dumps(TINY_CHAT_VISION), "--quiet"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main([*args[:-3], "--vision-config", '{"hidden_size": 65}', "--overwrite", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("viscpm convert chat: error: ") and err.count("\n") == 1 and "hidden_size" in err
