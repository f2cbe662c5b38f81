"""Converted repos as hub repos: the cache layout, loading by repo id with the plugin, and --push-to-hub."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import huggingface_hub
import pytest
from _hub_cache import parse_model_card, python_snippets
from _repos import REPO_IDS, converted_repo, hub_cache, offline_env, run_python
from huggingface_hub import scan_cache_dir

from transformers_viscpm.conversion.convert_cpmbee import main as convert_cpmbee_main


def test_cache_layout_is_huggingface_hubs(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = hub_cache(tmp_path_factory, remote_code=False)
    info = scan_cache_dir(cache)
    assert not info.warnings
    assert {repo.repo_id for repo in info.repos} == set(REPO_IDS.values())
    for repo in info.repos:
        (revision,) = repo.revisions
        assert revision.refs == frozenset({"main"}) and len(revision.commit_hash) == 40
        storage = cache / f"models--{repo.repo_id.replace('/', '--')}"
        assert (storage / "trees" / f"{revision.commit_hash}.json").is_file()
        for file in revision.files:
            assert file.file_path.is_symlink() and not os.path.isabs(os.readlink(file.file_path))
            assert file.blob_path.parent == storage / "blobs"
    safetensors = next(
        f for r in info.repos for f in next(iter(r.revisions)).files if f.file_name.endswith(".safetensors")
    )
    assert safetensors.blob_path.name == hashlib.sha256(safetensors.blob_path.read_bytes()).hexdigest()  # LFS etag


LOAD = """
import json
import transformers_viscpm  # noqa: F401
import torch
from diffusers import DiffusionPipeline
from transformers import (
    AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
    AutoTokenizer,
)

loaded = {
    "cpmbee": [AutoConfig, AutoTokenizer, AutoModel, AutoModelForCausalLM],
    "chat": [AutoConfig, AutoTokenizer, AutoModel, AutoModelForImageTextToText, AutoProcessor, AutoImageProcessor],
}
names = {}
for kind, repo in (("cpmbee", "openbmb/cpm-bee-10b"), ("chat", "openbmb/VisCPM-Chat")):
    names[kind] = [type(auto.from_pretrained(repo)).__name__ for auto in loaded[kind]]
pipe = DiffusionPipeline.from_pretrained("openbmb/VisCPM-Paint")
names["paint"] = [type(pipe).__name__, type(pipe.text_encoder).__name__, type(pipe.tokenizer).__name__]
print(json.dumps(names))
"""


def test_load_by_repo_id_with_the_plugin(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    env = offline_env(hub_cache(tmp_path_factory, remote_code=False), tmp_path / "modules")
    assert run_python(LOAD, env, tmp_path) == {
        "cpmbee": ["CpmBeeConfig", "CpmBeeTokenizer", "CpmBeeModel", "CpmBeeForCausalLM"],
        "chat": [
            "VisCPMChatConfig",
            "CpmBeeTokenizer",
            "VisCPMChatForConditionalGeneration",
            "VisCPMChatForConditionalGeneration",
            "VisCPMChatProcessor",
            "VisCPMChatImageProcessor",
        ],
        "paint": ["VisCPMPaintPipeline", "VisCPMPaintTextEncoder", "CpmBeeTokenizer"],
    }


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_push_to_hub_uploads_the_validated_folder(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = converted_repo(tmp_path_factory, "cpmbee", remote_code=False).parent / "cpm-bee-10b.pt"
    calls = []

    def create_repo(repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        calls.append(("upload_folder", kwargs["repo_id"], _digest(folder)))
        # what is uploaded is a valid card whose snippet names the pushed repo
        card = (folder / "README.md").read_text(encoding="utf-8")
        parse_model_card(card, "cpmbee")
        assert 'from_pretrained("someone/cpm-bee-tiny")' in python_snippets(card)[0]
        return "https://huggingface.co/someone/cpm-bee-tiny/commit/0"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(original), "--config", str(original.with_suffix(".json")), "--output", str(out)]
    assert convert_cpmbee_main([*argv, "--push-to-hub", "someone/cpm-bee-tiny", "--private", "--quiet"]) == 0
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1:] == ("someone/cpm-bee-tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[1][1] == "someone/cpm-bee-tiny"
    assert calls[1][2] == _digest(out)  # exactly the finished output folder, nothing else
    assert {"config.json", "model.safetensors", "README.md", "vocab.txt"} <= set(calls[1][2])
