"""The `viscpm` command line (also `python -m transformers_viscpm`).

Sub-commands: `demo` (the whole system on tiny random weights), `convert {cpmbee,chat,paint}` (the
converters of `transformers_viscpm.conversion`, one implementation), `chat` (interactive multi-turn
chat with streamed answers), `paint` (prompt -> PNG), `web` (the gradio demo) and `finetune`
(`transformers_viscpm.finetune`; options: `viscpm finetune --help`). User errors print one line and exit with 2; Ctrl-C
prints one line and exits with 130.

torch, transformers and diffusers are imported only inside the commands that need them, after every argument
that can be checked without them has been: `viscpm --help` and argument errors answer at once.
"""

from __future__ import annotations

import _thread
import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from .quantization import QUANTIZE_CHOICES


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2, no traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors one line (the usage stays in `--help`)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _finite_float(text: str) -> float:
    """argparse type: a finite float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _runtime() -> None:
    """Import and register the models: the expensive step, done only by commands that load one."""
    from ._registration import register_all

    register_all()


def _dtype(name: str | None):
    import torch

    if name is None:
        return None
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise CliError(f"unknown --dtype {name!r}: use float32, float16 or bfloat16") from None


def _device(name: str) -> torch.device:
    """`--device` as a `torch.device` that this machine has (one line, not a traceback deep in `.to()`)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"unknown --device {name!r}: use cpu, cuda, cuda:N, mps, ...") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as err:
        raise CliError(f"--device {name} is not available here: {str(err).splitlines()[0]}") from None
    return device


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


# What each command needs, and how a local folder says what it holds.
_KIND_NAMES = {"cpmbee": "CPM-Bee", "viscpm_chat": "VisCPM-Chat", "viscpm_paint": "VisCPM-Paint"}


def _local_kind(folder: Path) -> str | None:
    """The kind of a converted folder (`cpmbee`, `viscpm_chat`, `viscpm_paint`, another model type), or None."""
    try:
        if (folder / "model_index.json").is_file():
            index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
            return "viscpm_paint" if index.get("_class_name") == "VisCPMPaintPipeline" else index.get("_class_name")
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return None


def _check_model(model: str, command: str, kind: str) -> None:
    """A converted folder of the right kind, or something shaped like a hub repo id (`org/name`)."""
    folder = Path(model).expanduser()
    if not folder.exists():
        if model.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
            raise CliError(f"model not found: {model} (give a converted folder or a hub repo id)")
        return
    found = _local_kind(folder)
    if found is not None and found != kind:
        what = _KIND_NAMES.get(found, repr(found))
        raise CliError(f"{model} is a {what} repo; `viscpm {command}` needs a {_KIND_NAMES[kind]} repo")


def _quantization_config(bits: str | None):
    """The `quantization_config` of `--quantize` (None without), with a clear error when its backend is missing."""
    if bits is None:
        return None
    from .quantization import quantization_config

    try:
        return quantization_config(bits)
    except (ImportError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CliError(f"--quantize {bits}: {message} (pip install 'transformers-viscpm[quantization]')") from None


def _load_chat(model: str, device: torch.device, dtype_name: str | None, quantize: str | None = None):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model)
        chat_model = AutoModelForImageTextToText.from_pretrained(
            model, dtype=_dtype(dtype_name) or torch.float32, quantization_config=_quantization_config(quantize)
        )
    except (OSError, ValueError) as err:
        raise CliError(f"cannot load VisCPM-Chat from {model}: {str(err).splitlines()[0]}") from None
    return processor, chat_model.to(device).eval()


def _cmd_chat(args: argparse.Namespace) -> None:
    image = _open_image(args.image)
    _check_model(args.model, "chat", "viscpm_chat")
    device = _device(args.device)  # needs torch only: before the expensive imports
    _runtime()
    from transformers import TextStreamer

    processor, model = _load_chat(args.model, device, args.dtype, args.quantize)
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


def _check_output_image(path: str) -> Path:
    """Where `paint` writes: a format PIL can save, in a folder that exists, checked before any generation."""
    from PIL import Image

    out = Path(path).expanduser()
    formats = Image.registered_extensions()
    if formats.get(out.suffix.lower()) not in Image.SAVE:
        raise CliError(f"cannot write an image to {path}: unknown extension {out.suffix!r} (use .png, .jpg, ...)")
    if not out.parent.is_dir():
        raise CliError(f"output folder does not exist: {out.parent}")
    if out.is_dir() or not os.access(out.parent, os.W_OK):
        raise CliError(f"cannot write to {out}")
    return out


def _cmd_paint(args: argparse.Namespace) -> None:
    out = _check_output_image(args.output)
    _check_model(args.model, "paint", "viscpm_paint")
    device = _device(args.device)  # needs torch only: before the expensive imports
    _runtime()
    import torch
    from diffusers import DiffusionPipeline

    try:
        quantization = _quantization_config(args.quantize)
        if quantization is not None:  # the text encoder (CPM-Bee, 10B); the UNet and VAE stay as loaded
            from diffusers.quantizers import PipelineQuantizationConfig

            quantization = PipelineQuantizationConfig(quant_mapping={"text_encoder": quantization})
        pipe = DiffusionPipeline.from_pretrained(
            args.model, dtype=_dtype(args.dtype) or torch.float32, quantization_config=quantization
        )
    except (OSError, ValueError) as err:
        raise CliError(f"cannot load VisCPM-Paint from {args.model}: {str(err).splitlines()[0]}") from None
    pipe = pipe.to(device)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    try:
        # Size defaults (None) to the model's own: unet sample_size x VAE scale factor.
        image = pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.height,
            width=args.width,
            generator=generator,
        ).images[0]
    except ValueError as err:  # the pipeline's check_inputs: e.g. a size that is not a multiple of the VAE's
        raise CliError(str(err).splitlines()[0]) from None
    image.save(out)
    print(f"saved {out}")


def _cmd_convert(args: argparse.Namespace, rest: Sequence[str]) -> None:
    _runtime()
    from .conversion import CONVERTER_MAINS

    status = CONVERTER_MAINS[args.kind](list(rest))
    if status:
        raise SystemExit(status)  # the converter has printed its one error line


def _cmd_demo(args: argparse.Namespace) -> None:
    output = Path(args.output).expanduser() if args.output else default_demo_folder()
    device = _device(args.device)
    _runtime()
    from .demo import run_demo

    run_demo(output, device=str(device))


def default_demo_folder() -> Path:
    """Where `viscpm demo` writes by default: a cache folder outside any checkout (`$XDG_CACHE_HOME` honoured)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "transformers_viscpm" / "demo"


def _cmd_web(args: argparse.Namespace) -> None:
    for model, kind in ((args.chat_model, "viscpm_chat"), (args.paint_model, "viscpm_paint")):
        if model is not None:
            _check_model(model, "web", kind)
    device = _device(args.device)
    try:
        from .web import serve
    except ModuleNotFoundError as err:
        if err.name != "gradio":
            raise
        raise CliError('viscpm web needs gradio: pip install "transformers-viscpm[web]"') from None

    _runtime()
    try:
        serve(args.chat_model, args.paint_model, str(device), _dtype(args.dtype), args.host, args.port, args.share)
    except (OSError, ValueError) as err:
        raise CliError(f"cannot serve the web demo: {str(err).splitlines()[0]}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="viscpm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="convert, load and run tiny random VisCPM models end to end")
    demo.add_argument(
        "--output",
        help="folder for the converted repos and the image (default: ~/.cache/transformers_viscpm/demo,"
        " under $XDG_CACHE_HOME when set)",
    )
    demo.add_argument("--device", default="cpu")

    convert = sub.add_parser(
        "convert", help="convert an original checkpoint (options after the kind: see `viscpm convert KIND --help`)"
    )
    convert.add_argument("kind", choices=["cpmbee", "chat", "paint"])

    chat = sub.add_parser("chat", help="chat about an image (interactive, or one-shot with --question)")
    chat.add_argument("--model", required=True, help="converted folder or hub repo id")
    chat.add_argument("image")
    chat.add_argument("--question", help="ask one question and exit")
    chat.add_argument("--max-new-tokens", type=_positive_int, default=512)
    chat.add_argument("--device", default="cpu")
    chat.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    chat.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="weight-only quantization (torchao / quanto)")

    paint = sub.add_parser("paint", help="generate an image from a prompt")
    paint.add_argument("--model", required=True, help="converted folder or hub repo id")
    paint.add_argument("prompt")
    paint.add_argument("-o", "--output", required=True, help="image file to write (.png, .jpg, ...)")
    paint.add_argument("--negative-prompt")
    paint.add_argument("--steps", type=_positive_int, default=50)
    paint.add_argument("--guidance", type=_finite_float, default=7.5)
    paint.add_argument("--seed", type=int, default=0)
    paint.add_argument("--height", type=_positive_int, help="default: the model's own size")
    paint.add_argument("--width", type=_positive_int, help="default: the model's own size")
    paint.add_argument("--device", default="cpu")
    paint.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    paint.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="quantize the text encoder (torchao / quanto)")

    web = sub.add_parser(
        "web", help="serve the Chat and Paint web demo (gradio; default: the tiny random demo models)"
    )
    web.add_argument("--chat-model", help="converted VisCPM-Chat folder or hub repo id (default: tiny random demo)")
    web.add_argument("--paint-model", help="converted VisCPM-Paint folder or hub repo id (default: tiny random demo)")
    web.add_argument("--device", default="cpu")
    web.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    web.add_argument("--port", type=int, default=7860)
    web.add_argument("--share", action="store_true", help="also open a public gradio share link")

    sub.add_parser("finetune", help="fine-tune VisCPM-Chat on llava records (options: `viscpm finetune --help`)")
    return parser


def _redeliver_swallowed_interrupts() -> None:
    """A Ctrl-C that lands inside a finalizer (`__del__`, run by the garbage collector at any moment) is swallowed
    by Python ("Exception ignored in ..."), and the command would run on to the end: deliver it to the main thread
    again, so that it interrupts the command where it next runs outside a finalizer."""
    previous = sys.unraisablehook

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            # From another thread: called here, it would interrupt this hook, which swallows it too.
            _thread.start_new_thread(_thread.interrupt_main, ())
        else:
            previous(unraisable)

    sys.unraisablehook = hook


def main(argv: Sequence[str] | None = None) -> int:
    _redeliver_swallowed_interrupts()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv[:1] == ["finetune"]:
            _runtime()
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
            "web": lambda: _cmd_web(args),
        }
        commands[args.command]()
    except CliError as err:
        print(f"viscpm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("viscpm: interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Exit now: an interrupt that landed inside a half-done import can make the interpreter's own shutdown end
        # the process by SIGINT (status -2) or print a traceback there, whatever `main` returns.
        os._exit(130)
    return 0
