"""`viscpm demo`: the whole system on tiny random weights, in the path a real user takes.

It writes tiny seeded checkpoints in the ORIGINAL layouts (what OpenBMB released, only smaller), converts
them with our converters, loads the results through the Auto classes / `DiffusionPipeline`, and runs
CPM-Bee, a two-turn VisCPM-Chat conversation and a VisCPM-Paint call. The weights are random, so the words
and the picture are noise: the demo shows the machinery, not the model quality.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

CPMBEE_PROMPT = {"input": "今天天气真好，我们去公园散步吧。", "prompt": "中翻英", "<ans>": ""}
QUESTIONS = ("这幅图里有什么？", "What colour is the sun?")
PAINT_PROMPT = "月亮下的小山和湖 a small hill and a lake under the moon"


@contextmanager
def _step(title: str, timings: dict[str, float]) -> Iterator[None]:
    print(f"\n== {title}", flush=True)
    start = time.perf_counter()
    yield
    timings[title] = time.perf_counter() - start
    print(f"   ({timings[title]:.1f} s)", flush=True)


def demo_picture(size: int = 224) -> Image.Image:
    """A small landscape drawn with PIL: the picture the chat demo asks about."""
    image = Image.new("RGB", (size, size), (110, 170, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, size * 2 // 3, size, size), fill=(70, 150, 70))
    draw.polygon([(0, size * 2 // 3), (size // 3, size // 3), (size * 2 // 3, size * 2 // 3)], fill=(120, 110, 100))
    draw.ellipse((size * 2 // 3, size // 10, size * 9 // 10, size // 3), fill=(250, 210, 60))
    return image


def _save_original(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path)
    return path


def _cpmbee(originals: Path, repos: Path, device: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .conversion import convert_cpmbee
    from .synthetic.cpmbee import original_cpmbee_state_dict, tiny_cpmbee_config

    config = tiny_cpmbee_config()
    checkpoint = _save_original(original_cpmbee_state_dict(config, seed=0), originals / "cpm-bee-tiny.pt")
    config_file = originals / "cpm-bee-tiny.json"
    config_file.write_text(json.dumps(config))
    repo = convert_cpmbee(checkpoint, config_file, repos / "cpm-bee-tiny", overwrite=True)
    tokenizer = AutoTokenizer.from_pretrained(repo)
    model = AutoModelForCausalLM.from_pretrained(repo).to(device).eval()
    print(f"   loaded {type(model).__name__} from {repo}")
    filled = model.generate_answers(tokenizer, [CPMBEE_PROMPT], max_new_tokens=8)[0]
    print(f"   prompt: {CPMBEE_PROMPT}\n   answer: {filled['<ans>']!r}")


def build_chat_repo(originals: Path, repos: Path, eos_scale: float = 6.0) -> Path:
    """A tiny random original VisCPM-Chat checkpoint in `originals`, converted into `repos/VisCPM-Chat-tiny`
    (`eos_scale`: how soon its answers end, see `original_chat_state_dict`)."""
    from .conversion import convert_viscpm_chat
    from .synthetic.chat import TINY_CHAT_VISION, original_chat_state_dict, tiny_chat_llm_config

    state_dict = original_chat_state_dict(include_mim_head=False, eos_scale=eos_scale)
    checkpoint = _save_original(state_dict, originals / "viscpm_chat_tiny_checkpoint.pt")
    return convert_viscpm_chat(
        checkpoint,
        repos / "VisCPM-Chat-tiny",
        llm_config=tiny_chat_llm_config(),
        vision_config=TINY_CHAT_VISION,
        overwrite=True,  # the demo owns its output folder: a second run replaces the first
    )


def _chat(originals: Path, repos: Path, output: Path, device: str) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    repo = build_chat_repo(originals, repos)
    processor = AutoProcessor.from_pretrained(repo)
    model = AutoModelForImageTextToText.from_pretrained(repo).to(device).eval()
    print(f"   loaded {type(model).__name__} from {repo}")
    image = demo_picture()
    image.save(output / "chat_input.png")
    context, vision_hidden_states = "", None
    for question in QUESTIONS:
        start = time.perf_counter()
        answer, context, vision_hidden_states = model.chat(
            image,
            question,
            context=context,
            vision_hidden_states=vision_hidden_states,
            processor=processor,
            max_new_tokens=12,
        )
        print(f"   User: {question}\n   AI: {answer!r}   [{time.perf_counter() - start:.2f} s]")
    print("   (the second turn reused the first turn's vision features)")


def build_paint_repo(originals: Path, repos: Path) -> Path:
    """A tiny random original VisCPM-Paint checkpoint and SD-2.1 base in `originals`, converted into
    `repos/VisCPM-Paint-tiny`."""
    from .conversion import convert_viscpm_paint
    from .synthetic.paint import TINY_PAINT_CPMBEE, original_paint_state_dict, write_sd_base

    checkpoint = _save_original(original_paint_state_dict(), originals / "viscpm_paint_tiny_checkpoint.pt")
    sd_base = originals / "stable-diffusion-2-1-base-tiny"
    write_sd_base(sd_base)
    return convert_viscpm_paint(
        checkpoint, sd_base, repos / "VisCPM-Paint-tiny", llm_config=TINY_PAINT_CPMBEE, overwrite=True
    )


def _paint(originals: Path, repos: Path, output: Path, device: str) -> None:
    from diffusers import DiffusionPipeline

    repo = build_paint_repo(originals, repos)
    pipe = DiffusionPipeline.from_pretrained(repo).to(device)
    print(f"   loaded {type(pipe).__name__} from {repo}")
    generator = torch.Generator().manual_seed(0)
    image = pipe(PAINT_PROMPT, num_inference_steps=10, height=64, width=64, generator=generator).images[0]
    path = output / "paint.png"
    image.resize((256, 256), Image.NEAREST).save(path)
    print(f"   prompt: {PAINT_PROMPT}\n   image: {path}")


def run_demo(output: Path, device: str = "cpu") -> dict[str, float]:
    """Run the three demos into `output`; returns the seconds each step took."""
    print("transformers-viscpm demo — tiny models with RANDOM weights: the text and the image are noise.")
    output.mkdir(parents=True, exist_ok=True)
    originals, repos = output / "original-checkpoints", output / "converted"
    timings: dict[str, float] = {}
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("CPM-Bee: original checkpoint -> convert -> AutoModelForCausalLM", lambda: _cpmbee(originals, repos, device)),
        (
            "VisCPM-Chat: convert -> AutoModelForImageTextToText -> two turns",
            lambda: _chat(originals, repos, output, device),
        ),
        ("VisCPM-Paint: convert -> DiffusionPipeline -> paint", lambda: _paint(originals, repos, output, device)),
    ]
    for title, run in steps:
        with _step(title, timings):
            run()
    print(f"\nDone in {sum(timings.values()):.1f} s. Converted repos: {repos}. Weights are random.")
    return timings
