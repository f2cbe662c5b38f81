"""Test helpers for hub repos: offline model-card checks and a local copy of the hub cache layout.

* :func:`parse_model_card` checks a rendered card's hub metadata offline (``ModelCard.validate`` calls the hub);
  :func:`python_snippets` extracts its usage code so that tests can run it.
* :func:`add_to_hub_cache` lays a folder out exactly as ``huggingface_hub`` caches a downloaded repo
  (``models--org--name/{blobs,refs,snapshots,trees}``), so that loading by repo id works offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from huggingface_hub import ModelCard

# --------------------------------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------------------------------

_OPENBMB_LICENSE_LINK = "https://github.com/OpenBMB/General-Model-License/blob/main/"
# What the hub metadata of each card must say.
CARD_METADATA: dict[str, dict[str, object]] = {
    "cpmbee": {"library_name": "transformers", "pipeline_tag": "text-generation", "base_model": None},
    "viscpm_chat": {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "base_model": "openbmb/cpm-bee-10b",
    },
    "viscpm_paint": {
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "base_model": ["openbmb/cpm-bee-10b", "stabilityai/stable-diffusion-2-1-base"],
    },
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def parse_model_card(text: str, kind: str) -> ModelCard:
    """Parse a rendered card with ``huggingface_hub`` and check its metadata offline; raise ``ValueError`` if wrong.

    Checked: license ``other`` with ``license_name``/``license_link`` (OpenBMB's General Model License), the
    library and pipeline tag of ``kind``, languages zh and en, ``base_model``, the ``transformers-viscpm`` tag, and
    that no ``$placeholder`` is left.
    """
    problems = []
    leftover = re.findall(r"\$\{?\w+\}?", text)
    if leftover:
        problems.append(f"unfilled placeholders {sorted(set(leftover))}")
    card = ModelCard(text, ignore_metadata_errors=False)
    data = card.data
    expected = CARD_METADATA[kind]
    if data.license != "other":
        problems.append(f"license is {data.license!r}, expected 'other' (OpenBMB General Model License)")
    if data.license_name != "general-model-license":
        problems.append(f"license_name is {data.license_name!r}")
    if not str(data.license_link or "").startswith(_OPENBMB_LICENSE_LINK):
        problems.append(f"license_link {data.license_link!r} is not the OpenBMB General Model License")
    for field in ("library_name", "pipeline_tag", "base_model"):
        if getattr(data, field) != expected[field]:
            problems.append(f"{field} is {getattr(data, field)!r}, expected {expected[field]!r}")
    base_models = data.base_model if isinstance(data.base_model, list) else [data.base_model] * bool(data.base_model)
    problems += [f"base_model {b!r} is not a repo id" for b in base_models if not _REPO_ID.match(b)]
    languages = data.language if isinstance(data.language, list) else [data.language]
    if sorted(languages or []) != ["en", "zh"]:
        problems.append(f"language is {data.language!r}, expected zh and en")
    if "transformers-viscpm" not in (data.tags or []):
        problems.append(f"tags {data.tags!r} lack 'transformers-viscpm'")
    if not card.text.lstrip().startswith("# "):
        problems.append("the card body does not start with a title")
    if problems:
        raise ValueError(f"{kind} model card: " + "; ".join(problems))
    return card


def python_snippets(text: str) -> list[str]:
    """The ```` ```python ```` blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


# --------------------------------------------------------------------------------------------------------------------
# Hub cache
# --------------------------------------------------------------------------------------------------------------------

# Stored through git LFS on the hub (the default .gitattributes), so cached under their sha256.
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".gguf")
_LFS_MIN_SIZE = 10 * 2**20


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_hub_cache(
    folder: str | os.PathLike,
    repo_id: str,
    cache_dir: str | os.PathLike,
    revision: str = "main",
    tree_listing: bool = True,
) -> Path:
    """Copy ``folder`` into ``cache_dir`` as ``huggingface_hub`` caches a downloaded snapshot of ``repo_id``.

    Layout: ``models--org--name/blobs/<etag>`` (sha256 for LFS files, the git blob sha1 otherwise),
    ``snapshots/<commit>/<path>`` relative symlinks to the blobs, ``refs/<revision>`` holding the commit and, with
    ``tree_listing``, ``trees/<commit>.json`` (the listing ``snapshot_download`` records; files fetched one by one
    with ``hf_hub_download`` leave none). The commit hash is derived from the content. Returns the snapshot folder.
    """
    source = Path(folder)
    storage = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
    entries: dict[str, dict[str, object]] = {}
    blobs: dict[str, tuple[Path, str]] = {}
    for path in files:
        rel = path.relative_to(source).as_posix()
        data = path.read_bytes()
        entry: dict[str, object] = {"size": len(data), "blob_id": _git_blob_sha1(data)}
        if path.suffix in _LFS_SUFFIXES or len(data) >= _LFS_MIN_SIZE:
            entry["lfs_sha256"] = hashlib.sha256(data).hexdigest()
            entry["lfs_size"] = len(data)
        entries[rel] = entry
        blobs[rel] = (path, str(entry.get("lfs_sha256", entry["blob_id"])))
    commit = hashlib.sha1(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    snapshot = storage / "snapshots" / commit
    for rel, (path, etag) in blobs.items():
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    if tree_listing:
        (storage / "trees").mkdir(exist_ok=True)
        listing = {"format_version": 1, "files": entries}
        (storage / "trees" / f"{commit}.json").write_text(json.dumps(listing, indent=2, sort_keys=True) + "\n")
    return snapshot
