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
import json
import logging
import mmap
import os
import pickle
import re
import shutil
import string
import struct
import sys
import uuid
import zipfile
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
# The pickle that torch's legacy (pre-zip) format starts with: protocol 2, then the magic number as a LONG1.
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"

# Keys that give away which original model a checkpoint belongs to, for a clear "wrong converter" error.
KIND_SIGNATURES: dict[str, tuple[str, ...]] = {
    "viscpm_paint": ("unet.", "trans_block."),
    "viscpm_chat": ("vpm.", "query", "mapping."),
}
KIND_NAMES = {"cpmbee": "CPM-Bee", "viscpm_chat": "VisCPM-Chat", "viscpm_paint": "VisCPM-Paint"}


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


def _open_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors as zero-copy views of a private mmap, as ``torch.load(mmap=True)`` gives."""
    to_torch = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
    try:
        with open(path, "rb") as f:
            # Copy-on-write, so that torch accepts the buffer; nothing is ever written to it.
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        (header_size,) = struct.unpack("<Q", mapped[:8])
        header = json.loads(mapped[8 : 8 + header_size])
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = to_torch[info["dtype"]]
            begin, end = info["data_offsets"]
            count = (end - begin) // dtype.itemsize
            offset = 8 + header_size + begin
            flat = (
                torch.frombuffer(mapped, dtype=dtype, count=count, offset=offset)
                if count
                else torch.empty(0, dtype=dtype)
            )
            tensors[name] = flat.view(info["shape"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    return tensors


def _open_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Open one file memory-mapped (``torch.load`` weights-only, or safetensors), failures as a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return _open_safetensors(path)
    if not zipfile.is_zipfile(path):
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
    except (RuntimeError, EOFError, OSError, ValueError) as e:
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


def _checkpoint_files(path: Path) -> list[Path]:
    """The files of a checkpoint: the file itself, or a directory's ``pytorch_model*.bin`` shards."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid index file ({e})") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
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
    re-opening the file periodically so that the pages read so far stop counting against this process.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.files = _checkpoint_files(self.path)
        self.specs: dict[str, TensorSpec] = {}
        self._file_of: dict[str, Path] = {}
        for file in self.files:
            for key, tensor in _open_state_dict(file).items():
                if key in self._file_of:
                    raise CheckpointError(f"{file}: key {key!r} is also in {self._file_of[key]}")
                if tensor.dtype not in SUPPORTED_DISK_DTYPES:
                    raise CheckpointError(
                        f"{file}: key {key!r} is stored as {tensor.dtype}, which is not a supported weight dtype "
                        f"({', '.join(str(d) for d in SUPPORTED_DISK_DTYPES)})"
                    )
                self.specs[key] = TensorSpec(tuple(tensor.shape), tensor.dtype)
                self._file_of[key] = file
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
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        for key, name in weight_map.items():
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

    def iter_bytes(self, key: str, dtype: torch.dtype, chunk_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
        """Yield the tensor ``key`` cast to ``dtype`` as consecutive little-endian ``uint8`` chunks (C order)."""
        spec = self.specs[key]
        if spec.numel == 0:
            return
        rows = spec.shape[0] if spec.shape else 1
        row_bytes = spec.numel // rows * max(spec.dtype.itemsize, dtype.itemsize)
        step = max(1, chunk_bytes // row_bytes)
        for start in range(0, rows, step):
            source = self._tensor(key)
            piece = (source.flatten(1) if source.dim() > 1 else source.reshape(-1, 1))[start : start + step]
            del source
            self._read_since_open += piece.nbytes
            out = piece.to(dtype).contiguous().reshape(-1).view(torch.uint8)
            del piece
            yield out
            del out
            if self._read_since_open >= RELEASE_AFTER_BYTES:
                self.release()


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
            f"{KIND_NAMES[kind]} one; convert it with convert_{found}"
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
    for target, src in mapping.target_to_source.items():
        if target in expected and source[src].shape != expected[target].shape:
            problems.append(
                f"key {src!r} has shape {list(source[src].shape)}, expected {list(expected[target].shape)}"
            )
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
) -> None:
    """Write ``(target name, original key, output spec)`` tensors to one safetensors file, chunk by chunk."""
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
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for _, source_key, spec in tensors:
            for chunk in checkpoint.iter_bytes(source_key, spec.dtype):
                f.write(chunk.numpy().data)
                progress.update(chunk.numel())
                del chunk
        f.flush()
        os.fsync(f.fileno())


def write_safetensors_shards(
    checkpoint: OriginalCheckpoint,
    target_to_source: Mapping[str, str],
    expected: Mapping[str, TensorSpec],
    output_dir: str | os.PathLike,
    dtype: torch.dtype,
    max_shard_size: int | str = "5GB",
    filename_pattern: str = "model{suffix}.safetensors",
    show_progress: bool = True,
) -> dict[str, TensorSpec]:
    """Stream the mapped tensors into shards named like transformers' (plus the index when there are several).

    What was written is re-read and checked (:func:`verify_safetensors_folder`) before returning the specs written,
    by target name.
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
    with torch.inference_mode(), tqdm(total=total, unit="B", unit_scale=True, disable=not show_progress) as bar:
        for filename, names in split.filename_to_tensors.items():
            bar.set_description(filename)
            entries = [(name, target_to_source[name], written[name]) for name in names]
            _write_safetensors_file(output_dir / filename, entries, checkpoint, bar)
            checkpoint.release()
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": sum(s.numel for s in written.values()), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        index_name = filename_pattern.format(suffix="") + ".index.json"
        (output_dir / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    verify_safetensors_folder(output_dir, written, filename_pattern)
    return written


def verify_safetensors_folder(
    output_dir: str | os.PathLike,
    written: Mapping[str, TensorSpec],
    filename_pattern: str = "model{suffix}.safetensors",
) -> None:
    """Re-read the headers of what was written and check names, shapes, dtypes and the index against ``written``."""
    from safetensors import safe_open

    output_dir = Path(output_dir)
    single = output_dir / filename_pattern.format(suffix="")
    index_path = output_dir / (filename_pattern.format(suffix="") + ".index.json")
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    else:
        weight_map = dict.fromkeys(written, single.name)
    if set(weight_map) != set(written):
        raise RuntimeError(f"{output_dir}: the index does not list exactly the converted tensors")
    found: dict[str, TensorSpec] = {}
    for filename in sorted(set(weight_map.values())):
        with safe_open(output_dir / filename, framework="pt") as f:
            for name in f.keys():
                if weight_map.get(name) != filename:
                    raise RuntimeError(f"{output_dir / filename}: holds {name!r}, which the index puts elsewhere")
                sl = f.get_slice(name)
                found[name] = TensorSpec(
                    tuple(sl.get_shape()), getattr(torch, _dtype_from_safetensors(sl.get_dtype()))
                )
    if found != dict(written):
        bad = sorted(k for k in set(found) | set(written) if found.get(k) != written.get(k))
        raise RuntimeError(f"{output_dir}: written tensors differ from the plan: {_short_list(bad)}")


def _dtype_from_safetensors(name: str) -> str:
    return {v: str(k).removeprefix("torch.") for k, v in _SAFETENSORS_DTYPES.items()}[name]


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


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh folder next to ``output_dir`` that becomes ``output_dir`` only if the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and the destination is untouched.
    With ``overwrite``, an existing destination is replaced as a whole, and only once the new folder is complete.
    """
    out = check_output_dir(output_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        check_output_dir(out, overwrite)
        if _is_empty_dir(out):
            out.rmdir()
        if out.exists():
            old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:12]}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old)
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
    """Parse a converter's command line and run it: a bad input or output is one `error:` line and exit status 1.

    `convert(args, options)` gets the parsed arguments and the keyword arguments of the shared options
    (`add_output_arguments`). Caught: `CheckpointError` and other `ValueError`s (bad config, size, dtype),
    `TypeError`s and `StrictDataclassError`s of configs that do not validate, and `OSError`s (a missing input file,
    an existing output folder).
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
        overwrite=args.overwrite,
        show_progress=not args.quiet,
    )
    try:
        out = convert(args, options)
    except (ValueError, TypeError, OSError, StrictDataclassError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every converter shares: output dtype, sharding, overwrite, hub push, remote code, progress."""
    parser.add_argument("--dtype", choices=sorted(OUTPUT_DTYPES), help="output dtype (default: the checkpoint's)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 2GB (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder once done")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the converted folder to this hub repo")
    parser.add_argument("--private", action="store_true", help="create the hub repo as private")
    parser.add_argument(
        "--remote-code", action="store_true", help="also write the modelling code (trust_remote_code loading)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
