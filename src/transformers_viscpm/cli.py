"""The `viscpm` command line (also `python -m transformers_viscpm`).

Sub-commands: `demo` (the whole system on tiny random weights), `convert {cpmbee,chat,paint}` (the
converters of `transformers_viscpm.conversion`, one implementation), `chat` (interactive multi-turn
chat with streamed answers), `paint` (prompt -> PNG) and `finetune` (`transformers_viscpm.finetune`;
options: `viscpm finetune --help`). User errors print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2, no traceback."""


def _dtype(name: str | None):
    import torch

    if name is None:
        return None
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise CliError(f"unknown --dtype {name!r}: use float32, float16 or bfloat16") from None


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise CliError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise CliError(f"cannot read image {path}: {err}") from None


def _check_model(model: str) -> None:
    """A converted folder that exists, or something shaped like a hub repo id (`org/name`)."""
    if not Path(model).exists() and (model.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", model)):
        raise CliError(f"model not found: {model} (give a converted folder or a hub repo id)")


def _load_chat(model: str, device: str, dtype_name: str | None):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _check_model(model)
    try:
        processor = AutoProcessor.from_pretrained(model)
        chat_model = AutoModelForImageTextToText.from_pretrained(model, dtype=_dtype(dtype_name) or torch.float32)
    except (OSError, ValueError) as err:
        raise CliError(f"cannot load VisCPM-Chat from {model}: {str(err).splitlines()[0]}") from None
    return processor, chat_model.to(device).eval()


def _cmd_chat(args: argparse.Namespace) -> None:
    from transformers import TextStreamer

    image = _open_image(args.image)
    processor, model = _load_chat(args.model, args.device, args.dtype)
    context, vision_hidden_states = "", None

    def ask(question: str) -> None:
        nonlocal context, vision_hidden_states
        streamer = TextStreamer(processor.tokenizer)
        _, context, vision_hidden_states = model.chat(
            image,
            question,
            context=context,
            vision_hidden_states=vision_hidden_states,
            processor=processor,
            streamer=streamer,
            max_new_tokens=args.max_new_tokens,
        )

    if args.question is not None:
        ask(args.question)
        return
    print("VisCPM-Chat: ask about the image; an empty line or Ctrl-D ends the chat.", flush=True)
    while True:
        try:
            question = input("User: ")
        except EOFError:
            break
        if not question.strip():
            break
        print("AI: ", end="", flush=True)
        ask(question)


def _cmd_paint(args: argparse.Namespace) -> None:
    import torch
    from diffusers import DiffusionPipeline

    _check_model(args.model)
    try:
        pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=_dtype(args.dtype) or torch.float32)
    except (OSError, ValueError) as err:
        raise CliError(f"cannot load VisCPM-Paint from {args.model}: {str(err).splitlines()[0]}") from None
    pipe = pipe.to(args.device)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    image = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        generator=generator,
    ).images[0]
    out = Path(args.output)
    if not out.parent.exists():
        raise CliError(f"output folder does not exist: {out.parent}")
    image.save(out)
    print(f"saved {out}")


def _cmd_convert(args: argparse.Namespace, rest: Sequence[str]) -> None:
    from .conversion import CONVERTER_MAINS

    if CONVERTER_MAINS[args.kind](list(rest)) != 0:
        raise CliError(f"conversion of the {args.kind} checkpoint failed (see the message above)")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.output), device=args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viscpm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="convert, load and run tiny random VisCPM models end to end")
    demo.add_argument("--output", default="viscpm-demo", help="folder for the converted repos and the image")
    demo.add_argument("--device", default="cpu")

    convert = sub.add_parser(
        "convert", help="convert an original checkpoint (options after the kind: see `viscpm convert KIND --help`)"
    )
    convert.add_argument("kind", choices=["cpmbee", "chat", "paint"])

    chat = sub.add_parser("chat", help="chat about an image (interactive, or one-shot with --question)")
    chat.add_argument("--model", required=True, help="converted folder or hub repo id")
    chat.add_argument("image")
    chat.add_argument("--question", help="ask one question and exit")
    chat.add_argument("--max-new-tokens", type=int, default=512)
    chat.add_argument("--device", default="cpu")
    chat.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])

    paint = sub.add_parser("paint", help="generate an image from a prompt")
    paint.add_argument("--model", required=True, help="converted folder or hub repo id")
    paint.add_argument("prompt")
    paint.add_argument("-o", "--output", required=True, help="PNG file to write")
    paint.add_argument("--negative-prompt")
    paint.add_argument("--steps", type=int, default=50)
    paint.add_argument("--guidance", type=float, default=7.5)
    paint.add_argument("--seed", type=int, default=0)
    paint.add_argument("--height", type=int, default=512)
    paint.add_argument("--width", type=int, default=512)
    paint.add_argument("--device", default="cpu")
    paint.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])

    sub.add_parser("finetune", help="fine-tune VisCPM-Chat on llava records (options: `viscpm finetune --help`)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["finetune"]:
        from .finetune import main as finetune_main

        return finetune_main(argv[1:])
    parser = build_parser()
    if argv[:1] == ["convert"] and len(argv) >= 2:
        args, rest = parser.parse_args(argv[:2]), argv[2:]
    else:
        args, rest = parser.parse_args(argv), []
    commands: dict[str, Callable[[], None]] = {
        "demo": lambda: _cmd_demo(args),
        "convert": lambda: _cmd_convert(args, rest),
        "chat": lambda: _cmd_chat(args),
        "paint": lambda: _cmd_paint(args),
    }
    try:
        commands[args.command]()
    except CliError as err:
        print(f"viscpm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("viscpm: interrupted", file=sys.stderr)
        return 130
    return 0
