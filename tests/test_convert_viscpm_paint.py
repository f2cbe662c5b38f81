"""The VisCPM-Paint converter end to end: a tiny original checkpoint and SD base in, a diffusers repo out.

The converted repo is checked against the images recorded from the original (tests/fixtures/paint_golden.json, the
same fixture as tests/test_pipeline_viscpm_paint.py) and tensor by tensor against the original state dict.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_pipeline_viscpm_paint import draws_match_float32, generate_case

import transformers_viscpm  # noqa: F401  (registers the pipeline with diffusers)
from transformers_viscpm.conversion import CheckpointError, verify_checksums
from transformers_viscpm.conversion.convert_viscpm_paint import convert_viscpm_paint, main
from transformers_viscpm.models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer
from transformers_viscpm.pipelines.viscpm_paint import VisCPMPaintPipeline, VisCPMPaintTextEncoder
from transformers_viscpm.synthetic.paint import (
    TINY_PAINT_CPMBEE,
    original_paint_state_dict,
    tiny_paint_vae,
    write_sd_base,
)

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "fixtures" / "paint_golden.json").read_text())
CASES = {case["name"]: case for case in GOLDEN["cases"]}
TOLERANCE = 1e-3  # max abs on [0, 1] images, fp32 (as the pipeline's parity test)


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, dict[str, torch.Tensor]]:
    """The tiny original checkpoint (named like a release), its tiny SD base, its CPM-Bee config and state dict."""
    root = tmp_path_factory.mktemp("originals")
    sd = original_paint_state_dict()
    torch.save(sd, root / "viscpm_paint_balance_checkpoint.pt")
    write_sd_base(root / "sd-base")
    (root / "llm.json").write_text(json.dumps(TINY_PAINT_CPMBEE))
    return root / "viscpm_paint_balance_checkpoint.pt", root / "sd-base", root / "llm.json", sd


@pytest.fixture(scope="module")
def converted(originals: tuple, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt, sd_base, llm, _ = originals
    out = tmp_path_factory.mktemp("converted") / "repo"
    assert convert_viscpm_paint(ckpt, sd_base, out, llm_config=llm, show_progress=False) == out
    return out


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def _assert_weights(out: Path, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Every original tensor lands, cast to ``dtype``, under its converted name; the VAE is the base's."""
    text_encoder, unet = _read_tensors(out / "text_encoder"), _read_tensors(out / "unet")
    expected_text = {("cpmbee." + k[4:] if k.startswith("llm.") else k): v for k, v in sd.items() if k[:5] != "unet."}
    expected_unet = {k[5:]: v for k, v in sd.items() if k.startswith("unet.")}
    vae = tiny_paint_vae().state_dict()
    for got, expected in ((text_encoder, expected_text), (unet, expected_unet), (_read_tensors(out / "vae"), vae)):
        assert set(got) == set(expected)
        for name, value in expected.items():
            assert got[name].dtype == dtype and torch.equal(got[name], value.to(dtype)), name


# --- the converted repository ---------------------------------------------------------------------------------


def test_layout_configs_and_card(converted: Path, originals: tuple) -> None:
    assert _files(converted) == [
        "README.md",
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ]
    # each component's index records its shard checksums
    assert _files(converted / "text_encoder") == ["config.json", "model.safetensors", "model.safetensors.index.json"]
    for component in ("unet", "vae"):
        assert _files(converted / component) == [
            "config.json",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.safetensors.index.json",
        ]
    assert [p.relative_to(converted).parts[0] for p in verify_checksums(converted)] == ["text_encoder", "unet", "vae"]
    assert _files(converted.parent) == ["repo"]  # no temporary folder left behind
    index = json.loads((converted / "model_index.json").read_text())
    assert index["_class_name"] == "VisCPMPaintPipeline"
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"][1] == "VisCPMPaintTextEncoder" and index["tokenizer"][1] == "CpmBeeTokenizer"
    assert index["safety_checker"] == [None, None] and index["reranker"] == [None, None]

    text_config = json.loads((converted / "text_encoder" / "config.json").read_text())
    assert text_config["projection_dim"] == 32 and text_config["dtype"] == "float32"
    assert {k: text_config["cpmbee_config"][k] for k in ("dim_model", "num_layers", "vocab_size")} == {
        "dim_model": 64,
        "num_layers": 2,
        "vocab_size": 86583,
    }
    assert json.loads((converted / "unet" / "config.json").read_text())["cross_attention_dim"] == 32
    # The scheduler the original samples with, read from the base's (PNDM) config.
    scheduler = json.loads((converted / "scheduler" / "scheduler_config.json").read_text())
    base = json.loads((originals[1] / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDPMScheduler" and base["_class_name"] == "PNDMScheduler"
    ours = DDPMScheduler.from_pretrained(converted / "scheduler").config
    original = DDPMScheduler.from_pretrained(originals[1], subfolder="scheduler").config
    assert {k: v for k, v in ours.items() if k[0] != "_"} == {k: v for k, v in original.items() if k[0] != "_"}
    assert CpmBeeTokenizer.from_pretrained(converted / "tokenizer").vocab_size == 86583

    card = (converted / "README.md").read_text()
    assert card.startswith("---\n") and "${" not in card
    assert "# VisCPM-Paint (balance)" in card and "balanced Chinese and English ability" in card
    assert "`viscpm_paint_balance_checkpoint.pt`" in card and f'from_pretrained("{converted.name}")' in card
    assert "num_inference_steps=50, height=32, width=32" in card  # the tiny UNet draws 32x32


def test_weights_are_the_original_tensors(converted: Path, originals: tuple) -> None:
    _assert_weights(converted, originals[3], torch.float32)


def test_images_match_the_original(converted: Path) -> None:
    pipe = VisCPMPaintPipeline.from_pretrained(converted)
    assert isinstance(pipe.text_encoder, VisCPMPaintTextEncoder) and isinstance(pipe.scheduler, DDPMScheduler)
    assert isinstance(pipe.tokenizer, CpmBeeTokenizer)
    for name, case in CASES.items():
        images = generate_case(pipe, case)
        assert images.shape == (case["num_images_per_prompt"], 32, 32, 3), name
        assert float(np.abs(images - np.asarray(case["images"])).max()) <= TOLERANCE, name
    # The generic loader resolves the same pipeline from model_index.json.
    generic = DiffusionPipeline.from_pretrained(converted)
    assert type(generic) is VisCPMPaintPipeline
    case = CASES["en_negative_two_images"]
    assert np.array_equal(generate_case(generic, case), generate_case(pipe, case))


# --- dtypes and sharding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("disk_dtype", "requested", "expected"),
    [
        (torch.float32, "bfloat16", torch.bfloat16),
        (torch.float32, "float16", torch.float16),
        (torch.float16, None, torch.float16),  # keeps the dtype on disk; the VAE follows
    ],
)
def test_dtypes_and_sharding(
    originals: tuple, tmp_path: Path, disk_dtype: torch.dtype, requested: str | None, expected: torch.dtype
) -> None:
    _, sd_base, llm, sd = originals
    sd = {k: v.to(disk_dtype) for k, v in sd.items()}
    ckpt = tmp_path / "viscpm_paint_zhplus_checkpoint.pt"
    torch.save(sd, ckpt)
    out = convert_viscpm_paint(
        ckpt, sd_base, tmp_path / "out", llm_config=llm, dtype=requested, max_shard_size="1MB", show_progress=False
    )
    # The 86583 x 64 embedding (11 MB in 16 bits) gets a shard of its own; the rest is split at 1 MB.
    text_files = _files(out / "text_encoder")
    assert "model.safetensors.index.json" in text_files
    assert len([f for f in text_files if f.endswith(".safetensors")]) >= 2
    unet_index = json.loads((out / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    unet_shards = sorted(set(unet_index["weight_map"].values()))
    assert len(unet_shards) >= 2 and unet_shards[0].startswith("diffusion_pytorch_model-00001-of-")
    assert set(unet_index["weight_map"]) == {k[5:] for k in sd if k.startswith("unet.")}
    assert json.loads((out / "text_encoder" / "config.json").read_text())["dtype"] == str(expected)[6:]
    _assert_weights(out, sd, expected)

    pipe = VisCPMPaintPipeline.from_pretrained(out, dtype=expected)
    assert {pipe.text_encoder.dtype, pipe.unet.dtype, pipe.vae.dtype} == {expected}
    images = generate_case(pipe, CASES["zh_cfg"])
    assert np.isfinite(images).all()
    if draws_match_float32(expected):  # else a 16-bit pipeline denoises other noise than the original's fp32 one
        assert float(np.abs(images - np.asarray(CASES["zh_cfg"]["images"])).max()) < 0.1
    assert "zhplus" in (out / "README.md").read_text()


# --- errors ------------------------------------------------------------------------------------------------------


def _changed(sd: dict[str, torch.Tensor], change: str) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    if change == "missing":
        del sd["unet.conv_in.bias"]
    elif change == "unexpected":
        sd["trans_block.extra.weight"] = torch.zeros(2)
    elif change == "shape":
        sd["unet.conv_out.weight"] = torch.zeros(4, 32, 1, 1)
    elif change == "no_projection":
        del sd["trans_block.w_out_res.weight"]
    elif change == "mixed":
        sd["trans_block.layernorm.bias"] = sd["trans_block.layernorm.bias"].half()
    elif change == "chat":
        sd = {k: v for k, v in sd.items() if k.startswith("llm.")}
        sd.update({"query": torch.zeros(4, 8), "mapping.0.weight": torch.zeros(8, 8)})
    elif change == "cpmbee":
        sd = {k: v for k, v in sd.items() if k.startswith("llm.")}
    return sd


@pytest.mark.parametrize(
    ("change", "llm", "message"),
    [
        (
            "missing",
            True,
            r"\(unet.\* against .*unet\).*missing keys \(named as in the converted model\): conv_in.bias",
        ),
        ("unexpected", True, r"\(llm.\*, trans_block.\*\).*unexpected keys: trans_block.extra.weight"),
        ("shape", True, r"shape mismatches: 'unet.conv_out.weight' is \[4, 32, 1, 1\], expected \[4, 32, 3, 3\]"),
        ("no_projection", True, r"has no 'trans_block.w_out_res.weight'"),
        ("mixed", True, r"mixes torch.float16, torch.float32; choose the output dtype explicitly"),
        ("chat", True, r"this is a VisCPM-Chat checkpoint \(it has mapping.\*, query keys\).*`viscpm convert chat`"),
        (
            "cpmbee",
            True,
            r"not a VisCPM-Paint checkpoint \(a plain CPM-Bee one converts with `viscpm convert cpmbee`\)",
        ),
        (None, False, r"default 10B CPM-Bee config\): the checkpoint has 2 layers but the config has num_layers=48"),
        (None, {"dim_ff": 96}, r"shape mismatches: 'llm.encoder.layers.0.ffn.ffn.w_in.w_0.weight' is \[128, 64\]"),
    ],
)
def test_bad_checkpoints_raise_one_clear_error(
    originals: tuple, tmp_path: Path, change: str | None, llm: bool | dict, message: str
) -> None:
    ckpt, sd_base, llm_json, sd = originals
    if change is not None:
        ckpt = tmp_path / "bad.pt"
        torch.save(_changed(sd, change), ckpt)
    llm_config = {**TINY_PAINT_CPMBEE, **llm} if isinstance(llm, dict) else llm_json if llm else None
    with pytest.raises(CheckpointError, match=message):
        convert_viscpm_paint(ckpt, sd_base, tmp_path / "out", llm_config=llm_config, show_progress=False)
    assert not (tmp_path / "out").exists()


def _break_base(base: Path, change: str) -> None:
    def edit(config: Path, **values: object) -> None:
        config.write_text(json.dumps({**json.loads(config.read_text()), **values}))

    if change == "no_vae":
        shutil.rmtree(base / "vae")
    elif change == "no_vae_weights":
        (base / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    elif change == "vae_missing_key":
        weights = base / "vae" / "diffusion_pytorch_model.safetensors"
        save_file({k: v for k, v in load_file(weights).items() if k != "decoder.conv_out.bias"}, weights)
    elif change == "vae_truncated":
        weights = base / "vae" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    elif change == "no_unet_config":
        (base / "unet" / "config.json").unlink()
    elif change == "no_scheduler":
        shutil.rmtree(base / "scheduler")
    elif change == "cross_attention":
        edit(base / "unet" / "config.json", cross_attention_dim=48)
    elif change == "latent_channels":
        edit(base / "vae" / "config.json", latent_channels=8)
    elif change == "unet_class":
        edit(base / "unet" / "config.json", _class_name="UNet2DModel")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no_vae", r"sd-base/vae/config.json: missing; the SD base must be a stabilityai/stable-diffusion-2-1-base"),
        ("no_vae_weights", r"sd-base/vae: holds no VAE weights \(diffusion_pytorch_model.safetensors or .*\.bin\)"),
        (
            "vae_missing_key",
            r"vae/diffusion_pytorch_model.safetensors \(the SD base's VAE\).*missing keys .*: decoder.conv_out.bias",
        ),
        ("vae_truncated", r"vae/diffusion_pytorch_model.safetensors: not a valid safetensors file \(entry "),
        ("no_unet_config", r"sd-base/unet/config.json: missing"),
        ("no_scheduler", r"sd-base/scheduler/scheduler_config.json: missing"),
        (
            "cross_attention",
            r"unet/config.json: cross_attention_dim is 48, but bad.pt's trans_block.w_out_res.weight projects to 32",
        ),
        ("latent_channels", r"unet/config.json: in_channels is 4, but the VAE in .*vae has latent_channels=8"),
        ("unet_class", r"unet/config.json: describes a UNet2DModel, expected a UNet2DConditionModel"),
        ("no_base", r"sd-base: no such SD base folder"),
    ],
)
def test_bad_sd_base_raises_one_clear_error(originals: tuple, tmp_path: Path, change: str, message: str) -> None:
    ckpt, sd_base, llm, _ = originals
    shutil.copy(ckpt, tmp_path / "bad.pt")
    base = tmp_path / "sd-base"
    if change != "no_base":
        shutil.copytree(sd_base, base)
        _break_base(base, change)
    with pytest.raises(CheckpointError, match=message):
        convert_viscpm_paint(tmp_path / "bad.pt", base, tmp_path / "out", llm_config=llm, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_vae_in_the_legacy_layout(originals: tuple, tmp_path: Path) -> None:
    """A VAE saved as .bin with the old attention names (query/key/value/proj_attn) converts as diffusers loads it."""
    ckpt, sd_base, llm, sd = originals
    base = tmp_path / "sd-base"
    shutil.copytree(sd_base, base)
    weights = base / "vae" / "diffusion_pytorch_model.safetensors"
    new_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for name, value in load_file(weights).items():
        for new, old in new_names.items():
            name = name.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[name] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    torch.save(legacy, base / "vae" / "diffusion_pytorch_model.bin")
    weights.unlink()
    out = convert_viscpm_paint(ckpt, base, tmp_path / "out", llm_config=llm, show_progress=False)
    _assert_weights(out, sd, torch.float32)


# --- output folder, hub, command line ------------------------------------------------------------------------------


def test_existing_output_and_interruption(originals: tuple, tmp_path: Path, monkeypatch) -> None:
    ckpt, sd_base, llm, _ = originals
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite"):
        convert_viscpm_paint(ckpt, sd_base, out, llm_config=llm, show_progress=False)
    assert _files(out) == ["mine.txt"]

    module = importlib.import_module("transformers_viscpm.conversion.convert_viscpm_paint")

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "write_model_card", interrupted)  # after every weight is written
    with pytest.raises(KeyboardInterrupt):
        convert_viscpm_paint(ckpt, sd_base, out, llm_config=llm, overwrite=True, show_progress=False)
    assert _files(tmp_path) == ["out"] and _files(out) == ["mine.txt"]
    monkeypatch.undo()

    convert_viscpm_paint(ckpt, sd_base, out, llm_config=llm, overwrite=True, show_progress=False)
    assert "mine.txt" not in _files(out) and "model_index.json" in _files(out)
    assert _files(tmp_path) == ["out"]


def test_push_to_hub_uploads_exactly_the_output(originals: tuple, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub

    calls: list[tuple] = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id, kw)))

    def upload_folder(*, repo_id: str, folder_path: str, commit_message: str, repo_type: str) -> str:
        calls.append(("upload", repo_id, folder_path, _files(Path(folder_path)), commit_message))
        return "https://hub/commit"

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    ckpt, sd_base, llm, _ = originals
    out = tmp_path / "out"
    assert main(["--checkpoint", str(ckpt), "--sd-base", str(sd_base), "--llm-config", str(llm),
                 "--output", str(out), "--quiet", "--push-to-hub", "me/viscpm-paint-tiny", "--private"]) == 0  # fmt: skip
    create, upload = calls
    assert create == ("create", "me/viscpm-paint-tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert upload[1:4] == ("me/viscpm-paint-tiny", str(out), _files(out))
    assert "model_index.json" in upload[3] and "unet" in upload[3]
    assert upload[4] == (
        "Add VisCPM-Paint converted from viscpm_paint_balance_checkpoint.pt (transformers-viscpm "
        f"{transformers_viscpm.__version__})"
    )
    assert 'from_pretrained("me/viscpm-paint-tiny")' in (out / "README.md").read_text()


def test_cli_reports_bad_input(originals: tuple, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt, sd_base, llm, _ = originals
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    args = ["--sd-base", str(sd_base), "--llm-config", str(llm), "--output", str(tmp_path / "o"), "--quiet"]
    assert main(["--checkpoint", str(tmp_path / "x.pt"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("viscpm convert paint: error: ") and "x.pt: not a torch.save zip archive" in err
    assert main(["--checkpoint", str(tmp_path / "x.pt"), *args, "--max-shard-size", "lots"]) == 2
    assert "cannot read the size 'lots'" in capsys.readouterr().err
    assert main(["--checkpoint", str(ckpt), *args[:2], "--llm-config", str(tmp_path / "none.json"),
                 "--output", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "none.json: not a usable original CPM-Bee config" in capsys.readouterr().err
    assert _files(tmp_path) == ["x.pt"]
    with pytest.raises(SystemExit):
        main(["--checkpoint", "a", "--sd-base", "b", "--output", "c", "--private"])
    assert "--private needs --push-to-hub" in capsys.readouterr().err


def test_script_wrapper_help() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "conversion" / "convert_viscpm_paint.py"), "--help"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    for option in ("--checkpoint", "--sd-base", "--llm-config", "--output", "--dtype", "--max-shard-size"):
        assert option in result.stdout
    assert "--push-to-hub" in result.stdout and "--overwrite" in result.stdout
