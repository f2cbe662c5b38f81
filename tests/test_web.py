"""`viscpm web` in a real browser: the app runs in a subprocess on a free localhost port (the embedded tiny demo
models, built on first use into a temporary cache) and headless Chromium drives it through Playwright.

The page's answers are compared with what the models answer alone, computed here without the app. Screenshots go
to `$VISCPM_WEB_SCREENSHOTS` (default: a temporary folder).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

from transformers_viscpm.demo import demo_picture

try:  # the `web` extra; the browser test needs it, the test above does not
    import gradio  # noqa: F401
    from playwright.sync_api import expect, sync_playwright
except ImportError as err:
    MISSING: str | None = f"{err.name} (pip install -e '.[web,test]')"
else:
    MISSING = (
        None
        if Path(shutil.which("chromium") or "/usr/bin/chromium").exists()
        else "chromium (apt-get install chromium)"
    )

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
WAIT_MS = int(os.environ.get("WAIT_MS", 240_000))  # generous: CI machines are small and loaded
QUESTIONS = ("图里有什么？", "What colour is the sun?")
MAX_NEW_TOKENS = 24  # the settings panel's start value for the embedded models


def test_web_without_gradio_says_what_to_install() -> None:
    code = textwrap.dedent(
        """\
        import sys

        class _HideGradio:
            def find_spec(self, name, path=None, target=None):
                if name == "gradio" or name.startswith("gradio."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name="gradio")
                return None

        sys.meta_path.insert(0, _HideGradio())
        from transformers_viscpm.cli import main

        sys.exit(main(["web"]))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    ours = [line for line in result.stderr.splitlines() if line.startswith("viscpm")]
    assert ours == ['viscpm: error: viscpm web needs gradio: pip install "transformers-viscpm[web]"']


def test_web_with_a_missing_model_is_one_line(tmp_path) -> None:
    env = {**os.environ, "VISCPM_WEB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    missing = str(tmp_path / "no-such-model")
    result = subprocess.run(
        [sys.executable, "-m", "transformers_viscpm", "web", "--chat-model", missing, "--paint-model", missing],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    ours = [line for line in result.stderr.splitlines() if line.startswith("viscpm")]
    assert ours == [f"viscpm: error: model not found: {missing} (give a converted folder or a hub repo id)"]
    assert not (tmp_path / "cache").exists()  # nothing built when both models are given


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("VISCPM_WEB_SCREENSHOTS") or tmp_path_factory.mktemp("web-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, shots) -> dict:
    """`python -m transformers_viscpm web` with an empty model cache; yields its URL, cache and start-up time."""
    if MISSING is not None:
        pytest.skip(f"the browser test needs {MISSING}")
    cache = tmp_path_factory.mktemp("web-cache") / "demo"
    port = _free_port()
    env = {**os.environ, "VISCPM_WEB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = (shots / "server.log").open("w")
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "transformers_viscpm", "web", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, (shots / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the web app did not start"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield {"url": url, "cache": cache, "startup_s": time.perf_counter() - start}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(server):
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def models(server):
    """The served models, loaded here from the cache the app built, for the answers they give alone."""
    from transformers_viscpm.web import load_models

    return load_models(str(server["cache"] / "VisCPM-Chat-tiny"), str(server["cache"] / "VisCPM-Paint-tiny"))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("web-pictures")
    paths = {
        name: folder / f"{name}.png" for name in ("landscape", "mirrored", "not_an_image", "truncated", "big", "huge")
    }
    demo_picture().save(paths["landscape"])
    ImageOps.mirror(demo_picture()).save(paths["mirrored"])
    paths["not_an_image"].write_bytes(b"this is text, not a PNG\n" * 20)
    paths["truncated"].write_bytes(paths["landscape"].read_bytes()[:300])  # a valid header, then the file ends
    # 1x1 PNGs whose headers claim 8,000^2 pixels (over our limit) and 20,000^2 (a decompression bomb to PIL too)
    for name, side in (("big", 8_000), ("huge", 20_000)):
        buffer = io.BytesIO()
        Image.new("L", (1, 1)).save(buffer, "PNG")
        data = bytearray(buffer.getvalue())
        data[16:24] = struct.pack(">II", side, side)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
        paths[name].write_bytes(bytes(data))
    return paths


def _beam_answer(models, image: Image.Image, question: str) -> tuple[str, str, torch.Tensor]:
    return models.chat_model.chat(image, question, processor=models.processor, max_new_tokens=MAX_NEW_TOKENS)


def _greedy_answer(models, question: str, context: str, vision: torch.Tensor) -> str:
    processor, model = models.processor, models.chat_model
    inputs, infos = processor.encode(text=question, context=context)
    output = model.generate(
        **inputs,
        vision_hidden_states=vision,
        do_sample=False,
        num_beams=1,
        max_new_tokens=MAX_NEW_TOKENS,
        repetition_penalty=models.beam_settings.repetition_penalty,  # the settings panel's value, shared by both modes
    )
    new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
    return processor.tokenizer.decode(new_tokens, skip_special_tokens=True, ext_table=dict(infos[0].ext_table))


def _flat(text: str) -> str:
    return " ".join(text.split())


def _open(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(server["url"], timeout=WAIT_MS)
    expect(page.locator("#random-notice")).to_contain_text("Random weights")
    return context, page


def _upload(page, path: Path) -> None:
    page.locator("input[type=file]").first.set_input_files(str(path))


def _ask(page, question: str) -> None:
    page.get_by_label("问题 Question").fill(question)
    page.get_by_role("button", name="发送 Send").click()


def _toast(page, text: str) -> None:
    expect(page.locator(".toast-body").filter(has_text=text).first).to_be_visible()
    for close in page.locator(".toast-close").all():  # dismiss, so that later toasts are told apart
        close.click()


def test_chat_two_turns_and_bad_input(browser, server, models, pictures, shots) -> None:
    # built on first use, moved into place whole: the two repos and no leftover temporary folder
    assert [path.name for path in server["cache"].parent.iterdir()] == ["demo"]
    assert sorted(path.name for path in server["cache"].iterdir()) == ["VisCPM-Chat-tiny", "VisCPM-Paint-tiny"]
    context, page = _open(browser, server)
    bot = page.locator("#chatbot [data-testid=bot]")

    _upload(page, pictures["not_an_image"])
    _toast(page, "Not an image we can read: not_an_image.png")
    _upload(page, pictures["truncated"])
    _toast(page, "Not an image we can read: truncated.png")
    _upload(page, pictures["big"])
    _toast(page, "Image too large: 8000 x 8000 pixels (at most 40,000,000 pixels)")
    _upload(page, pictures["huge"])
    _toast(page, "Image too large: Image size (400000000 pixels) exceeds limit")
    page.screenshot(path=shots / "chat-bad-image.png")

    _upload(page, pictures["landscape"])
    expect(page.locator("#chat-status")).to_contain_text("Image ready (224 x 224)")
    _ask(page, "")
    _toast(page, "Please enter a question")
    _ask(page, "长" * 10_000)
    _toast(page, "Question too long: 10,000 characters")
    assert bot.count() == 0

    # turn 1: the original beam search, shown once decided
    image = Image.open(pictures["landscape"]).convert("RGB")
    answer1, context1, vision = _beam_answer(models, image, QUESTIONS[0])
    start = time.perf_counter()
    _ask(page, QUESTIONS[0])
    expect(bot.last).to_have_text(re.compile(re.escape(_flat(answer1))))
    beam_s = time.perf_counter() - start

    # turn 2: greedy, streamed, over the same vision features and the first turn's context
    answer2 = _greedy_answer(models, QUESTIONS[1], context1, vision)
    assert answer2.strip(), "the tiny model should give a non-empty greedy answer"
    page.get_by_text("解码设置 Decoding settings").click()
    page.get_by_label("贪心·流式 Greedy (streamed)").check()
    start = time.perf_counter()
    _ask(page, QUESTIONS[1])
    expect(bot).to_have_count(2)
    expect(bot.last).to_have_text(_flat(answer2).strip())
    greedy_s = time.perf_counter() - start
    assert _flat(bot.first.inner_text()) == _flat(answer1)
    assert page.locator("#chatbot [data-testid=user]").all_inner_texts() == list(QUESTIONS)
    page.screenshot(path=shots / "chat.png")

    page.get_by_role("button", name="清空对话 Clear chat").click()
    expect(bot).to_have_count(0)
    context.close()
    (shots / "timings-chat.json").write_text(
        json.dumps({"startup_s": server["startup_s"], "beam_answer_s": beam_s, "greedy_answer_s": greedy_s})
    )


def test_two_sessions_keep_their_own_conversations(browser, server, models, pictures, shots) -> None:
    sessions = [_open(browser, server) for _ in range(2)]
    cases = [(pictures["landscape"], QUESTIONS[0]), (pictures["mirrored"], QUESTIONS[1])]
    for (_, page), (picture, _) in zip(sessions, cases):
        _upload(page, picture)
    for (_, page), _ in zip(sessions, cases):
        expect(page.locator("#chat-status")).to_contain_text("Image ready")
    for (_, page), (_, question) in zip(sessions, cases):
        _ask(page, question)  # both decode at once (the queue runs two chat requests concurrently)
    for index, ((_, page), (picture, question)) in enumerate(zip(sessions, cases)):
        alone, _, _ = _beam_answer(models, Image.open(picture).convert("RGB"), question)
        bot = page.locator("#chatbot [data-testid=bot]")
        expect(bot).to_have_count(1)
        expect(bot.first).to_have_text(re.compile(re.escape(_flat(alone))))
        assert page.locator("#chatbot [data-testid=user]").all_inner_texts() == [question]
        page.screenshot(path=shots / f"session-{index}.png")
    for context, _ in sessions:
        context.close()


def test_paint_shows_progress_and_images(browser, server, shots) -> None:
    context, page = _open(browser, server)
    page.get_by_role("tab", name="绘画 Paint").click()
    prompt = page.get_by_label("提示词 Prompt", exact=True)
    prompt.fill("月" * 10_000)
    page.get_by_role("button", name="生成 Paint").click()
    _toast(page, "Prompt too long: 10,000 characters")

    prompt.fill("月亮下的小山和湖 a small hill and a lake under the moon")
    count = page.get_by_role("spinbutton", name="每个提示词的图片数 Images per prompt")
    count.fill("2")
    count.press("Enter")
    # every "k/N steps" the progress bar shows while painting
    page.evaluate(
        """() => {
            window.seenSteps = [];
            new MutationObserver(() => {
                for (const node of document.querySelectorAll('.progress-text')) {
                    const match = node.textContent.match(/(\\d+)\\/(\\d+) steps/);
                    if (match && !window.seenSteps.includes(match[1])) window.seenSteps.push(match[1]);
                }
            }).observe(document.body, {subtree: true, childList: true, characterData: true});
        }"""
    )
    start = time.perf_counter()
    page.get_by_role("button", name="生成 Paint").click()
    expect(page.locator("#paint-status")).to_contain_text("2 张图片 image(s), 8/8 steps")
    paint_s = time.perf_counter() - start
    seen = [int(step) for step in page.evaluate("() => window.seenSteps")]
    assert any(0 < step for step in seen), f"the progress bar never moved: {seen}"
    thumbnails = page.locator("#gallery img")
    expect(thumbnails).to_have_count(2)
    sizes = [thumbnail.evaluate("img => [img.naturalWidth, img.naturalHeight]") for thumbnail in thumbnails.all()]
    assert sizes == [[32, 32], [32, 32]]  # the tiny UNet's native size, the sliders' start value
    page.screenshot(path=shots / "paint.png")
    context.close()
    (shots / "timings-paint.json").write_text(json.dumps({"paint_2_images_8_steps_s": paint_s, "steps_seen": seen}))
