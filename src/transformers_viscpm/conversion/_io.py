"""Shared machinery of the converters: lazy original checkpoints, key tables, streamed safetensors, atomic output.

A conversion is: open the original checkpoint lazily (:class:`OriginalCheckpoint`), map its keys with a table
(:func:`map_keys`), compare the result with what the target model expects (:func:`expected_specs`,
:func:`check_against_expected`), then stream the tensors into sharded safetensors files inside a temporary folder
that only replaces the destination once everything is written and verified (:func:`atomic_output_dir`,
:func:`write_safetensors_shards`, :func:`verify_safetensors_folder`). Every problem with the input is reported as
one :class:`CheckpointError` that names the file or the key.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import logging
import mmap
import os
import pickle
import re
import shutil
import signal
import string
import struct
import sys
import threading
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.serialization import split_state_dict_into_shards_factory
from tqdm.auto import tqdm

# Reading a tensor through the mmap makes its pages resident in this process; dropping the loaded dict unmaps the
# file. Re-opening after this many bytes keeps the resident part of the original bounded whatever its size.
RELEASE_AFTER_BYTES = 64 * 2**20
# At most this many bytes of one tensor are cast / copied at a time.
CHUNK_BYTES = 16 * 2**20

SUPPORTED_DISK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OUTPUT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

_SAFETENSORS_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.bool: "BOOL",
}
_FROM_SAFETENSORS = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
# The pickle that torch's legacy (pre-zip) format starts with: protocol 2, then the magic number as a LONG1.
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"

# Keys that give away which original model a checkpoint belongs to, for a clear "wrong converter" error.
KIND_SIGNATURES: dict[str, tuple[str, ...]] = {
    "viscpm_paint": ("unet.", "trans_block."),
    "viscpm_chat": ("vpm.", "query", "mapping."),
}
KIND_NAMES = {"cpmbee": "CPM-Bee", "viscpm_chat": "VisCPM-Chat", "viscpm_paint": "VisCPM-Paint"}
# How `viscpm convert` names each converter.
CLI_KINDS = {"cpmbee": "cpmbee", "viscpm_chat": "chat", "viscpm_paint": "paint"}
# The converters' progress goes to this logger; a converter CLI prints INFO records unless --quiet.
logger = logging.getLogger(__name__)


def converter_command(kind: str) -> str:
    """The command that converts ``kind`` (``cpmbee``/``viscpm_chat``/``viscpm_paint``), for help and messages."""
    return f"viscpm convert {CLI_KINDS[kind]}"


class CheckpointError(ValueError):
    """The original checkpoint cannot be converted; the message names the file or key at fault."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Accept ``"float16"``/``"bfloat16"``/``"float32"`` (or the torch dtypes) as the output dtype."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in OUTPUT_DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in OUTPUT_DTYPES:
        return OUTPUT_DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"unsupported output dtype {dtype!r}; choose one of {', '.join(OUTPUT_DTYPES)}")


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"2GiB"`` -> 2**31 (the units transformers' ``max_shard_size`` accepts)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size, flags=re.IGNORECASE)
        if match is None:
            raise ValueError(f"cannot read the size {size!r}; write e.g. 500MB, 5GB or 2GiB")
        value = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise ValueError(f"a size must be positive, got {size!r}")
    return value


def read_safetensors_header(path: Path, data: bytes | mmap.mmap) -> tuple[dict[str, dict[str, Any]], int]:
    """The tensor entries of a safetensors file's header and where its data starts, every field checked.

    A header that is not what the format prescribes (a JSON object of ``{"dtype", "shape", "data_offsets"}`` entries
    whose offsets lie inside the file and match the shape) is a :class:`CheckpointError` naming the file.
    """

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a valid safetensors file ({problem})")

    if len(data) < 8:
        raise bad("shorter than its 8-byte header length")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > len(data) - 8:
        raise bad(f"the header length {header_size} runs past the end of the file")
    try:
        header = json.loads(bytes(data[8 : 8 + header_size]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"the header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    data_size = len(data) - 8 - header_size
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {name!r} is not a {{dtype, shape, data_offsets}} object")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _FROM_SAFETENSORS:
            raise bad(f"entry {name!r} has the unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"entry {name!r} has the shape {shape!r}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise bad(f"entry {name!r} has data_offsets {offsets!r}, not two integers")
        begin, end = offsets
        nbytes = TensorSpec(tuple(shape), _FROM_SAFETENSORS[dtype]).nbytes
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise bad(f"entry {name!r} has data_offsets {offsets} for {nbytes} bytes in a {data_size}-byte data area")
        entries[name] = info
    return entries, 8 + header_size


def _open_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors as zero-copy views of a private mmap, as ``torch.load(mmap=True)`` gives."""
    try:
        with open(path, "rb") as f:
            # Copy-on-write, so that torch accepts the buffer; nothing is ever written to it.
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from e
    entries, data_start = read_safetensors_header(path, mapped)
    tensors = {}
    for name, info in entries.items():
        dtype = _FROM_SAFETENSORS[info["dtype"]]
        begin, end = info["data_offsets"]
        count = (end - begin) // dtype.itemsize
        flat = (
            torch.frombuffer(mapped, dtype=dtype, count=count, offset=data_start + begin)
            if count
            else torch.empty(0, dtype=dtype)
        )
        tensors[name] = flat.view(info["shape"])
    return tensors


def _is_zip(path: Path) -> bool:
    """Whether ``path`` looks like a zip; one whose end records are damaged counts (its reading then says why)."""
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile:
        return True


def _open_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Open one file memory-mapped (``torch.load`` weights-only, or safetensors), failures as a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return _open_safetensors(path)
    if not _is_zip(path):
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        if head == _LEGACY_MAGIC:
            raise CheckpointError(
                f"{path}: saved in torch's legacy (non-zip) format, which cannot be memory-mapped; re-save it once "
                "with torch.save(torch.load(path, weights_only=True), new_path) and convert new_path"
            )
        raise CheckpointError(f"{path}: not a torch.save zip archive (the file is truncated or corrupt)")
    try:
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: holds objects other than tensors and plain containers; refusing to unpickle it (weights_only "
            f"load failed: {first})"
        ) from e
    except Exception as e:  # whatever a damaged archive makes torch's reader raise
        raise CheckpointError(f"{path}: cannot be read, the file is truncated or corrupt ({e})") from e
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: not a state dict (it holds a {type(loaded).__name__})")
    for key, value in loaded.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: not a state dict (key {key!r} is not a string)")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: not a flat state dict: key {key!r} holds a {type(value).__name__}, not a tensor"
            )
    return loaded


@dataclass(frozen=True)
class ZipRecord:
    """One storage record (``<archive>/data/<key>``) of a torch.save zip, as its central directory describes it."""

    name: str
    offset: int  # where its bytes start in the file
    size: int
    crc32: int


def zip_records(path: Path) -> dict[int, ZipRecord]:
    """The storage records of a torch.save zip by data offset; a corrupt directory is a :class:`CheckpointError`.

    torch's reader checks no CRC-32. The other records (the pickle above all) are small and checked here; the
    storage records are checked by :class:`OriginalCheckpoint` as it streams each tensor.
    """
    records = {}
    try:
        file_size = path.stat().st_size
        with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
            for info in archive.infolist():
                if info.filename.rpartition("/")[0].rpartition("/")[2] != "data":
                    archive.read(info)  # the pickle and the small records: zipfile checks their CRC-32 on reading
                    continue
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(f"{path}: record {info.filename} is compressed, which torch.save never does")
                f.seek(info.header_offset)
                local = f.read(30)
                if len(local) != 30 or local[:4] != b"PK\x03\x04":
                    raise CheckpointError(f"{path}: the zip directory points at no local header for {info.filename}")
                name_size, extra_size = struct.unpack("<HH", local[26:30])
                offset = info.header_offset + 30 + name_size + extra_size
                if offset + info.file_size > file_size:
                    raise CheckpointError(f"{path}: record {info.filename} runs past the end of the file (truncated)")
                records[offset] = ZipRecord(info.filename, offset, info.file_size, info.CRC)
    except (
        zipfile.BadZipFile,
        OSError,
        ValueError,
        RuntimeError,
        NotImplementedError,
        struct.error,
        EOFError,
        zlib.error,
    ) as e:
        raise CheckpointError(f"{path}: the zip archive is corrupt ({e})") from e
    return records


def _check_record_by_reading(path: Path, record: ZipRecord) -> None:
    """Check one record's CRC-32 with plain reads (for storages that no single tensor covers exactly)."""
    crc, left = 0, record.size
    with open(path, "rb") as f:
        f.seek(record.offset)
        while left:
            chunk = f.read(min(left, CHUNK_BYTES))
            if not chunk:
                raise CheckpointError(f"{path}: record {record.name} is truncated")
            crc, left = zlib.crc32(chunk, crc), left - len(chunk)
    if crc != record.crc32:
        raise CheckpointError(f"{path}: record {record.name} fails its CRC-32 check; the file is corrupt")


def _crc_plan(
    path: Path, loaded: Mapping[str, torch.Tensor], records: Mapping[int, ZipRecord]
) -> dict[str, ZipRecord]:
    """The keys whose bytes are exactly one record, so that streaming them checks its CRC-32 on the way.

    torch maps a zip's records as slices of one mapping of the whole file, so a storage's address minus the lowest
    one is its record's offset minus the lowest offset. Records that no key covers exactly (shared or partial
    storages), and every record when the addresses do not line up, are checked here by reading them.
    """
    storages = {k: t.untyped_storage() for k, t in loaded.items() if t.untyped_storage().nbytes()}
    plan: dict[str, ZipRecord] = {}
    if storages and records:
        base = min(s.data_ptr() for s in storages.values()) - min(records)
        found = {k: records.get(s.data_ptr() - base) for k, s in storages.items()}
        if all(r is not None and r.size == storages[k].nbytes() for k, r in found.items()):
            plan = {
                k: r
                for k, r in found.items()
                if loaded[k].is_contiguous() and loaded[k].storage_offset() == 0 and loaded[k].nbytes == r.size
            }
    covered = {r.offset for r in plan.values()}
    for record in records.values():
        if record.offset not in covered:
            _check_record_by_reading(path, record)
    return plan


def read_index(index: Path) -> dict[str, Any]:
    """A ``*.index.json`` file: a JSON object whose ``weight_map`` maps tensor names to shard file names.

    Anything else is a :class:`CheckpointError` naming the file.
    """
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{index}: not a readable index file ({e})") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: not a valid index file (no weight_map of tensor names to shard file names)")
    if not isinstance(data.get("metadata", {}), dict):
        raise CheckpointError(f"{index}: not a valid index file (its metadata is not an object)")
    return data


def _checkpoint_files(path: Path) -> list[Path]:
    """The files of a checkpoint: the file itself, or a directory's ``pytorch_model*.bin`` shards."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        files = [path / name for name in sorted(set(read_index(index)["weight_map"].values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index}: lists shard {file.name}, which is missing from {path}")
        return files
    files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{path}: directory holds no pytorch_model*.bin checkpoint")
    return files


class OriginalCheckpoint:
    """A torch.save state dict (one file, or a directory of shards) or a safetensors file, read lazily through mmap.

    Opening it reads only the tensors' metadata. :meth:`iter_bytes` streams one tensor's data in bounded chunks,
    re-opening the file periodically so that the pages read so far stop counting against this process, and checks
    on the way the CRC-32 that the zip recorded for it and that every value is finite.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.files = _checkpoint_files(self.path)
        self.specs: dict[str, TensorSpec] = {}
        self._file_of: dict[str, Path] = {}
        self._records: dict[str, ZipRecord] = {}
        for file in self.files:
            # The zip's directory and pickle are checked before torch reads them.
            records = zip_records(file) if file.suffix != ".safetensors" and _is_zip(file) else None
            loaded = _open_state_dict(file)
            if records is not None:
                self._records.update(_crc_plan(file, loaded, records))
            for key, tensor in loaded.items():
                if key in self._file_of:
                    raise CheckpointError(f"{file}: key {key!r} is also in {self._file_of[key]}")
                if tensor.dtype not in SUPPORTED_DISK_DTYPES:
                    raise CheckpointError(
                        f"{file}: key {key!r} is stored as {tensor.dtype}, which is not a supported weight dtype "
                        f"({', '.join(str(d) for d in SUPPORTED_DISK_DTYPES)})"
                    )
                self.specs[key] = TensorSpec(tuple(tensor.shape), tensor.dtype)
                self._file_of[key] = file
            del loaded
        if not self.specs:
            raise CheckpointError(f"{self.path}: the state dict is empty")
        self._check_index()
        self._open_file: Path | None = None
        self._open_dict: dict[str, torch.Tensor] | None = None
        self._read_since_open = 0

    def _check_index(self) -> None:
        index = self.path / "pytorch_model.bin.index.json" if self.path.is_dir() else None
        if index is None or not index.is_file():
            return
        for key, name in read_index(index)["weight_map"].items():
            if self._file_of.get(key, Path()).name != name:
                raise CheckpointError(f"{index}: maps key {key!r} to {name}, but that shard does not hold it")

    def __contains__(self, key: str) -> bool:
        return key in self.specs

    def keys(self) -> list[str]:
        return list(self.specs)

    def _tensor(self, key: str) -> torch.Tensor:
        file = self._file_of[key]
        if self._open_file != file:
            self.release()
            self._open_dict = _open_state_dict(file)
            self._open_file = file
        return self._open_dict[key]

    def release(self) -> None:
        """Unmap the open file (its resident pages leave this process once no chunk refers to them)."""
        self._open_dict = None
        self._open_file = None
        self._read_since_open = 0

    def _not_finite(self, key: str, piece: torch.Tensor, dtype: torch.dtype) -> CheckpointError:
        where = f"{self._file_of[key]}: key {key!r}"
        allow = "pass allow_non_finite (--allow-non-finite) to convert it anyway"
        if not torch.isfinite(piece).all():
            return CheckpointError(f"{where} holds NaN or infinite values; {allow}")
        return CheckpointError(
            f"{where} has values up to {float(piece.abs().max()):.6g}, beyond the range of {dtype} "
            f"({torch.finfo(dtype).max:.6g}): choose a wider --dtype, or {allow} as infinities"
        )

    def iter_bytes(
        self, key: str, dtype: torch.dtype, chunk_bytes: int = CHUNK_BYTES, allow_non_finite: bool = False
    ) -> Iterator[torch.Tensor]:
        """Yield the tensor ``key`` cast to ``dtype`` as consecutive little-endian ``uint8`` chunks (C order).

        Raises :class:`CheckpointError` once the tensor's bytes fail the CRC-32 of their zip record, and at the
        first chunk with NaN or infinite values (in the original, or after the cast) unless ``allow_non_finite``.
        """
        spec = self.specs[key]
        if spec.numel == 0:
            return
        record = self._records.get(key)
        crc = 0
        rows = spec.shape[0] if spec.shape else 1
        row_bytes = spec.numel // rows * max(spec.dtype.itemsize, dtype.itemsize)
        step = max(1, chunk_bytes // row_bytes)
        for start in range(0, rows, step):
            source = self._tensor(key)
            piece = (source.flatten(1) if source.dim() > 1 else source.reshape(-1, 1))[start : start + step]
            del source
            self._read_since_open += piece.nbytes
            if record is not None:
                crc = zlib.crc32(piece.reshape(-1).view(torch.uint8).numpy(), crc)
            cast = piece.to(dtype)
            if dtype.is_floating_point and not allow_non_finite and not torch.isfinite(cast).all():
                raise self._not_finite(key, piece, dtype)
            out = cast.contiguous().reshape(-1).view(torch.uint8)
            del piece, cast
            yield out
            del out
            if self._read_since_open >= RELEASE_AFTER_BYTES:
                self.release()
        if record is not None and crc != record.crc32:
            raise CheckpointError(
                f"{self._file_of[key]}: the data of key {key!r} ({record.name}) fails its CRC-32 check; "
                "the file is corrupt"
            )


def identify_checkpoint_kind(keys: Iterable[str]) -> tuple[str, list[str]]:
    """Guess the original model of a state dict: (``"viscpm_paint"``/``"viscpm_chat"``/``"other"``, giveaway keys)."""
    keys = list(keys)
    for kind, prefixes in KIND_SIGNATURES.items():
        hits = [k for k in keys if any(k == p or k.startswith(p) for p in prefixes)]
        if hits:
            return kind, hits
    return "other", []


def require_kind(checkpoint: OriginalCheckpoint, kind: str) -> None:
    """Refuse a checkpoint of another VisCPM model, naming what it is and which keys show it."""
    found, hits = identify_checkpoint_kind(checkpoint.keys())
    if found not in ("other", kind):
        shown = ", ".join(sorted({h.split(".")[0] + (".*" if "." in h else "") for h in hits}))
        raise CheckpointError(
            f"{checkpoint.path}: this is a {KIND_NAMES[found]} checkpoint (it has {shown} keys), not a "
            f"{KIND_NAMES[kind]} one; convert it with `{converter_command(found)}`"
        )


@dataclass(frozen=True)
class KeyRule:
    """One row of a key table: an original key that fully matches ``pattern`` becomes ``re.sub(pattern, target)``.

    ``target=None`` drops the key on purpose, and ``reason`` says why (it is reported).
    """

    pattern: str
    target: str | None
    reason: str = ""


@dataclass
class KeyMapping:
    """Result of applying a key table: target -> original key, deliberately dropped keys, unknown keys."""

    target_to_source: dict[str, str]
    dropped: dict[str, str]
    unexpected: list[str]


def map_keys(keys: Iterable[str], rules: Sequence[KeyRule], strip_prefix: str = "") -> KeyMapping:
    """Apply the first matching rule to every key (after removing ``strip_prefix``)."""
    compiled = [(re.compile(rule.pattern), rule) for rule in rules]
    mapping = KeyMapping({}, {}, [])
    for key in keys:
        name = key.removeprefix(strip_prefix)
        for regex, rule in compiled:
            match = regex.fullmatch(name)
            if match is None:
                continue
            if rule.target is None:
                mapping.dropped[key] = rule.reason
            else:
                target = match.expand(rule.target)
                if target in mapping.target_to_source:
                    raise CheckpointError(
                        f"keys {mapping.target_to_source[target]!r} and {key!r} both map to {target!r}"
                    )
                mapping.target_to_source[target] = key
            break
        else:
            mapping.unexpected.append(key)
    return mapping


def build_meta_model(model_cls: Callable[..., torch.nn.Module], config: object) -> torch.nn.Module:
    """Instantiate the target model without allocating its weights."""
    with torch.device("meta"):
        return model_cls(config)


def expected_specs(model: torch.nn.Module) -> dict[str, TensorSpec]:
    """The tensors a saved checkpoint of ``model`` holds: its state dict minus tied copies."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return {
        name: TensorSpec(tuple(tensor.shape), tensor.dtype)
        for name, tensor in model.state_dict().items()
        if name not in tied
    }


def _short_list(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def check_against_expected(
    mapping: KeyMapping, source: Mapping[str, TensorSpec], expected: Mapping[str, TensorSpec], where: str
) -> None:
    """Raise one CheckpointError listing unexpected keys, missing keys and shape mismatches."""
    problems = []
    unexpected = list(mapping.unexpected) + [
        src for tgt, src in mapping.target_to_source.items() if tgt not in expected
    ]
    if unexpected:
        problems.append(f"unexpected keys: {_short_list(sorted(unexpected))}")
    missing = sorted(set(expected) - set(mapping.target_to_source))
    if missing:
        problems.append(f"missing keys (named as in the converted model): {_short_list(missing)}")
    mismatched = sorted(
        f"{src!r} is {list(source[src].shape)}, expected {list(expected[target].shape)}"
        for target, src in mapping.target_to_source.items()
        if target in expected and source[src].shape != expected[target].shape
    )
    if mismatched:
        problems.append(f"shape mismatches: {_short_list(mismatched)}")
    if problems:
        raise CheckpointError(f"{where}: does not match the configuration: " + "; ".join(problems))


def resolve_output_dtype(specs: Iterable[TensorSpec], requested: str | torch.dtype | None) -> torch.dtype:
    """The requested dtype, or else the checkpoint's own dtype (which must then be unique)."""
    requested = parse_dtype(requested)
    if requested is not None:
        return requested
    found = sorted({spec.dtype for spec in specs}, key=str)
    if len(found) != 1:
        raise CheckpointError(
            f"the checkpoint mixes {', '.join(map(str, found))}; choose the output dtype explicitly (--dtype)"
        )
    return found[0]


def _target_dtype(expected: TensorSpec, dtype: torch.dtype) -> torch.dtype:
    return dtype if expected.dtype.is_floating_point else expected.dtype


def _write_safetensors_file(
    path: Path,
    tensors: Sequence[tuple[str, str, TensorSpec]],
    checkpoint: OriginalCheckpoint,
    progress: tqdm,
    allow_non_finite: bool,
) -> str:
    """Write ``(target name, original key, output spec)`` tensors to one safetensors file, chunk by chunk.

    Returns the file's SHA-256, computed on the bytes as they are written.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, _, spec in tensors:
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for head in (struct.pack("<Q", len(encoded)), encoded):
            f.write(head)
            digest.update(head)
        for _, source_key, spec in tensors:
            for chunk in checkpoint.iter_bytes(source_key, spec.dtype, allow_non_finite=allow_non_finite):
                data = chunk.numpy().data
                f.write(data)
                digest.update(data)
                progress.update(chunk.numel())
                del chunk, data
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def index_name(filename_pattern: str = "model{suffix}.safetensors") -> str:
    """``model.safetensors.index.json`` for the default pattern."""
    return filename_pattern.format(suffix="") + ".index.json"


def write_safetensors_shards(
    checkpoint: OriginalCheckpoint,
    target_to_source: Mapping[str, str],
    expected: Mapping[str, TensorSpec],
    output_dir: str | os.PathLike,
    dtype: torch.dtype,
    max_shard_size: int | str = "5GB",
    filename_pattern: str = "model{suffix}.safetensors",
    show_progress: bool = True,
    allow_non_finite: bool = False,
) -> dict[str, TensorSpec]:
    """Stream the mapped tensors into shards named like transformers' and write their index.

    The index is written for a single shard too: its metadata records each shard's SHA-256 (``sha256``), which
    :func:`verify_checksums` confirms. NaN or infinite values (in the original, or from an overflowing cast) are
    refused unless ``allow_non_finite``. What was written is re-read and checked (:func:`verify_safetensors_folder`)
    before returning the specs written, by target name.
    """
    output_dir = Path(output_dir)
    written = {
        name: TensorSpec(expected[name].shape, _target_dtype(expected[name], dtype))
        for name in sorted(target_to_source)
    }
    split = split_state_dict_into_shards_factory(
        written,
        get_storage_size=lambda spec: spec.nbytes,
        filename_pattern=filename_pattern,
        max_shard_size=parse_size(max_shard_size),
    )
    total = sum(spec.nbytes for spec in written.values())
    checksums = {}
    with torch.inference_mode(), tqdm(total=total, unit="B", unit_scale=True, disable=not show_progress) as bar:
        for filename, names in split.filename_to_tensors.items():
            bar.set_description(filename)
            entries = [(name, target_to_source[name], written[name]) for name in names]
            checksums[filename] = _write_safetensors_file(
                output_dir / filename, entries, checkpoint, bar, allow_non_finite
            )
            checkpoint.release()
    index = {
        "metadata": {
            "total_parameters": sum(s.numel for s in written.values()),
            "total_size": total,
            "sha256": checksums,
        },
        "weight_map": split.tensor_to_filename,
    }
    (output_dir / index_name(filename_pattern)).write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    verify_safetensors_folder(output_dir, written, filename_pattern)
    return written


def verify_safetensors_folder(
    output_dir: str | os.PathLike,
    written: Mapping[str, TensorSpec],
    filename_pattern: str = "model{suffix}.safetensors",
) -> None:
    """Re-read the headers of what was written and check names, shapes, dtypes and the index against ``written``."""
    output_dir = Path(output_dir)
    weight_map = read_index(output_dir / index_name(filename_pattern))["weight_map"]
    if set(weight_map) != set(written):
        raise RuntimeError(f"{output_dir}: the index does not list exactly the converted tensors")
    found: dict[str, TensorSpec] = {}
    for filename in sorted(set(weight_map.values())):
        path = output_dir / filename
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with contextlib.closing(mapped):
            entries, _ = read_safetensors_header(path, mapped)
        for name, info in entries.items():
            if weight_map.get(name) != filename:
                raise RuntimeError(f"{path}: holds {name!r}, which the index puts elsewhere")
            found[name] = TensorSpec(tuple(info["shape"]), _FROM_SAFETENSORS[info["dtype"]])
    if found != dict(written):
        bad = sorted(k for k in set(found) | set(written) if found.get(k) != written.get(k))
        raise RuntimeError(f"{output_dir}: written tensors differ from the plan: {_short_list(bad)}")


def verify_checksums(folder: str | os.PathLike) -> list[Path]:
    """Confirm every shard of a converted folder against the SHA-256 its index recorded; returns the shards checked.

    Every ``*.safetensors.index.json`` under ``folder`` is read (a diffusers repo has one per component). A shard
    that differs, is missing or has no recorded checksum, or a folder with no index, is a :class:`CheckpointError`
    naming the file. Call it before loading a downloaded repo to check what arrived.
    """
    folder = Path(folder)
    indexes = sorted(folder.rglob("*.safetensors.index.json"))
    if not indexes:
        raise CheckpointError(f"{folder}: holds no *.safetensors.index.json, so no checksums to confirm")
    checked = []
    for index in indexes:
        data = read_index(index)
        recorded = data.get("metadata", {}).get("sha256")
        if not isinstance(recorded, dict):
            raise CheckpointError(f"{index}: records no shard checksums (metadata.sha256)")
        for filename in sorted(set(data["weight_map"].values())):
            shard = index.parent / filename
            if not isinstance(recorded.get(filename), str):
                raise CheckpointError(f"{index}: records no checksum for {filename}")
            digest = hashlib.sha256()
            try:
                with open(shard, "rb") as f:
                    while chunk := f.read(CHUNK_BYTES):
                        digest.update(chunk)
            except OSError as e:
                raise CheckpointError(f"{shard}: cannot be read ({e})") from e
            if digest.hexdigest() != recorded[filename]:
                raise CheckpointError(f"{shard}: its SHA-256 differs from the one {index.name} records; it is corrupt")
            checked.append(shard)
    return checked


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early when the destination is a file, or a non-empty folder and ``overwrite`` is not given."""
    out = Path(output_dir).absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and not overwrite and not _is_empty_dir(out):
        raise FileExistsError(f"{out} already exists and is not empty; pass overwrite (--overwrite) to replace it")
    return out


# Siblings of an output folder that a conversion works in: `.NAME.partial-PID-ID` (being written) and
# `.NAME.replaced-PID-ID` (the previous output while the new one moves in). PID is the converting process.
_WORK_FOLDER = re.compile(r"\.(?P<name>.+)\.(?P<role>partial|replaced)-(?P<pid>\d+)-[0-9a-f]{12}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale_work_folders(out: Path) -> list[Path]:
    """Remove the work folders that converters of ``out`` left behind when killed; returns what was removed.

    Only folders whose converting process is gone are touched, so concurrent converters of the same output keep
    theirs. A previous output left as ``.replaced-`` while ``out`` is missing (killed between the two renames) is
    moved back instead of removed.
    """
    removed = []
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        match = _WORK_FOLDER.fullmatch(path.name)
        if match is None or match["name"] != out.name or _process_alive(int(match["pid"])):
            continue
        if match["role"] == "replaced" and not out.exists() and not out.is_symlink():
            with contextlib.suppress(OSError):
                os.rename(path, out)
                logger.info("restored %s from %s, left by an interrupted conversion", out, path.name)
                continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            logger.info("removed %s, left by an interrupted conversion", path)
            removed.append(path)
    return removed


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) arrived while a conversion was writing; its work folder has been removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`Interrupted` inside the block (main thread only), so cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        for sig in previous:  # a second signal must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh folder next to ``output_dir`` that becomes ``output_dir`` only if the block succeeds.

    On any exception, SIGTERM and SIGINT included, the temporary folder is removed and the destination is
    untouched; work folders of the same output left by killed converters are swept first. With ``overwrite``, an
    existing destination is replaced as a whole, and only once the new folder is complete. A symlinked
    destination keeps its link: the folder it points to is the one replaced.
    """
    out = check_output_dir(output_dir, overwrite)
    if out.is_symlink():
        out = out.resolve()
        check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_work_folders(out)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp = out.parent / f".{out.name}.partial-{tag}"
    with _signals_interrupt():
        tmp.mkdir()
        try:
            yield tmp
            check_output_dir(out, overwrite)
            if _is_empty_dir(out):
                out.rmdir()
            if out.exists():
                old = out.parent / f".{out.name}.replaced-{tag}"
                os.rename(out, old)
                try:
                    os.rename(tmp, out)
                except BaseException:
                    os.rename(old, out)
                    raise
                shutil.rmtree(old, ignore_errors=True)  # the new output is in place whatever happens to this
            else:
                os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


_MINIMAL_CARD = """---
license: $license
library_name: transformers
pipeline_tag: $pipeline_tag
tags:
- viscpm
- transformers-viscpm
---

# $title

Converted from the original OpenBMB release with transformers-viscpm. Import `transformers_viscpm` before loading.

$details
"""


# Where card templates are looked up: shipped with the package, then the source checkout's model_cards/.
MODEL_CARD_DIRS = (
    Path(__file__).resolve().parents[1] / "model_cards",
    Path(__file__).resolve().parents[3] / "model_cards",
)


def _card_template(kind: str) -> str | None:
    for folder in MODEL_CARD_DIRS:
        if (folder / f"{kind}.md").is_file():
            return (folder / f"{kind}.md").read_text(encoding="utf-8")
    return None


def write_model_card(output_dir: str | os.PathLike, kind: str, **values: object) -> Path:
    """Write ``README.md`` from ``model_cards/<kind>.md`` (``$name`` placeholders filled from ``values``).

    Templates are looked up in the installed package, then in the source checkout. Without one, a minimal card
    with YAML metadata is written (``title``, ``pipeline_tag``, ``license`` from ``values``; the rest listed).
    """
    template = _card_template(kind)
    if template is not None:
        try:
            text = string.Template(template).substitute({k: str(v) for k, v in values.items()})
        except KeyError as e:
            raise ValueError(f"model card template {kind}.md needs a value for {e.args[0]!r}") from e
    else:
        rest = {k: v for k, v in values.items() if k not in ("title", "pipeline_tag", "license")}
        text = string.Template(_MINIMAL_CARD).substitute(
            title=values.get("title", kind),
            pipeline_tag=values.get("pipeline_tag", "text-generation"),
            license=values.get("license", "apache-2.0"),
            details="\n".join(f"- {k.replace('_', ' ')}: `{v}`" for k, v in rest.items()),
        )
    path = Path(output_dir) / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, private: bool, commit_message: str) -> str:
    """Create (or reuse) ``repo_id`` and upload exactly ``folder`` in one commit; returns the commit URL."""
    import huggingface_hub

    huggingface_hub.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = huggingface_hub.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, repo_type="model"
    )
    return str(getattr(info, "commit_url", info))


def run_converter_cli(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    convert: Callable[[argparse.Namespace, dict[str, Any]], Path],
) -> int:
    """Parse a converter's command line and run it: a bad input or output is one error line and exit status 2.

    `convert(args, options)` gets the parsed arguments and the keyword arguments of the shared options
    (`add_output_arguments`). Caught: `CheckpointError` and other `ValueError`s (bad config, size, dtype),
    `TypeError`s and `StrictDataclassError`s of configs that do not validate, and `OSError`s (a missing input file,
    an existing output folder); an interruption (Ctrl-C, SIGTERM) is one line too, once the work folder is gone.
    """
    from huggingface_hub.errors import StrictDataclassError

    args = parser.parse_args(argv)
    if args.private and not args.push_to_hub:
        parser.error("--private needs --push-to-hub")
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = dict(
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        push_to_hub=args.push_to_hub,
        private=args.private,
        remote_code=args.remote_code,
        allow_non_finite=args.allow_non_finite,
        overwrite=args.overwrite,
        show_progress=not args.quiet,
    )
    try:
        out = convert(args, options)
    except (ValueError, TypeError, OSError, StrictDataclassError) as err:
        message = " ".join(str(err).split())  # one line, whatever the exception's own layout
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"{parser.prog}: interrupted; nothing was written", file=sys.stderr)
        return 128 + getattr(err, "signum", signal.SIGINT)
    print(out)
    return 0


def converter_parser(kind: str, description: str) -> argparse.ArgumentParser:
    """The argument parser of a converter, named as `viscpm convert KIND` (the scripts run the same one)."""
    return argparse.ArgumentParser(prog=converter_command(kind), description=description)


def add_output_arguments(parser: argparse.ArgumentParser, remote_code: bool = True) -> None:
    """The options every converter shares: dtype, sharding, overwrite, hub push, remote code, finiteness, progress.

    ``remote_code`` is whether the converter ships the modelling code unless told otherwise.
    """
    parser.add_argument("--dtype", choices=sorted(OUTPUT_DTYPES), help="output dtype (default: the checkpoint's)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 2GB (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder once done")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the converted folder to this hub repo")
    parser.add_argument("--private", action="store_true", help="create the hub repo as private")
    parser.add_argument(
        "--remote-code",
        action=argparse.BooleanOptionalAction,
        default=remote_code,
        help="write the modelling code into the folder, for trust_remote_code=True loading without this package "
        f"(default: {'yes' if remote_code else 'no'})",
    )
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="convert NaN / infinite weights, and values the --dtype cannot hold, instead of refusing them",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
