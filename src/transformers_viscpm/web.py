"""`viscpm web`: one gradio app with a Chat tab (VisCPM-Chat) and a Paint tab (VisCPM-Paint).

Without model arguments it serves the embedded default: the tiny models of `viscpm demo` (random weights, built by
our converters from synthetic original checkpoints), built on first use into a cache outside the checkout. Every
user's image, conversation and vision features live in that browser session's `gr.State`; the models, processor and
pipeline are shared and keep no per-call state. gradio is the optional `web` extra and is imported only here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from threading import Thread
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from transformers import TextIteratorStreamer

from .models.cpmbee.generation_cpmbee import CpmBeeBeamSearchSettings
from .models.viscpm_chat.processing_viscpm_chat import parse_rendered_prompt

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline demo

import gradio as gr  # noqa: E402

CACHE_ENV = "VISCPM_WEB_CACHE"
MAX_IMAGE_PIXELS = 40_000_000  # larger uploads are refused before decoding (PIL's own bomb limit is ~179 MP)
MAX_PROMPT_CHARS = 2000
CONCURRENCY_LIMIT = 2  # requests decoded at once per event; the rest wait in the queue
BEAM, GREEDY = "束搜索 Beam search (original chat)", "贪心·流式 Greedy (streamed)"
WORKING = "⌛ 正在生成… Working (beam search)…"
RANDOM_NOTICE = (
    "⚠️ **随机权重 Random weights.** This is the embedded demo: tiny {which} with random weights, converted from "
    "synthetic checkpoints. The answers and pictures are noise; they show the machinery, not the model. "
    "Start `viscpm web --chat-model REPO --paint-model REPO` for the real models."
)


def demo_cache() -> Path:
    """Where the embedded demo models live: `$VISCPM_WEB_CACHE`, else `$XDG_CACHE_HOME` (or `~/.cache`)
    `/transformers_viscpm/demo`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transformers_viscpm" / "demo"


def embedded_repos(cache: Path | None = None) -> tuple[Path, Path]:
    """The converted tiny VisCPM-Chat and VisCPM-Paint repos, built on first use (into a temporary folder that is
    moved into place only when complete, so an interrupted build is never mistaken for a cache)."""
    from .demo import build_chat_repo, build_paint_repo

    cache = demo_cache() if cache is None else cache
    chat, paint = cache / "VisCPM-Chat-tiny", cache / "VisCPM-Paint-tiny"
    if (chat / "config.json").is_file() and (paint / "model_index.json").is_file():
        return chat, paint
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent, prefix=f".{cache.name}-") as tmp:
        repos = Path(tmp) / "repos"
        build_chat_repo(Path(tmp) / "originals", repos, eos_scale=5.0)  # greedy answers of a few tokens
        build_paint_repo(Path(tmp) / "originals", repos)
        shutil.rmtree(cache, ignore_errors=True)
        try:
            os.replace(repos, cache)
        except OSError:  # another process finished first
            if not (chat / "config.json").is_file():
                raise
    return chat, paint


@dataclass
class Models:
    """What the app serves: the shared chat model, processor and paint pipeline."""

    chat_model: Any
    processor: Any
    pipe: Any
    random: list[str] = field(default_factory=list)  # the tabs served by the embedded random-weight models

    @property
    def beam_settings(self) -> CpmBeeBeamSearchSettings:
        """The chat model's own `chat()` decoding (the converted repo's: the original's), where the panel starts."""
        return CpmBeeBeamSearchSettings.from_generation_config(self.chat_model.generation_config)

    @property
    def max_new_tokens(self) -> int:
        """The answer length the settings panel starts at (short for the random models: their answers are noise)."""
        configured = self.beam_settings.max_new_tokens
        return min(configured, 24) if "chat" in self.random else configured


def load_models(
    chat_model: str | None = None,
    paint_model: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> Models:
    """Load the chat model and the paint pipeline (each missing one: the embedded tiny demo model)."""
    from diffusers import DiffusionPipeline
    from transformers import AutoModelForImageTextToText, AutoProcessor

    random = [name for name, given in (("chat", chat_model), ("paint", paint_model)) if given is None]
    if random:
        tiny_chat, tiny_paint = embedded_repos()
        chat_model, paint_model = chat_model or str(tiny_chat), paint_model or str(tiny_paint)
    dtype = dtype or torch.float32
    model = AutoModelForImageTextToText.from_pretrained(chat_model, dtype=dtype).to(device).eval()
    pipe = DiffusionPipeline.from_pretrained(paint_model, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return Models(model, AutoProcessor.from_pretrained(chat_model), pipe, random)


def open_image(path: str | None) -> Image.Image:
    """The uploaded file as an RGB image, or `gr.Error` naming what is wrong with it (the size is checked from the
    header, before any pixel is decoded)."""
    if not path:
        raise gr.Error("请先上传图片 Upload an image first.")
    name = Path(path).name
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as err:  # PIL's own limit, checked while opening
        raise gr.Error(f"图片太大 Image too large: {err}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise gr.Error(f"无法读取图片 Not an image we can read: {name} ({type(err).__name__})") from None
    with image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise gr.Error(
                f"图片太大 Image too large: {width} x {height} pixels (at most {MAX_IMAGE_PIXELS:,} pixels)."
            )
        try:
            image.load()
        except (OSError, ValueError) as err:  # a truncated or corrupt file
            raise gr.Error(f"无法读取图片 Not an image we can read: {name} ({err})") from None
        return image.convert("RGB")


def _check_prompt(text: str, what: str) -> str:
    text = (text or "").strip()
    if not text:
        raise gr.Error(f"请输入{what[0]} Please enter {what[1]}.")
    if len(text) > MAX_PROMPT_CHARS:
        raise gr.Error(
            f"{what[0]}太长 {what[1].capitalize()} too long: {len(text):,} characters (at most {MAX_PROMPT_CHARS:,})."
        )
    return text


def _ask(
    models: Models,
    question: str,
    session: dict | None,
    mode: str,
    max_new_tokens: int,
    num_beams: int,
    repetition_penalty: float,
) -> Iterator[tuple[list[dict], dict | None, str]]:
    """Answer `question` about the session's image; yields (chat history, session, cleared question box)."""
    if session is None:
        raise gr.Error("请先上传图片 Upload an image first.")
    question = _check_prompt(question, ("问题", "a question"))
    processor, model = models.processor, models.chat_model
    messages = [*session["messages"], {"role": "user", "content": question}]
    rendered = processor.apply_chat_template(messages, tokenize=False)  # the chat template: home of the turn format
    settings = dict(max_new_tokens=int(max_new_tokens), repetition_penalty=float(repetition_penalty))
    vision = session["vision_hidden_states"]
    if mode == GREEDY:
        inputs, infos = processor.encode(text=rendered)
        # the ext table travels with this encoding: the streamer decodes with it, not with shared tokenizer state
        streamer = TextIteratorStreamer(
            processor.tokenizer, skip_prompt=True, skip_special_tokens=True, ext_table=dict(infos[0].ext_table)
        )
        failure: list[Exception] = []

        def decode() -> None:
            try:
                model.generate(
                    **inputs.to(model.device), vision_hidden_states=vision, streamer=streamer,
                    do_sample=False, num_beams=1, **settings,
                )  # fmt: skip
            except Exception as err:  # reported in the page below
                failure.append(err)
                streamer.end()

        Thread(target=decode, daemon=True).start()
        answer = ""
        for piece in streamer:
            answer += piece
            yield [*messages, {"role": "assistant", "content": answer}], session, ""
        if failure:
            raise gr.Error(f"生成失败 Decoding failed: {failure[0]}")
    else:
        yield [*messages, {"role": "assistant", "content": WORKING}], session, ""
        context, question = parse_rendered_prompt(rendered)
        try:
            answer, _, _ = model.chat(
                None, question, context=context, vision_hidden_states=vision, processor=processor,
                num_beams=int(num_beams), **settings,
            )  # fmt: skip
        except (ValueError, RuntimeError) as err:
            raise gr.Error(f"生成失败 Decoding failed: {err}") from None
    final = [*messages, {"role": "assistant", "content": answer}]
    yield final, {**session, "messages": final}, ""


def _new_image(models: Models, path: str | None) -> tuple[Image.Image, dict, list[dict], str]:
    """Read an upload and run the vision tower once: later turns reuse its features."""
    image = open_image(path)
    processor, model = models.processor, models.chat_model
    pixel_values = processor.image_processor(image, return_tensors="pt").pixel_values
    with torch.no_grad():
        vision = model.get_image_features(pixel_values.to(model.device, model.dtype)).pooler_output
    session = {"vision_hidden_states": vision, "messages": []}
    return image, session, [], f"✔ 图片已就绪 Image ready ({image.width} x {image.height}); ask away."


def _paint(
    models: Models,
    prompt: str,
    negative_prompt: str,
    steps: int,
    guidance: float,
    seed: int,
    height: int,
    width: int,
    count: int,
    progress: gr.Progress,
) -> tuple[list[Image.Image], str]:
    prompt = _check_prompt(prompt, ("提示词", "a prompt"))
    negative = (negative_prompt or "").strip() or None
    if negative is not None and len(negative) > MAX_PROMPT_CHARS:
        raise gr.Error(
            f"反向提示词太长 Negative prompt too long: {len(negative):,} characters (at most {MAX_PROMPT_CHARS:,})."
        )
    steps = int(steps)
    progress((0, steps), desc="去噪 Denoising")

    def on_step(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        progress((step + 1, steps), desc="去噪 Denoising")
        return tensors

    start = time.perf_counter()
    try:
        images = models.pipe(
            prompt,
            negative_prompt=negative,
            num_inference_steps=steps,
            guidance_scale=float(guidance),
            height=int(height),
            width=int(width),
            num_images_per_prompt=int(count),
            generator=torch.Generator(device="cpu").manual_seed(int(seed)),
            callback_on_step_end=on_step,
        ).images
    except ValueError as err:
        raise gr.Error(f"无法生成 Cannot paint: {err}") from None
    seconds = time.perf_counter() - start
    return images, f"✔ {len(images)} 张图片 image(s), {steps}/{steps} steps, {seconds:.1f} s"


def build_app(models: Models) -> gr.Blocks:
    """The two-tab app; no model work happens at build time."""
    size = models.pipe.unet.config.sample_size * models.pipe.vae_scale_factor
    with gr.Blocks(title="VisCPM") as app:
        gr.Markdown("# VisCPM · 对话 Chat & 绘画 Paint")
        if models.random:
            which = " and ".join({"chat": "VisCPM-Chat", "paint": "VisCPM-Paint"}[name] for name in models.random)
            gr.Markdown(RANDOM_NOTICE.format(which=which), elem_id="random-notice")
        with gr.Tab("对话 Chat", id="chat"):
            session = gr.State(None)
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="上传图片 Upload image", file_types=["image"], type="filepath")
                    preview = gr.Image(label="图片 Image", interactive=False, height=240)
                    status = gr.Markdown("请上传图片 Upload an image to start.", elem_id="chat-status")
                with gr.Column(scale=2):
                    chatbot = gr.Chatbot(
                        label="对话 Conversation", height=360, render_markdown=False, elem_id="chatbot"
                    )
                    question = gr.Textbox(
                        label="问题 Question", placeholder="这幅图里有什么？ What is in the picture?"
                    )
                    with gr.Row():
                        send = gr.Button("发送 Send", variant="primary")
                        clear = gr.Button("清空对话 Clear chat")
                        new_image = gr.Button("换图片 New image")
                    with gr.Accordion("解码设置 Decoding settings", open=False):
                        mode = gr.Radio([BEAM, GREEDY], value=BEAM, label="解码 Decoding")
                        max_new_tokens = gr.Slider(
                            1, 2048, value=models.max_new_tokens, step=1, label="最多生成 Max new tokens"
                        )
                        num_beams = gr.Slider(1, 8, value=models.beam_settings.num_beams, step=1, label="束宽 Beams")
                        repetition = gr.Slider(
                            1.0, 2.0, value=models.beam_settings.repetition_penalty, step=0.05,
                            label="重复惩罚 Repetition penalty",
                        )  # fmt: skip

            def on_upload(path: str | None, current: dict | None) -> tuple[Any, ...]:
                if path is None:
                    return gr.skip(), None, None, [], "请上传图片 Upload an image to start."
                try:
                    return gr.skip(), *_new_image(models, path)
                except gr.Error as err:  # keep the session; empty the upload box for the next try
                    gr.Warning(err.message)
                    return None, gr.skip(), current, gr.skip(), f"⚠️ {err.message}"

            def on_ask(text: str, current: dict | None, *settings: Any) -> Iterator[tuple[Any, ...]]:
                yield from _ask(models, text, current, *settings)

            upload.upload(on_upload, [upload, session], [upload, preview, session, chatbot, status])
            ask_inputs = [question, session, mode, max_new_tokens, num_beams, repetition]
            for trigger in (send.click, question.submit):
                trigger(on_ask, ask_inputs, [chatbot, session, question], concurrency_id="chat")
            clear.click(lambda current: ([], current and {**current, "messages": []}), session, [chatbot, session])
            new_image.click(
                lambda: (None, None, None, [], "请上传图片 Upload an image to start."),
                None,
                [upload, preview, session, chatbot, status],
            )
        with gr.Tab("绘画 Paint", id="paint"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="提示词 Prompt", placeholder="人闲桂花落，月静春山空", lines=2)
                    negative = gr.Textbox(label="反向提示词 Negative prompt")
                    steps = gr.Slider(
                        1, 100, value=50 if "paint" not in models.random else 8, step=1, label="步数 Steps"
                    )
                    guidance = gr.Slider(1.0, 20.0, value=7.5, step=0.5, label="引导强度 Guidance")
                    seed = gr.Number(value=0, precision=0, label="随机种子 Seed")
                    with gr.Row():
                        height = gr.Slider(32, 1024, value=size, step=8, label="高 Height")
                        width = gr.Slider(32, 1024, value=size, step=8, label="宽 Width")
                    count = gr.Slider(1, 4, value=1, step=1, label="每个提示词的图片数 Images per prompt")
                    paint = gr.Button("生成 Paint", variant="primary")
                with gr.Column(scale=1):
                    gallery = gr.Gallery(
                        label="图片 Images", format="png", buttons=["download", "fullscreen"], elem_id="gallery"
                    )
                    paint_status = gr.Markdown(elem_id="paint-status")

            def on_paint(*values: Any, progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
                return _paint(models, *values, progress=progress)

            paint.click(
                on_paint, [prompt, negative, steps, guidance, seed, height, width, count], [gallery, paint_status],
                concurrency_id="paint",
            )  # fmt: skip
    return app.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=32)


def serve(
    chat_model: str | None = None,
    paint_model: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
) -> None:
    """Load the models and serve the app until interrupted; a public share link only with `share=True`.

    Without a share link the app runs in uvicorn directly: `Blocks.launch` gives up when its own request to the new
    server takes over 3 s, which a loaded machine can exceed."""
    start = time.perf_counter()
    app = build_app(load_models(chat_model, paint_model, device=device, dtype=dtype))
    print(f"models ready in {time.perf_counter() - start:.1f} s", flush=True)
    options = dict(ssr_mode=False, max_file_size="50mb", show_error=True)
    if share:
        app.launch(server_name=host, server_port=port, share=True, **options)
        return
    import uvicorn
    from fastapi import FastAPI

    server = gr.mount_gradio_app(FastAPI(), app, path="/", server_name=host, server_port=port, **options)
    uvicorn.run(server, host=host, port=port, access_log=False)
