"""The CPM-Bee converter end to end: synthetic original checkpoints in, loadable transformers folders out."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from transformers_viscpm.conversion import CheckpointError, convert_cpmbee
from transformers_viscpm.conversion.convert_cpmbee import main
from transformers_viscpm.models.cpmbee.modeling_cpmbee import CpmBeeForCausalLM
from transformers_viscpm.models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer
from transformers_viscpm.synthetic.cpmbee import original_cpmbee_state_dict, tiny_cpmbee_config

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**overrides: object) -> dict:
    return tiny_cpmbee_config(**{"dim_model": 16, "dim_ff": 32, "dim_head": 8, **overrides})


def _save(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    torch.save(state_dict, path)
    return path


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A seeded fp32 original checkpoint with plain keys, and its original config file."""
    root = tmp_path_factory.mktemp("original")
    sd = original_cpmbee_state_dict(_cfg(), seed=3)
    (root / "config.json").write_text(json.dumps(_cfg()))
    return _save(root / "cpmbee.pt", sd), root / "config.json", sd


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _assert_weights(model: CpmBeeForCausalLM, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    params = dict(model.named_parameters())
    assert len(params) == len(sd)  # the tied lm_head is not a separate parameter
    for key, value in sd.items():
        got = params["cpmbee." + key]
        assert got.dtype == dtype, key
        assert torch.equal(got, value.to(dtype)), key
    assert model.lm_head.weight.data_ptr() == model.cpmbee.input_embedding.weight.data_ptr()


def test_end_to_end_sharded_bf16(original: tuple[Path, Path, dict], tmp_path: Path) -> None:
    ckpt, config, sd = original
    out = convert_cpmbee(ckpt, config, tmp_path / "out", dtype="bfloat16", max_shard_size="2MB", show_progress=False)
    assert out == tmp_path / "out"
    files = _files(out)
    # the 86583 x 16 embedding (2.8 MB in bf16) is larger than a shard, so it gets one of its own
    shards = [f for f in files if f.endswith(".safetensors")]
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "README.md"} <= set(files)
    assert "vocab.txt" in files and "tokenizer_config.json" in files
    assert _files(tmp_path) == ["out"]  # no temporary folder left behind

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {"cpmbee." + k for k in sd}
    assert index["metadata"]["total_size"] == 2 * sum(t.numel() for t in sd.values())

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "cpmbee"
    assert config["dtype"] == "bfloat16"
    assert (config["num_layers"], config["dim_model"], config["vocab_size"]) == (2, 16, 86583)

    model = CpmBeeForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    _assert_weights(model, sd, torch.bfloat16)

    generation = GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (6, 7, 0)
    assert generation.num_beams in (None, 1) and generation.cpmbee_beam_search["num_beams"] == 3
    tokenizer = CpmBeeTokenizer.from_pretrained(out)
    assert tokenizer.vocab_size == 86583 and tokenizer.convert_tokens_to_ids("<ans>") == 9
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "$" not in card
    assert (
        "# CPM-Bee (1M)" in card
        and "`cpmbee.pt`" in card
        and f'from_pretrained("{out.name}")' in card
        and str(out) not in card
    )


def test_keeps_the_dtype_on_disk_and_reads_prefixed_layouts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sd = original_cpmbee_state_dict(_cfg(half=True), seed=5)
    assert sd["input_embedding.weight"].dtype == torch.float16
    llm = _save(tmp_path / "viscpm_llm.pt", {"llm." + k: v for k, v in sd.items()})
    remote = _save(
        tmp_path / "remote.bin",
        {**{"cpmbee." + k: v for k, v in sd.items()}, "lm_head.weight": sd["input_embedding.weight"]},
    )
    caplog.set_level("INFO", logger="transformers_viscpm.conversion.convert_cpmbee")
    for ckpt in (llm, remote):
        out = convert_cpmbee(ckpt, _cfg(), tmp_path / f"out-{ckpt.stem}", show_progress=False)
        assert _files(out).count("model.safetensors") == 1
        assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
        _assert_weights(CpmBeeForCausalLM.from_pretrained(out, dtype=torch.float16), sd, torch.float16)
    assert "not converted: lm_head.weight (the lm_head is tied to cpmbee.input_embedding.weight)" in caplog.messages


def test_directory_of_shards_and_masked_layers(tmp_path: Path) -> None:
    cfg = _cfg(num_layers=3, mask_modules=[[False, False], [True, False], [False, True]])
    sd = original_cpmbee_state_dict(cfg, seed=7)
    assert "encoder.layers.1.self_att.self_attention.project_q.weight" not in sd
    keys = list(sd)
    src = tmp_path / "src"
    src.mkdir()
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in halves.items():
        torch.save({k: sd[k] for k in part}, src / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = convert_cpmbee(src, cfg, tmp_path / "out", dtype=torch.float32, show_progress=False)
    _assert_weights(CpmBeeForCausalLM.from_pretrained(out), sd, torch.float32)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"unet.conv_in.weight": torch.zeros(2)}, r"VisCPM-Paint checkpoint \(it has unet.\* keys\), not a CPM-Bee"),
        (
            {"vpm.beit3.text_embed.weight": torch.zeros(2), "query": torch.zeros(2)},
            r"VisCPM-Chat checkpoint \(it has query, vpm.\* keys\).*convert it with `viscpm convert chat`",
        ),
    ],
)
def test_viscpm_checkpoints_are_refused(tmp_path: Path, extra: dict, message: str) -> None:
    sd = {"llm." + k: v for k, v in original_cpmbee_state_dict(_cfg(), seed=0).items()}
    ckpt = _save(tmp_path / "viscpm.pt", {**sd, **extra})
    with pytest.raises(CheckpointError, match=message):
        convert_cpmbee(ckpt, _cfg(), tmp_path / "out", show_progress=False)
    assert _files(tmp_path) == ["viscpm.pt"]


def _broken(sd: dict[str, torch.Tensor], change: str) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    if change == "missing":
        del sd["encoder.layers.1.ffn.ffn.w_out.weight"]
    elif change == "unexpected":
        sd["encoder.layers.0.self_att.self_attention.project_o.weight"] = torch.zeros(16, 16)
    elif change == "shape":
        sd["encoder.layers.0.ffn.ffn.w_in.w_0.weight"] = torch.zeros(33, 16)
    elif change == "dtype":
        sd["encoder.output_layernorm.weight"] = torch.ones(16, dtype=torch.int32)
    elif change == "mixed":
        sd["encoder.output_layernorm.weight"] = sd["encoder.output_layernorm.weight"].half()
    return sd


@pytest.mark.parametrize(
    ("change", "config", "message"),
    [
        ("missing", {}, r"missing keys \(named as in the converted model\): cpmbee.encoder.layers.1.ffn.ffn.w_out"),
        ("unexpected", {}, r"unexpected keys: encoder.layers.0.self_att.self_attention.project_o.weight"),
        (
            "shape",
            {},
            r"shape mismatches: 'encoder.layers.0.ffn.ffn.w_in.w_0.weight' is \[33, 16\], expected \[32, 16\]",
        ),
        ("dtype", {}, r"key 'encoder.output_layernorm.weight' is stored as torch.int32"),
        ("mixed", {}, r"mixes torch.float16, torch.float32; choose the output dtype explicitly"),
        (None, {"num_layers": 4}, r"the checkpoint has 2 layers but the config has num_layers=4"),
        (None, {"vocab_size": 1000}, r"'input_embedding.weight' has 86583 rows but the config has vocab_size=1000"),
        (
            None,
            {"dim_ff": 64},
            r"shape mismatches: 'encoder.layers.0.ffn.ffn.w_in.w_0.weight' is \[32, 16\], expected",
        ),
        (
            None,
            {"num_layers": 2, "mask_modules": [[False, False], [True, False]]},
            r"unexpected keys: encoder.layers.1",
        ),
    ],
)
def test_bad_checkpoints_raise_one_clear_error(
    original: tuple[Path, Path, dict], tmp_path: Path, change: str | None, config: dict, message: str
) -> None:
    ckpt = _save(tmp_path / "bad.pt", _broken(original[2], change)) if change else original[0]
    with pytest.raises(CheckpointError, match=message):
        convert_cpmbee(ckpt, _cfg(**config), tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_output_and_interruption(original: tuple[Path, Path, dict], tmp_path: Path, monkeypatch) -> None:
    ckpt, config, sd = original
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite"):
        convert_cpmbee(ckpt, config, out, show_progress=False)
    assert _files(out) == ["mine.txt"]

    module = importlib.import_module("transformers_viscpm.conversion.convert_cpmbee")

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "write_model_card", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_cpmbee(ckpt, config, out, overwrite=True, show_progress=False)
    assert _files(tmp_path) == ["out"] and _files(out) == ["mine.txt"]
    monkeypatch.undo()

    convert_cpmbee(ckpt, config, out, overwrite=True, show_progress=False)
    assert "mine.txt" not in _files(out) and "model.safetensors" in _files(out)
    assert _files(tmp_path) == ["out"]


def test_push_to_hub_uploads_exactly_the_output(
    original: tuple[Path, Path, dict], tmp_path: Path, monkeypatch
) -> None:
    import huggingface_hub

    calls: list[tuple] = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id, kw)))

    def upload_folder(*, repo_id: str, folder_path: str, commit_message: str, repo_type: str) -> str:
        calls.append(
            ("upload", repo_id, folder_path, sorted(p.name for p in Path(folder_path).iterdir()), commit_message)
        )
        return "https://hub/commit"

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    ckpt, config, _ = original
    assert main(["--checkpoint", str(ckpt), "--config", str(config), "--output", str(tmp_path / "out"), "--quiet",
                 "--push-to-hub", "me/cpm-bee-tiny", "--private"]) == 0  # fmt: skip
    create, upload = calls
    assert create == ("create", "me/cpm-bee-tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert upload[1:3] == ("me/cpm-bee-tiny", str(tmp_path / "out"))
    assert upload[3] == _files(tmp_path / "out")
    assert "model.safetensors" in upload[3] and "config.json" in upload[3]
    assert upload[4] == "Add CPM-Bee converted from cpmbee.pt (transformers-viscpm 0.1.0)"


def test_cli_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "c.json").write_text(json.dumps(_cfg()))
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    assert main(["--checkpoint", str(tmp_path / "x.pt"), "--config", str(tmp_path / "c.json"),
                 "--output", str(tmp_path / "o")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("viscpm convert cpmbee: error: ") and "x.pt: not a torch.save zip archive" in err
    assert err.count("\n") == 1  # one line
    assert not (tmp_path / "o").exists()
    torch.save(original_cpmbee_state_dict(_cfg(), seed=0), tmp_path / "x.pt")
    assert main(["--checkpoint", str(tmp_path / "x.pt"), "--config", str(tmp_path / "c.json"),
                 "--output", str(tmp_path / "o"), "--max-shard-size", "lots"]) == 2  # fmt: skip
    assert "cannot read the size 'lots'" in capsys.readouterr().err
    assert _files(tmp_path) == ["c.json", "x.pt"]
    with pytest.raises(SystemExit):
        main(["--checkpoint", "a", "--config", "b", "--output", "c", "--private"])
    assert "--private needs --push-to-hub" in capsys.readouterr().err


def test_script_wrapper_help() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "conversion" / "convert_cpmbee.py"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: viscpm convert cpmbee ")
    for option in ("--checkpoint", "--config", "--output", "--dtype", "--max-shard-size", "--push-to-hub"):
        assert option in result.stdout
    assert "--no-remote-code" in result.stdout and "--allow-non-finite" in result.stdout
