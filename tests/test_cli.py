"""The `viscpm` command line, driven in subprocesses as a user would (the demo's repos serve the other commands)."""

from __future__ import annotations

import os
import subprocess
import sys
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


def test_paint_writes_png(demo, tmp_path) -> None:
    output, _ = demo
    target = tmp_path / "out.png"
    result = viscpm(
        "paint", "--model", str(output / "converted" / "VisCPM-Paint-tiny"), "一只猫", "-o", str(target),
        "--steps", "2", "--height", "32", "--width", "32", "--seed", "3", "--negative-prompt", "狗",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(target).size == (32, 32)


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
