"""The `viscpm` command line, driven in subprocesses as a user would (the demo's repos serve the other commands)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def viscpm(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "transformers_viscpm", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    output = tmp_path_factory.mktemp("demo")
    return output, viscpm("demo", "--output", str(output), timeout=600)


def test_demo_runs_everything(demo) -> None:
    output, result = demo
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "RANDOM weights" in out
    for piece in ("CpmBeeForCausalLM", "VisCPMChatForConditionalGeneration", "VisCPMPaintPipeline"):
        assert f"loaded {piece}" in out
    assert out.count("User: ") == 2 and out.count("AI: ") == 2
    image = Image.open(output / "paint.png")
    assert image.size == (256, 256) and len(image.getcolors(maxcolors=1 << 16) or range(2)) > 1
    assert (output / "converted" / "VisCPM-Chat-tiny" / "config.json").is_file()


def test_chat_one_shot_and_repl(demo, tmp_path) -> None:
    output, _ = demo
    repo, image = output / "converted" / "VisCPM-Chat-tiny", output / "chat_input.png"
    one_shot = viscpm("chat", "--model", str(repo), str(image), "--question", "图里有什么？", "--max-new-tokens", "6")
    assert one_shot.returncode == 0, one_shot.stderr[-3000:]
    assert one_shot.stdout.strip()
    repl = viscpm("chat", "--model", str(repo), str(image), "--max-new-tokens", "6", stdin="What is it?\nAnd now?\n\n")
    assert repl.returncode == 0, repl.stderr[-3000:]
    assert repl.stdout.count("User: ") == 3  # two questions, then the empty line that ends the chat
    assert repl.stdout.count("AI: ") == 2


def test_paint_writes_png_at_the_models_own_size(demo, tmp_path) -> None:
    output, _ = demo
    repo = output / "converted" / "VisCPM-Paint-tiny"
    unet = json.loads((repo / "unet" / "config.json").read_text())
    vae = json.loads((repo / "vae" / "config.json").read_text())
    size = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    target = tmp_path / "out.png"
    result = viscpm(
        "paint", "--model", str(repo), "一只猫", "-o", str(target), "--steps", "2", "--seed", "3",
        "--negative-prompt", "狗",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(target).size == (size, size)
    assert "torch_dtype" not in result.stderr and "`accelerate`" not in result.stderr


@pytest.mark.parametrize(
    "command", [[], ["demo"], ["convert", "cpmbee"], ["convert", "chat"], ["convert", "paint"], ["chat"], ["paint"]]
)
def test_help(command: list[str]) -> None:
    result = viscpm(*command, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["chat", "--model", "/nonexistent/model", "/nonexistent.png"], "image not found"),
        (["paint", "--model", "/nonexistent/model", "a cat", "-o", "x.png"], "model not found"),
        (
            ["convert", "cpmbee", "--checkpoint", "/nonexistent.pt", "--config", "/nonexistent.json", "--output", "o"],
            "error",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], message: str) -> None:
    result = viscpm(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_unreadable_image(demo, tmp_path) -> None:
    output, _ = demo
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = viscpm("chat", "--model", str(output / "converted" / "VisCPM-Chat-tiny"), str(bad), "--question", "q")
    assert result.returncode == 2 and "cannot read image" in result.stderr and "Traceback" not in result.stderr


def test_help_imports_neither_torch_nor_transformers() -> None:
    """`viscpm --help` and argument errors answer at once: nothing heavy is imported (timed in bench_cli.py)."""
    for args in (["--help"], ["paint", "--model", "org/repo", "a", "-o", "x.png", "--steps", "0"]):
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "transformers_viscpm", *args],
            capture_output=True, text=True, timeout=120, env=ENV,
        )  # fmt: skip
        imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
        assert {"torch", "transformers", "diffusers", "numpy"}.isdisjoint(imported), sorted(imported)


def test_library_import_still_registers_everything() -> None:
    code = "import transformers_viscpm, diffusers; from transformers import AutoConfig; print(AutoConfig.for_model('viscpm_chat').__class__.__name__, hasattr(diffusers, 'VisCPMPaintPipeline'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)
    assert result.stdout.split() == ["VisCPMChatConfig", "True"], result.stderr[-2000:]


def test_demo_writes_to_the_cache_folder_by_default(monkeypatch, tmp_path) -> None:
    from transformers_viscpm.cli import build_parser, default_demo_folder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_demo_folder() == tmp_path / "transformers_viscpm" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_demo_folder() == tmp_path / "home" / ".cache" / "transformers_viscpm" / "demo"
    assert build_parser().parse_args(["demo"]).output is None


FAST_USER_ERRORS = [
    (["chat", "--model", "org/repo", "x.png", "--max-new-tokens", "-1"], "--max-new-tokens: expected a positive"),
    (["chat", "--model", "org/repo", "x.png", "--max-new-tokens", "ten"], "--max-new-tokens: expected a positive"),
    (["paint", "--model", "org/repo", "a", "-o", "x.png", "--steps", "0"], "--steps: expected a positive"),
    (["paint", "--model", "org/repo", "a", "-o", "x.png", "--height", "0"], "--height: expected a positive"),
    (["paint", "--model", "org/repo", "a", "-o", "x.png", "--width", "-64"], "--width: expected a positive"),
    (["paint", "--model", "org/repo", "a", "-o", "x.png", "--guidance", "nan"], "--guidance: expected a finite"),
    (["paint", "--model", "org/repo", "a", "-o", "x.bogus"], "unknown extension '.bogus'"),
    (["paint", "--model", "org/repo", "a", "-o", "noextension"], "unknown extension ''"),
    (["paint", "--model", "org/repo", "a", "-o", "/nonexistent/dir/x.png"], "output folder does not exist"),
    (["paint", "--model", "/nonexistent/model", "a", "-o", "x.png"], "model not found"),
    (["chat", "--model", "not a repo id", "/nonexistent.png"], "image not found"),
    (["bogus-command"], "invalid choice"),
    (["paint", "--model", "org/repo"], "required"),
]


@pytest.mark.parametrize(("args", "message"), FAST_USER_ERRORS, ids=[" ".join(a)[:60] for a, _ in FAST_USER_ERRORS])
def test_user_errors_are_one_line_exit_2_before_loading(args: list[str], message: str, tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "transformers_viscpm", *args],
        capture_output=True, text=True, timeout=120, env=ENV, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_wrong_kind_of_repo_says_what_it_is(demo, tmp_path) -> None:
    output, _ = demo
    repos = output / "converted"
    cases = [
        (["chat", "--model", str(repos / "cpm-bee-tiny"), str(output / "chat_input.png")], "is a CPM-Bee repo; `viscpm chat` needs a VisCPM-Chat repo"),
        (["chat", "--model", str(repos / "VisCPM-Paint-tiny"), str(output / "chat_input.png")], "is a VisCPM-Paint repo; `viscpm chat` needs a VisCPM-Chat repo"),
        (["paint", "--model", str(repos / "VisCPM-Chat-tiny"), "a", "-o", str(tmp_path / "x.png")], "is a VisCPM-Chat repo; `viscpm paint` needs a VisCPM-Paint repo"),
    ]  # fmt: skip
    for args, message in cases:
        result = viscpm(*args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_device_and_size_errors_after_loading_are_one_line(demo, tmp_path) -> None:
    import torch

    output, _ = demo
    paint = [str(output / "converted" / "VisCPM-Paint-tiny"), "a", "-o", str(tmp_path / "x.png"), "--steps", "1"]
    cases = [(["--device", "bogus"], "unknown --device 'bogus'"), (["--height", "33"], "divisible")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda is not available here"))
    for extra, message in cases:
        result = viscpm("paint", "--model", *paint, *extra)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and not (tmp_path / "x.png").exists()


def test_ctrl_c_during_start_up_is_one_line_exit_130(tmp_path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "transformers_viscpm", "demo", "--output", str(tmp_path / "demo")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    time.sleep(4)  # past the light CLI start, into the heavy imports (or the demo itself)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "viscpm: interrupted"


def test_ctrl_c_swallowed_by_a_finalizer_still_interrupts() -> None:
    """Python swallows a Ctrl-C that lands inside a `__del__` ("Exception ignored in ..."; the start-up test above
    hit one in `regex`): the CLI delivers it again, so the command is interrupted all the same."""
    script = (
        "import time\n"
        "from transformers_viscpm import cli\n"
        "cli._redeliver_swallowed_interrupts()\n"
        "class Finalized:\n"
        "    def __del__(self):\n"
        "        raise KeyboardInterrupt\n"
        "try:\n"
        "    Finalized()\n"
        "    time.sleep(1)\n"
        "    print('ran on')\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=60)
    assert result.stdout.strip() == "interrupted", result.stderr[-2000:]
    assert "Exception ignored" not in result.stderr


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantize_chat_and_paint(demo, tmp_path, bits) -> None:
    """`--quantize` loads VisCPM-Chat, and Paint's text encoder, through the same quantization configs."""
    pytest.importorskip("torchao")
    pytest.importorskip("optimum.quanto")
    output, _ = demo
    repo, image = output / "converted" / "VisCPM-Chat-tiny", output / "chat_input.png"
    chat = viscpm("chat", "--model", str(repo), str(image), "--question", "图里有什么？", "--max-new-tokens", "4",
                  "--quantize", bits)  # fmt: skip
    assert chat.returncode == 0, chat.stderr[-3000:]
    target = tmp_path / "out.png"
    paint = viscpm("paint", "--model", str(output / "converted" / "VisCPM-Paint-tiny"), "一只猫", "-o", str(target),
                   "--steps", "2", "--height", "32", "--width", "32", "--quantize", bits)  # fmt: skip
    assert paint.returncode == 0, paint.stderr[-3000:]
    assert Image.open(target).size == (32, 32)


def test_demo_repos_can_be_built_again(tmp_path) -> None:
    """A second `viscpm demo` (README's first command, run twice) replaces its own repos instead of failing."""
    from transformers_viscpm.demo import build_chat_repo, build_paint_repo

    originals, repos = tmp_path / "originals", tmp_path / "converted"
    originals.mkdir()
    for _ in range(2):
        assert (build_chat_repo(originals, repos) / "config.json").is_file()
        assert (build_paint_repo(originals, repos) / "model_index.json").is_file()
