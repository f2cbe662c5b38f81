"""conversion/verify.py: fixed-input checks of converted repos, and the comparison with the original when present."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ahocorasick_rs
import pytest
from _repos import converted_repo

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_PYTHON = Path("/tmp/viscpm-ref/bin/python")
# The CPU shim of the original (`original_on_cpu`), in the workspace's shared reference folder when there is one.
REFERENCE_SHIM = ROOT.parent / "shared" / "reference"


def _verify(python: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, str(ROOT / "conversion" / "verify.py"), *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.parametrize(
    ("kind", "flag", "output"), [("cpmbee", "cpmbee", "logits"), ("viscpm_paint", "paint", "pixels")]
)
def test_reports_the_converted_outputs_without_the_original(
    tmp_path_factory: pytest.TempPathFactory, kind: str, flag: str, output: str
) -> None:
    repo = converted_repo(tmp_path_factory, kind, remote_code=True)
    result = _verify(sys.executable, "--original", "unused.pt", "--converted", str(repo), "--kind", flag, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["kind"] == kind and report["output"] == output
    assert report["shards_verified"] == (1 if kind == "cpmbee" else 3)  # Paint: text encoder, UNet, VAE
    assert report["original"] == "the VisCPM package is not importable" and report["max_abs_diff"] is None
    assert len(report["sha256"]) == 64 and report["abs_max"] > 0
    if kind == "cpmbee":
        assert report["shape"][0] == 1 and report["shape"][2] > 86583  # vocabulary + the prompt's ext table
    else:
        assert report["shape"] == [1, 3, 32, 32] and 0 <= report["abs_max"] <= 1
    again = _verify(sys.executable, "--original", "x", "--converted", str(repo), "--kind", flag, "--json")
    assert json.loads(again.stdout)["sha256"] == report["sha256"]  # a fixed input gives fixed numbers


# Appended to the repo's shipped code: importing it leaves a mark.
_MARK = "\nopen(__import__('os').environ['REPO_CODE_RAN'], 'w').close()\n"


def test_runs_the_repos_own_code_only_when_trusted(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    repo = Path(shutil.copytree(converted_repo(tmp_path_factory, "cpmbee", remote_code=True), tmp_path / "repo"))
    for path in repo.glob("*.py"):
        path.write_text(path.read_text(encoding="utf-8") + _MARK, encoding="utf-8")
    mark = tmp_path / "ran"
    env = {**os.environ, "REPO_CODE_RAN": str(mark), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    args = ["--original", "x", "--converted", str(repo), "--kind", "cpmbee", "--json"]
    plain = _verify(sys.executable, *args, env=env)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert not mark.exists()  # the plugin's classes ran, never the repo's files
    trusted = _verify(sys.executable, *args, "--trust-remote-code", env=env)
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert mark.exists()
    assert json.loads(trusted.stdout)["sha256"] == json.loads(plain.stdout)["sha256"]  # the shipped code agrees


def test_a_corrupt_shard_fails_verification(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    repo = Path(shutil.copytree(converted_repo(tmp_path_factory, "cpmbee", remote_code=False), tmp_path / "repo"))
    shard = repo / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    result = _verify(sys.executable, "--original", "x", "--converted", str(repo), "--kind", "cpmbee")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (
        f"verify: error: {shard}: its SHA-256 differs from the one model.safetensors.index.json records; it is corrupt"
    )


needs_reference = pytest.mark.skipif(
    not (REFERENCE_PYTHON.exists() and (REFERENCE_SHIM / "original_on_cpu.py").exists()),
    reason="the reference venv (/tmp/viscpm-ref) or ../shared/reference is not here",
)


def _reference_env(tmp_path: Path) -> dict:
    # The reference venv has the original but not our dependencies: lend it ours (same Python version).
    (tmp_path / "ahocorasick_rs").symlink_to(Path(ahocorasick_rs.__file__).parent)
    paths = [ROOT / "src", REFERENCE_SHIM, tmp_path]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths))}


@needs_reference
def test_compares_with_the_original_and_fails_beyond_tolerance(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    repo = converted_repo(tmp_path_factory, "cpmbee", remote_code=False)
    original = repo.parent / "cpm-bee-10b.pt"
    env = _reference_env(tmp_path)
    args = ["--original", str(original), "--converted", str(repo), "--kind", "cpmbee"]
    args += ["--original-config", str(repo.parent / "cpm-bee-10b.json")]
    result = _verify(str(REFERENCE_PYTHON), *args, "--json", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["original"].startswith("VisCPM ") and report["max_abs_diff"] < 1e-4
    strict = _verify(str(REFERENCE_PYTHON), *args, "--tolerance", "1e-9", env=env)
    assert strict.returncode == 1 and "exceeds the tolerance" in strict.stderr
    assert "max abs logits difference" in strict.stdout


@needs_reference
@pytest.mark.parametrize(
    ("kind", "flag", "checkpoint", "output"),
    [
        ("viscpm_chat", "chat", "viscpm_chat_balance_checkpoint.pt", "logits"),
        ("viscpm_paint", "paint", "viscpm_paint_balance_checkpoint.pt", "pixels"),
    ],
)
def test_compares_chat_and_paint_with_the_original(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, kind: str, flag: str, checkpoint: str, output: str
) -> None:
    # The original is built from the checkpoint and the repo's sizes (no --original-config), and for Paint the
    # repo's VAE and scheduler, which the original checkpoint lacks.
    repo = converted_repo(tmp_path_factory, kind, remote_code=False)
    env = _reference_env(tmp_path)
    args = ["--original", str(repo.parent / checkpoint), "--converted", str(repo), "--kind", flag]
    result = _verify(str(REFERENCE_PYTHON), *args, "--json", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["kind"] == kind and report["output"] == output
    assert report["original"].startswith("VisCPM ") and report["max_abs_diff"] < 1e-4
    if kind == "viscpm_paint":
        assert report["shape"] == [1, 3, 32, 32]
    strict = _verify(str(REFERENCE_PYTHON), *args, "--tolerance", "0", env=env)
    if float(strict.stdout.rsplit(" ", 1)[-1]) > 0:
        assert strict.returncode == 1 and "exceeds the tolerance" in strict.stderr
    assert f"max abs {output} difference" in strict.stdout
