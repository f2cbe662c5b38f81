"""Converters never publish broken weights and never leave work behind: integrity checks and interruptions.

Weights: NaN / Inf and values a narrower dtype cannot hold are refused, every byte the zip records a CRC-32 for is
checked, shard checksums land in the index and :func:`verify_checksums` confirms them; malformed safetensors
headers and index files are one :class:`CheckpointError` naming the file. Output: SIGTERM / SIGINT remove the work
folder, stale work folders of killed converters are swept (never a live one's), a symlinked output keeps its link.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from transformers_viscpm.conversion._io import (
    CheckpointError,
    Interrupted,
    KeyRule,
    OriginalCheckpoint,
    TensorSpec,
    atomic_output_dir,
    map_keys,
    read_index,
    sweep_stale_work_folders,
    verify_checksums,
    write_safetensors_shards,
    zip_records,
)

RULES = (KeyRule(r"(.+)", r"model.\1"),)


def _state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"emb.weight": torch.randn(10, 4, generator=g), "norm.weight": torch.randn(4, generator=g)}


def _expected(sd: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {f"model.{k}": TensorSpec(tuple(v.shape), v.dtype) for k, v in sd.items()}


def _convert(source: Path, out: Path, sd: dict, dtype: torch.dtype = torch.float32, **kwargs) -> dict[str, TensorSpec]:
    """Open ``source`` and stream it into ``out`` through the atomic folder, as the converters do."""
    ckpt = OriginalCheckpoint(source)
    mapping = map_keys(ckpt.keys(), RULES)
    with atomic_output_dir(out) as tmp:
        return write_safetensors_shards(
            ckpt, mapping.target_to_source, _expected(sd), tmp, dtype, show_progress=False, **kwargs
        )


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- non-finite values and overflow


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_unless_allowed(tmp_path: Path, bad: float) -> None:
    sd = _state_dict()
    sd["emb.weight"][7, 2] = bad
    torch.save(sd, tmp_path / "o.pt")
    with pytest.raises(CheckpointError, match=r"o.pt: key 'emb.weight' holds NaN or infinite values; pass .*"):
        _convert(tmp_path / "o.pt", tmp_path / "out", sd)
    assert _siblings(tmp_path) == ["o.pt"]  # nothing written, no work folder left
    _convert(tmp_path / "o.pt", tmp_path / "out", sd, allow_non_finite=True)
    written = load_file(tmp_path / "out" / "model.safetensors")["model.emb.weight"]
    assert torch.equal(written.nan_to_num(), sd["emb.weight"].nan_to_num()) and written[7, 2].isnan() == (bad != bad)


def test_float16_overflow_is_refused_and_wider_dtypes_pass(tmp_path: Path) -> None:
    sd = _state_dict()
    sd["norm.weight"][1] = 1e5  # beyond float16's 65504, within bfloat16's range
    torch.save(sd, tmp_path / "o.pt")
    with pytest.raises(CheckpointError, match=r"key 'norm.weight' has values up to 100000, beyond the range of "):
        _convert(tmp_path / "o.pt", tmp_path / "out", sd, torch.float16)
    assert _siblings(tmp_path) == ["o.pt"]
    _convert(tmp_path / "o.pt", tmp_path / "out", sd, torch.bfloat16)
    assert load_file(tmp_path / "out" / "model.safetensors")["model.norm.weight"][1] == 99840.0  # bf16 rounding


# ---------------------------------------------------------------- CRC-32 of the zip records


def _record_bytes(path: Path, key_index: int) -> tuple[int, int]:
    """(offset, size) of storage record ``archive/data/<key_index>``."""
    (record,) = [r for r in zip_records(path).values() if r.name.endswith(f"/data/{key_index}")]
    return record.offset, record.size


def test_a_flipped_bit_in_tensor_data_fails_the_crc(tmp_path: Path) -> None:
    sd = _state_dict()
    torch.save(sd, tmp_path / "o.pt")
    data = bytearray((tmp_path / "o.pt").read_bytes())
    offset, size = _record_bytes(tmp_path / "o.pt", 0)
    data[offset + size // 2] ^= 0x10
    (tmp_path / "o.pt").write_bytes(bytes(data))
    # torch itself maps the flipped value without a word
    assert not torch.equal(torch.load(tmp_path / "o.pt", weights_only=True, mmap=True)["emb.weight"], sd["emb.weight"])
    with pytest.raises(CheckpointError, match=r"o.pt: the data of key 'emb.weight' \(o/data/0\) fails its CRC-32"):
        _convert(tmp_path / "o.pt", tmp_path / "out", sd)
    assert _siblings(tmp_path) == ["o.pt"]


def test_a_flipped_bit_in_the_pickle_fails_the_crc(tmp_path: Path) -> None:
    torch.save(_state_dict(), tmp_path / "o.pt")
    data = bytearray((tmp_path / "o.pt").read_bytes())
    data[data.index(b"emb.weight") + 2] ^= 0x01  # torch would load the key as 'emc.weight'
    (tmp_path / "o.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"o.pt: the zip archive is corrupt \(Bad CRC-32 for file 'o/data.pkl'"):
        OriginalCheckpoint(tmp_path / "o.pt")


def test_shared_and_partial_storages_are_checked_by_reading(tmp_path: Path) -> None:
    base = torch.randn(6, 4)
    sd = {"a": base[:3], "b": base[3:], "c": torch.randn(4)}  # a and b share one record, neither covers it
    torch.save(sd, tmp_path / "o.pt")
    assert set(OriginalCheckpoint(tmp_path / "o.pt")._records) == {"c"}  # c is checked while streaming
    data = bytearray((tmp_path / "o.pt").read_bytes())
    offset, size = _record_bytes(tmp_path / "o.pt", 0)
    data[offset + size - 1] ^= 0x01
    (tmp_path / "o.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"record o/data/0 fails its CRC-32 check"):
        OriginalCheckpoint(tmp_path / "o.pt")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255), st.sampled_from(["xor", "set"])),
        min_size=1,
        max_size=3,
    ),
    truncate=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)),
)
def test_random_corruptions_never_convert_wrong_weights(tmp_path: Path, edits: list, truncate: float | None) -> None:
    """Any damage to a tiny checkpoint: a CheckpointError, or a conversion whose weights are the original's."""
    sd = _state_dict()
    folder = tmp_path / f"case-{os.urandom(4).hex()}"
    folder.mkdir()
    torch.save(sd, folder / "o.pt")
    data = bytearray((folder / "o.pt").read_bytes())
    for where, value, how in edits:
        pos = int(where * len(data))
        data[pos] = data[pos] ^ (value or 1) if how == "xor" else value
    if truncate is not None:
        data = data[: int(truncate * len(data))]
    (folder / "o.pt").write_bytes(bytes(data))
    try:
        _convert(folder / "o.pt", folder / "out", sd)
    except CheckpointError as err:
        assert "o.pt" in str(err)
        assert _siblings(folder) == ["o.pt"]
        return
    converted = load_file(folder / "out" / "model.safetensors")
    assert all(torch.equal(converted[f"model.{k}"], v) for k, v in sd.items())


# ---------------------------------------------------------------- malformed safetensors headers and index files


def _safetensors_with_header(path: Path, header: object, data: bytes = b"\0" * 16) -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ([1, 2], "the header is a JSON list"),
        ({"w": [1]}, "entry 'w' is not a {dtype, shape, data_offsets} object"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, "is not a {dtype"),
        ({"w": {"dtype": "Q8", "shape": [2], "data_offsets": [0, 8]}}, "unsupported dtype 'Q8'"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "not a list of non-negative integers"),
        ({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, "not a list of non-negative integers"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, "not two integers"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, "data_offsets [0, 800] for 8 bytes"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "data_offsets [0, 8] for 12 bytes"),
    ],
)
def test_malformed_safetensors_headers_name_the_file(tmp_path: Path, header: object, problem: str) -> None:
    path = _safetensors_with_header(tmp_path / "vae.safetensors", header)
    with pytest.raises(CheckpointError) as err:
        OriginalCheckpoint(path)
    assert str(err.value).startswith(f"{path}: not a valid safetensors file (") and problem in str(err.value)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.binary(max_size=200)
    | st.builds(lambda n, rest: struct.pack("<Q", n) + rest, st.integers(0, 2**64 - 1), st.binary(max_size=64))
)
def test_random_safetensors_bytes_are_one_checkpoint_error(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match="x.safetensors: "):
        OriginalCheckpoint(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.recursive(
        st.none() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c) | st.dictionaries(st.text(max_size=8), c),
    )
)
def test_random_index_json_is_one_checkpoint_error(tmp_path: Path, value: object) -> None:
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps(value if not isinstance(value, dict) else {"weight_map": value}))
    try:
        read_index(index)
    except CheckpointError as err:
        assert str(err).startswith(f"{index}: not a")
    else:  # only a well-formed map of names to shard files passes
        assert all(isinstance(v, str) and "/" not in v for v in value.values())


def test_a_directory_with_a_broken_index_names_it(tmp_path: Path) -> None:
    torch.save(_state_dict(), tmp_path / "pytorch_model-00001-of-00001.bin")
    for text in ("{", "[]", '{"weight_map": ["a"]}', '{"weight_map": {"a": "../x.bin"}}', '{"weight_map": {"a": 3}}'):
        (tmp_path / "pytorch_model.bin.index.json").write_text(text)
        with pytest.raises(CheckpointError, match="pytorch_model.bin.index.json: not a"):
            OriginalCheckpoint(tmp_path)


# ---------------------------------------------------------------- shard checksums


def test_shard_checksums_are_recorded_and_confirmed(tmp_path: Path) -> None:
    sd = _state_dict()
    torch.save(sd, tmp_path / "o.pt")
    out = tmp_path / "out"
    ckpt = OriginalCheckpoint(tmp_path / "o.pt")
    with atomic_output_dir(out) as tmp:
        write_safetensors_shards(
            ckpt, map_keys(ckpt.keys(), RULES).target_to_source, _expected(sd), tmp, torch.float32,
            max_shard_size=48, show_progress=False,
        )  # fmt: skip
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) == 2 and verify_checksums(out) == shards
    index = out / "model.safetensors.index.json"
    recorded = json.loads(index.read_text())["metadata"]["sha256"]
    assert recorded == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shards}

    data = bytearray(shards[1].read_bytes())
    data[-1] ^= 0x01
    shards[1].write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shards[1]}: its SHA-256 differs from the one "):
        verify_checksums(out)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"{shards[1]}: cannot be read"):
        verify_checksums(out)
    meta = json.loads(index.read_text())
    del meta["metadata"]["sha256"]
    index.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="records no shard checksums"):
        verify_checksums(out)
    index.unlink()
    with pytest.raises(CheckpointError, match="holds no .*index.json, so no checksums"):
        verify_checksums(out)


# ---------------------------------------------------------------- interruptions, stale work folders, symlinks


def _interrupted_conversion(dest: Path, sig: int) -> None:
    with atomic_output_dir(dest, overwrite=True) as tmp:
        (tmp / "big.bin").write_bytes(b"x" * 4096)
        os.kill(os.getpid(), sig)
        raise SystemExit("the signal did not interrupt the conversion")


# Forked children are separate processes that need not import torch and transformers again.
_FORK = multiprocessing.get_context("fork")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_removes_the_work_folder(tmp_path: Path, sig: int) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    child = _FORK.Process(target=_interrupted_conversion, args=(dest, sig))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 1  # the Interrupted exception, not the signal's default death (-15) or SystemExit
    assert _siblings(tmp_path) == ["dest"] and _siblings(dest) == ["old.txt"]  # old output intact, nothing left
    with pytest.raises(Interrupted, match=f"interrupted by {signal.Signals(sig).name}"):
        _interrupted_conversion(dest, sig)  # the same in this process, where the handlers are then restored
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and _siblings(tmp_path) == ["dest"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_work_folders_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dead, alive = _dead_pid(), os.getpid()
    for name in (f".dest.partial-{dead}-0123456789ab", f".dest.partial-{alive}-0123456789ab",
                 f".other.partial-{dead}-0123456789ab", ".dest.partial-0123456789ab"):  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard").write_bytes(b"x" * 100)
    with atomic_output_dir(dest) as tmp:
        (tmp / "new").write_text("new")
    # the dead converter's folder of this output goes; a live one's, another output's, and an unknown layout stay
    assert _siblings(tmp_path) == [
        ".dest.partial-0123456789ab",
        f".dest.partial-{alive}-0123456789ab",
        f".other.partial-{dead}-0123456789ab",
        "dest",
    ]


def test_an_output_moved_aside_by_a_killed_converter_is_restored(tmp_path: Path) -> None:
    aside = tmp_path / f".dest.replaced-{_dead_pid()}-0123456789ab"
    aside.mkdir()
    (aside / "old.txt").write_text("old")
    assert sweep_stale_work_folders(tmp_path / "dest") == []
    assert _siblings(tmp_path) == ["dest"] and (tmp_path / "dest" / "old.txt").read_text() == "old"


def test_overwriting_through_a_symlink_keeps_the_link(tmp_path: Path) -> None:
    real = tmp_path / "store" / "repo-v1"
    real.mkdir(parents=True)
    (real / "old.txt").write_text("old")
    link = tmp_path / "repo"
    link.symlink_to(real)
    with atomic_output_dir(link, overwrite=True) as tmp:
        assert tmp.parent == real.parent  # written next to the real folder, so the final rename is atomic
        (tmp / "new.txt").write_text("new")
    assert link.is_symlink() and link.resolve() == real
    assert _siblings(real) == ["new.txt"] and _siblings(real.parent) == ["repo-v1"]


def _racer(source: Path, out: Path) -> None:
    try:
        _convert(source, out, _state_dict())
    except FileExistsError:
        pass  # another racer's output got there first


def test_racing_converters_on_one_folder_leave_one_whole_output(tmp_path: Path) -> None:
    """Three processes convert into one folder at once: one complete output, no work folder left."""
    sd = _state_dict()
    torch.save(sd, tmp_path / "o.pt")
    out = tmp_path / "out"
    racers = [_FORK.Process(target=_racer, args=(tmp_path / "o.pt", out)) for _ in range(3)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=120)
    assert [r.exitcode for r in racers] == [0, 0, 0]
    assert _siblings(tmp_path) == ["o.pt", "out"]
    assert verify_checksums(out) == [out / "model.safetensors"]
    assert torch.equal(load_file(out / "model.safetensors")["model.emb.weight"], sd["emb.weight"])


# ---------------------------------------------------------------- configs and vocabularies


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        ("cpmbee", "dim_model", -4),
        ("cpmbee", "num_layers", 0),
        ("cpmbee", "dim_head", 2.5),
        ("cpmbee", "eps", 0.0),
        ("cpmbee", "eps", -1e-6),
        ("cpmbee", "dropout_p", 1.5),
        ("vision", "patch_size", 0),
        ("vision", "layer_norm_eps", 0.0),
        ("chat", "query_num", -1),
        ("paint", "projection_dim", -8),
        ("paint", "layer_norm_eps", -1.0),
    ],
)
def test_config_values_are_validated_with_the_field_named(cls: str, field: str, value: object) -> None:
    from huggingface_hub.errors import StrictDataclassError

    from transformers_viscpm.models.cpmbee.configuration_cpmbee import CpmBeeConfig
    from transformers_viscpm.models.viscpm_chat.configuration_viscpm_chat import (
        VisCPMChatConfig,
        VisCPMChatVisionConfig,
    )
    from transformers_viscpm.pipelines.viscpm_paint import VisCPMPaintTextEncoderConfig

    classes = {
        "cpmbee": CpmBeeConfig,
        "vision": VisCPMChatVisionConfig,
        "chat": VisCPMChatConfig,
        "paint": VisCPMPaintTextEncoderConfig,
    }
    with pytest.raises(StrictDataclassError, match=f"field '{field}'"):
        classes[cls](**{field: value})


@pytest.mark.parametrize(
    ("text", "problem"),
    [("{", "Expecting property name"), ("[1, 2]", ""), ('{"dim_model": -1}', "dim_model"), ('{"bogus": 1}', "bogus")],
)
def test_bad_original_configs_name_the_file(tmp_path: Path, text: str, problem: str) -> None:
    from transformers_viscpm.conversion.convert_cpmbee import read_original_config

    (tmp_path / "cpm-bee.json").write_text(text)
    with pytest.raises(CheckpointError, match=f"cpm-bee.json: not a usable original CPM-Bee config .*{problem}"):
        read_original_config(tmp_path / "cpm-bee.json")


def test_a_vocabulary_that_does_not_match_the_model_is_refused(tmp_path: Path) -> None:
    from transformers_viscpm.conversion.convert_cpmbee import convert_cpmbee
    from transformers_viscpm.synthetic.cpmbee import original_cpmbee_state_dict, tiny_cpmbee_config

    config = tiny_cpmbee_config(vocab_size=1000, dim_model=16, dim_ff=32, dim_head=8)
    torch.save(original_cpmbee_state_dict(config, seed=0), tmp_path / "o.pt")
    with pytest.raises(CheckpointError, match="vocab_size=1000 but the CPM-Bee vocabulary has 86583 entries"):
        convert_cpmbee(tmp_path / "o.pt", config, tmp_path / "out", show_progress=False)
    assert _siblings(tmp_path) == ["o.pt"]


def test_a_non_utf8_vocabulary_names_its_file(tmp_path: Path) -> None:
    from transformers_viscpm.models.cpmbee.tokenization_cpmbee import load_vocab

    (tmp_path / "vocab.txt").write_bytes(b"</s>\n</n>\n</_>\n" + b"\xff\xfe\n")
    with pytest.raises(ValueError, match=r"vocab.txt: not a UTF-8 CPM-Bee vocabulary"):
        load_vocab(tmp_path / "vocab.txt")
