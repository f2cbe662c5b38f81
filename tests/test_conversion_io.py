"""The shared conversion machinery: lazy checkpoints, key tables, streamed shards, atomic folders, cards, hub."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from transformers_viscpm.conversion import _io
from transformers_viscpm.conversion._io import (
    CheckpointError,
    KeyRule,
    OriginalCheckpoint,
    TensorSpec,
    atomic_output_dir,
    check_against_expected,
    expected_specs,
    identify_checkpoint_kind,
    map_keys,
    push_folder_to_hub,
    require_kind,
    resolve_output_dtype,
    verify_checksums,
    verify_safetensors_folder,
    write_model_card,
    write_safetensors_shards,
)


def _state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb.weight": torch.randn(10, 4, generator=g),
        "layers.0.w": torch.randn(4, 4, generator=g),
        "layers.1.w": torch.randn(4, 4, generator=g),
        "norm.weight": torch.randn(4, generator=g),
    }


@pytest.fixture
def ckpt_file(tmp_path: Path) -> Path:
    path = tmp_path / "orig.pt"
    torch.save(_state_dict(), path)
    return path


# ---------------------------------------------------------------- reading originals


def test_metadata_without_reading_data(ckpt_file: Path) -> None:
    ckpt = OriginalCheckpoint(ckpt_file)
    assert ckpt.keys() == ["emb.weight", "layers.0.w", "layers.1.w", "norm.weight"]
    assert ckpt.specs["emb.weight"] == TensorSpec((10, 4), torch.float32)
    assert ckpt.specs["emb.weight"].nbytes == 160
    assert "norm.weight" in ckpt and "nope" not in ckpt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_iter_bytes_reassembles_cast_tensor(ckpt_file: Path, dtype: torch.dtype) -> None:
    ckpt = OriginalCheckpoint(ckpt_file)
    chunks = list(ckpt.iter_bytes("emb.weight", dtype, chunk_bytes=40))
    assert len(chunks) == 5  # 10 rows of 16 bytes (fp32 source), 2 rows per 40-byte chunk
    data = torch.cat(chunks).view(dtype).reshape(10, 4)
    assert torch.equal(data, _state_dict()["emb.weight"].to(dtype))


def test_iter_bytes_releases_mmap_and_stays_correct(ckpt_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_io, "RELEASE_AFTER_BYTES", 32)
    ckpt = OriginalCheckpoint(ckpt_file)
    opens = []
    original_open = _io._open_state_dict
    monkeypatch.setattr(_io, "_open_state_dict", lambda path: (opens.append(path), original_open(path))[1])
    data = torch.cat(list(ckpt.iter_bytes("emb.weight", torch.float32, chunk_bytes=16))).view(torch.float32)
    assert torch.equal(data.reshape(10, 4), _state_dict()["emb.weight"])
    assert opens == [ckpt_file] * 5  # re-opened after every 2 rows (32 bytes) read
    assert ckpt._open_dict is None


def test_non_contiguous_and_scalar_tensors(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    torch.save({"t": base.t(), "s": torch.tensor(2.5), "e": torch.zeros(0, 3)}, tmp_path / "x.pt")
    ckpt = OriginalCheckpoint(tmp_path / "x.pt")
    t = torch.cat(list(ckpt.iter_bytes("t", torch.float32, chunk_bytes=8))).view(torch.float32).reshape(4, 3)
    assert torch.equal(t, base.t())
    assert torch.cat(list(ckpt.iter_bytes("s", torch.float16))).view(torch.float16).item() == 2.5
    assert list(ckpt.iter_bytes("e", torch.float32)) == []


def test_directory_of_shards_with_index(tmp_path: Path) -> None:
    sd = _state_dict()
    torch.save({k: sd[k] for k in ("emb.weight", "norm.weight")}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in ("layers.0.w", "layers.1.w")}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: f"pytorch_model-0000{1 if k in ('emb.weight', 'norm.weight') else 2}-of-00002.bin" for k in sd}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = OriginalCheckpoint(tmp_path)
    assert sorted(ckpt.keys()) == sorted(sd)
    got = torch.cat(list(ckpt.iter_bytes("layers.1.w", torch.float32))).view(torch.float32).reshape(4, 4)
    assert torch.equal(got, sd["layers.1.w"])

    weight_map["norm.weight"] = "pytorch_model-00002-of-00002.bin"
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"maps key 'norm.weight' to pytorch_model-00002-of-00002.bin"):
        OriginalCheckpoint(tmp_path)

    weight_map["x"] = "pytorch_model-00003-of-00003.bin"
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"lists shard pytorch_model-00003-of-00003.bin, which is missing"):
        OriginalCheckpoint(tmp_path)


def test_directory_without_index_and_duplicate_keys(tmp_path: Path) -> None:
    sd = _state_dict()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert OriginalCheckpoint(tmp_path).keys() == list(sd)
    torch.save({"norm.weight": sd["norm.weight"]}, tmp_path / "pytorch_model-extra.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.*\.bin: key 'norm.weight' is also in "):
        OriginalCheckpoint(tmp_path)


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="holds no pytorch_model"):
        OriginalCheckpoint(tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.pt: no such checkpoint"):
        OriginalCheckpoint(tmp_path / "nope.pt")


def test_truncated_file(ckpt_file: Path) -> None:
    data = ckpt_file.read_bytes()
    ckpt_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"orig.pt: not a torch.save zip archive \(the file is truncated"):
        OriginalCheckpoint(ckpt_file)


def test_garbage_inside_zip(ckpt_file: Path) -> None:
    data = bytearray(ckpt_file.read_bytes())
    start = data.index(b"data.pkl") + 40  # the pickle of the state dict
    data[start : start + 64] = b"\x00" * 64
    ckpt_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="orig.pt: "):
        OriginalCheckpoint(ckpt_file)


def test_legacy_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "legacy.bin"
    torch.save(_state_dict(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy \(non-zip\) format, which cannot be memory-mapped"):
        OriginalCheckpoint(path)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([torch.zeros(2)], r"not a state dict \(it holds a list\)"),
        ({"state_dict": {"a": torch.zeros(2)}}, r"key 'state_dict' holds a dict, not a tensor"),
        ({"a": torch.zeros(2), "step": 3}, r"key 'step' holds a int, not a tensor"),
        ({1: torch.zeros(2)}, r"key 1 is not a string"),
        ({}, "the state dict is empty"),
        ({"ids": torch.arange(3)}, r"key 'ids' is stored as torch.int64, which is not a supported weight dtype"),
    ],
)
def test_not_a_usable_state_dict(tmp_path: Path, payload: object, message: str) -> None:
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=message):
        OriginalCheckpoint(tmp_path / "bad.pt")


def test_arbitrary_objects_are_never_unpickled(tmp_path: Path) -> None:
    torch.save({"a": torch.zeros(2), "when": datetime.date(2023, 6, 1)}, tmp_path / "obj.pt")
    with pytest.raises(CheckpointError, match=r"obj.pt: holds objects other than tensors .*weights_only"):
        OriginalCheckpoint(tmp_path / "obj.pt")


# ---------------------------------------------------------------- kinds, key tables, expectations


def test_identify_and_require_kind(tmp_path: Path) -> None:
    assert identify_checkpoint_kind(["llm.input_embedding.weight", "unet.conv_in.weight"])[0] == "viscpm_paint"
    assert identify_checkpoint_kind(["llm.x", "query", "mapping.0.weight"]) == (
        "viscpm_chat",
        ["query", "mapping.0.weight"],
    )
    assert identify_checkpoint_kind(["input_embedding.weight"]) == ("other", [])
    torch.save({"llm.a": torch.zeros(1), "trans_block.layernorm.weight": torch.zeros(1)}, tmp_path / "p.pt")
    with pytest.raises(
        CheckpointError, match=r"VisCPM-Paint checkpoint \(it has trans_block.\* keys\), not a CPM-Bee"
    ):
        require_kind(OriginalCheckpoint(tmp_path / "p.pt"), "cpmbee")
    require_kind(OriginalCheckpoint(tmp_path / "p.pt"), "viscpm_paint")


RULES = (
    KeyRule(r"emb\.weight", "model.embed.weight"),
    KeyRule(r"layers\.(\d+)\.w", r"model.blocks.\1.weight"),
    KeyRule(r"norm\.weight", r"model.\g<0>"),
    KeyRule(r"head\.weight", None, "tied"),
)


def test_map_keys() -> None:
    mapping = map_keys(["p.emb.weight", "p.layers.7.w", "p.norm.weight", "head.weight", "p.extra"], RULES, "p.")
    assert mapping.target_to_source == {
        "model.embed.weight": "p.emb.weight",
        "model.blocks.7.weight": "p.layers.7.w",
        "model.norm.weight": "p.norm.weight",
    }
    assert mapping.dropped == {"head.weight": "tied"}
    assert mapping.unexpected == ["p.extra"]
    with pytest.raises(CheckpointError, match="'a.emb.weight' and 'emb.weight' both map to 'model.embed.weight'"):
        map_keys(["a.emb.weight", "emb.weight"], (KeyRule(r"(?:a\.)?emb\.weight", "model.embed.weight"),))


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4, bias=False) for _ in range(2)])
        self.norm = torch.nn.LayerNorm(4, bias=False)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def _expected() -> dict[str, TensorSpec]:
    with torch.device("meta"):
        model = torch.nn.Module()
        model.model = _Tiny()
    model.all_tied_weights_keys = {"model.head.weight": "model.embed.weight"}
    return expected_specs(model)


def test_expected_specs_drop_tied() -> None:
    assert _expected() == {
        "model.embed.weight": TensorSpec((10, 4), torch.float32),
        "model.blocks.0.weight": TensorSpec((4, 4), torch.float32),
        "model.blocks.1.weight": TensorSpec((4, 4), torch.float32),
        "model.norm.weight": TensorSpec((4,), torch.float32),
    }


def test_check_against_expected_reports_everything_at_once(tmp_path: Path) -> None:
    sd = _state_dict()
    sd["layers.1.w"] = torch.zeros(4, 5)
    del sd["norm.weight"]
    sd["layers.2.w"] = torch.zeros(4, 4)
    sd["bogus"] = torch.zeros(1)
    torch.save(sd, tmp_path / "o.pt")
    ckpt = OriginalCheckpoint(tmp_path / "o.pt")
    mapping = map_keys(ckpt.keys(), RULES)
    with pytest.raises(CheckpointError) as err:
        check_against_expected(mapping, ckpt.specs, _expected(), "o.pt")
    message = str(err.value)
    assert message.startswith("o.pt: does not match the configuration")
    assert "unexpected keys: bogus, layers.2.w" in message
    assert "missing keys (named as in the converted model): model.norm.weight" in message
    assert "shape mismatches: 'layers.1.w' is [4, 5], expected [4, 4]" in message

    good = OriginalCheckpoint(_save(tmp_path / "g.pt", _state_dict()))
    check_against_expected(map_keys(good.keys(), RULES), good.specs, _expected(), "g.pt")


def _save(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    torch.save(sd, path)
    return path


def test_resolve_output_dtype() -> None:
    f16 = TensorSpec((1,), torch.float16)
    f32 = TensorSpec((1,), torch.float32)
    assert resolve_output_dtype([f16, f16], None) == torch.float16
    assert resolve_output_dtype([f16, f32], "bfloat16") == torch.bfloat16
    assert resolve_output_dtype([f16], torch.float32) == torch.float32
    with pytest.raises(CheckpointError, match=r"mixes torch.float16, torch.float32; choose the output dtype"):
        resolve_output_dtype([f16, f32], None)
    with pytest.raises(ValueError, match="unsupported output dtype 'int8'"):
        resolve_output_dtype([f16], "int8")


# ---------------------------------------------------------------- writing shards


def test_parse_size() -> None:
    assert _io.parse_size("5GB") == 5 * 10**9
    assert _io.parse_size("500mb") == 500 * 10**6
    assert _io.parse_size("2GiB") == 2**31
    assert _io.parse_size("1.5 KB") == 1500
    assert _io.parse_size(40) == 40
    for bad in ("lots", "0MB", "5 parsecs"):
        with pytest.raises(ValueError):
            _io.parse_size(bad)


def _convert(tmp_path: Path, dtype: torch.dtype, max_shard_size: int | str) -> tuple[Path, dict[str, TensorSpec]]:
    ckpt = OriginalCheckpoint(_save(tmp_path / "o.pt", _state_dict()))
    mapping = map_keys(ckpt.keys(), RULES)
    out = tmp_path / "out"
    out.mkdir()
    written = write_safetensors_shards(
        ckpt, mapping.target_to_source, _expected(), out, dtype, max_shard_size=max_shard_size, show_progress=False
    )
    return out, written


def test_sharded_output_matches_transformers_layout(tmp_path: Path) -> None:
    # huggingface_hub's greedy split (as transformers): [blocks.0], then embed (80 B) alone, then [blocks.1, norm]
    out, written = _convert(tmp_path, torch.bfloat16, max_shard_size=40)
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + ["model.safetensors.index.json"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {
        "total_parameters": 40 + 16 + 16 + 4,
        "total_size": 2 * (40 + 16 + 16 + 4),
        "sha256": {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in files[:3]},
    }
    assert verify_checksums(out) == [out / name for name in files[:3]]
    assert index["weight_map"] == {
        "model.blocks.0.weight": "model-00001-of-00003.safetensors",
        "model.blocks.1.weight": "model-00003-of-00003.safetensors",
        "model.embed.weight": "model-00002-of-00003.safetensors",
        "model.norm.weight": "model-00003-of-00003.safetensors",
    }
    sd = _state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for name in files[:3]:
        with safe_open(out / name, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
        loaded.update(load_file(out / name))
    assert torch.equal(loaded["model.embed.weight"], sd["emb.weight"].to(torch.bfloat16))
    assert torch.equal(loaded["model.blocks.1.weight"], sd["layers.1.w"].to(torch.bfloat16))
    assert torch.equal(loaded["model.norm.weight"], sd["norm.weight"].to(torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in loaded.values())
    verify_safetensors_folder(out, written)


def test_single_shard_and_verification_catches_tampering(tmp_path: Path) -> None:
    out, written = _convert(tmp_path, torch.float32, max_shard_size="5GB")
    # the index is written for one shard too: it carries the shard's checksum
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "model.safetensors.index.json"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert index["metadata"]["sha256"] == {
        "model.safetensors": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    }
    sd = load_file(out / "model.safetensors")
    assert torch.equal(sd["model.blocks.0.weight"], _state_dict()["layers.0.w"])
    verify_safetensors_folder(out, written)
    wrong = dict(written, **{"model.norm.weight": TensorSpec((4,), torch.float16)})
    with pytest.raises(RuntimeError, match=r"differ from the plan: model.norm.weight"):
        verify_safetensors_folder(out, wrong)


# ---------------------------------------------------------------- atomic output


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_atomic_success_and_failure(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with atomic_output_dir(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".dest.partial-")
        (tmp / "a.txt").write_text("a")
        assert not dest.exists()
    assert _listing(tmp_path) == ["dest", "dest/a.txt"]

    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        other = tmp_path / "other"
        with pytest.raises(type(exc)):
            with atomic_output_dir(other) as tmp:
                (tmp / "half.bin").write_bytes(b"x")
                raise exc
        assert _listing(tmp_path) == ["dest", "dest/a.txt"]


def test_atomic_existing_destination(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists and is not empty; pass overwrite"):
        with atomic_output_dir(dest):
            pytest.fail("must refuse before yielding")
    assert (dest / "old.txt").read_text() == "old"

    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(dest, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert _listing(tmp_path) == ["dest", "dest/old.txt"]

    with atomic_output_dir(dest, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _listing(tmp_path) == ["dest", "dest/new.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output_dir(empty) as tmp:
        (tmp / "x").write_text("x")
    assert (empty / "x").read_text() == "x"

    (tmp_path / "file").write_text("f")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        with atomic_output_dir(tmp_path / "file", overwrite=True):
            pass


def test_atomic_refuses_if_destination_appears_meanwhile(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(FileExistsError):
        with atomic_output_dir(dest) as tmp:
            (tmp / "new").write_text("new")
            dest.mkdir()
            (dest / "theirs").write_text("theirs")
    assert _listing(tmp_path) == ["dest", "dest/theirs"]


# ---------------------------------------------------------------- model cards and the hub


def test_minimal_model_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_io, "MODEL_CARD_DIRS", (tmp_path / "none",))
    path = write_model_card(tmp_path, "cpmbee", title="CPM-Bee tiny", source_checkpoint="x.pt", dtype="float16")
    text = path.read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["license"] == "apache-2.0"
    assert front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "text-generation"
    assert "# CPM-Bee tiny" in text
    assert "- source checkpoint: `x.pt`" in text and "- dtype: `float16`" in text


def test_model_card_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "viscpm_chat.md").write_text("---\nlicense: apache-2.0\n---\n# $title in ${dtype}\n")
    monkeypatch.setattr(_io, "MODEL_CARD_DIRS", (tmp_path / "none", cards))
    assert (
        write_model_card(tmp_path, "viscpm_chat", title="Chat", dtype="bf16").read_text().endswith("# Chat in bf16\n")
    )
    with pytest.raises(ValueError, match="viscpm_chat.md needs a value for 'dtype'"):
        write_model_card(tmp_path, "viscpm_chat", title="Chat")


def test_push_folder_to_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id, kw)))

    def upload_folder(**kw: object) -> object:
        calls.append(("upload", kw))
        return type("Info", (), {"commit_url": "https://hub/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    assert push_folder_to_hub(tmp_path, "me/model", private=True, commit_message="msg") == "https://hub/commit/1"
    assert calls == [
        ("create", "me/model", {"private": True, "exist_ok": True, "repo_type": "model"}),
        (
            "upload",
            {"repo_id": "me/model", "folder_path": str(tmp_path), "commit_message": "msg", "repo_type": "model"},
        ),
    ]


def test_error_is_a_value_error() -> None:
    assert issubclass(CheckpointError, ValueError)
