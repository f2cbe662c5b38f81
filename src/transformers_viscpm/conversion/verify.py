"""Check a converted repo on a fixed input, against the original implementation when it is importable.

``python conversion/verify.py --original CKPT --converted REPO --kind {cpmbee,chat,paint} [--original-config JSON]``
runs the converted model on a fixed input and prints checksums of its output. When the original ``VisCPM`` package
can be imported (CPM-Bee), the original model is built from ``CKPT`` and ``--original-config``, run on the same
input, and the largest absolute logit difference is printed; the exit status is 1 when it exceeds ``--tolerance``.
Without the original, the report says so and only the converted model's numbers are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

KINDS = {"cpmbee": "cpmbee", "chat": "viscpm_chat", "paint": "viscpm_paint"}
# The fixed inputs: a CPM-Bee prompt with out-of-vocabulary runs (no `<`: the original reads it as markup), a chat question about a gradient image, a caption.
CPMBEE_PROMPT = {"input": "今天天气真好 ☃ ♞♜", "prompt": "中翻英", "<ans>": ""}
CHAT_QUESTION = "这幅图像是什么颜色的？"
PAINT_CAPTION = "人闲桂花落，月静春山空"
PAINT_STEPS = 2


@dataclass
class Report:
    """What verify found: the converted output's checksums and, with the original, the largest difference."""

    kind: str
    output: str
    shape: list[int]
    sha256: str
    total: float
    abs_max: float
    max_abs_diff: float | None = None
    original: str = "missing"

    def lines(self) -> list[str]:
        lines = [
            f"kind: {self.kind}",
            f"converted {self.output}: shape {self.shape}, sum {self.total:.6f}, abs max {self.abs_max:.6f}",
            f"converted {self.output} sha256 (float32): {self.sha256}",
        ]
        if self.max_abs_diff is None:
            lines.append(f"original: {self.original}; only the converted model was run")
        else:
            lines.append(f"original: {self.original}; max abs {self.output} difference: {self.max_abs_diff:.3e}")
        return lines


def _checksums(kind: str, output: str, tensor: torch.Tensor) -> Report:
    tensor = tensor.detach().float().contiguous()
    return Report(
        kind=kind,
        output=output,
        shape=list(tensor.shape),
        sha256=hashlib.sha256(tensor.numpy().tobytes()).hexdigest(),
        total=float(tensor.sum()),
        abs_max=float(tensor.abs().max()),
    )


def converted_cpmbee_logits(repo: str | Path) -> torch.Tensor:
    """Logits ``(1, L, vocab + E)`` of the converted CPM-Bee on :data:`CPMBEE_PROMPT`."""
    from ..models.cpmbee.encoding_cpmbee import encode_structured
    from ..models.cpmbee.modeling_cpmbee import CpmBeeForCausalLM
    from ..models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer

    tokenizer = CpmBeeTokenizer.from_pretrained(repo)
    model = CpmBeeForCausalLM.from_pretrained(repo, dtype=torch.float32).eval()
    encoding, _ = encode_structured(tokenizer, [CPMBEE_PROMPT])
    with torch.no_grad():
        return model(**encoding).logits


def converted_chat_logits(repo: str | Path) -> torch.Tensor:
    """Logits of the converted VisCPM-Chat on a gradient image and :data:`CHAT_QUESTION`."""
    from PIL import Image

    from ..models.viscpm_chat.modeling_viscpm_chat import VisCPMChatForConditionalGeneration
    from ..models.viscpm_chat.processing_viscpm_chat import VisCPMChatProcessor

    processor = VisCPMChatProcessor.from_pretrained(repo)
    model = VisCPMChatForConditionalGeneration.from_pretrained(repo, dtype=torch.float32).eval()
    image = Image.linear_gradient("L").convert("RGB").resize((320, 240))
    with torch.no_grad():
        return model(**processor(images=image, text=CHAT_QUESTION)).logits


def converted_paint_image(repo: str | Path) -> torch.Tensor:
    """The converted VisCPM-Paint image (``(1, 3, H, W)`` in [0, 1]) for :data:`PAINT_CAPTION`, seed 0."""
    from ..pipelines.viscpm_paint import VisCPMPaintPipeline

    # A repo that ships its code (export_remote_code) runs that code, generated from this package's.
    pipe = VisCPMPaintPipeline.from_pretrained(repo, torch_dtype=torch.float32, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(PAINT_CAPTION, num_inference_steps=PAINT_STEPS, generator=generator, output_type="pt").images


def original_available() -> bool:
    """Whether the original implementation (the ``VisCPM`` package) can be imported here."""
    return importlib.util.find_spec("VisCPM") is not None


def original_cpmbee_logits(checkpoint: str | Path, original_config: dict) -> torch.Tensor:
    """Logits of the ORIGINAL ``CPMBeeTorch`` (fp32) on :data:`CPMBEE_PROMPT`, encoded by the original code."""
    # On a machine without CUDA the original needs the reference helper that fixes its rotary table's device.
    if not torch.cuda.is_available() and importlib.util.find_spec("original_on_cpu") is not None:
        import original_on_cpu  # noqa: F401
    from VisCPM.cpm_tokenizers.bee import CPMBeeTokenizer
    from VisCPM.generation.vllm_bee import VLLMCPMBeeGeneration
    from VisCPM.models.cpmbee import CPMBeeConfig, CPMBeeTorch

    model = CPMBeeTorch(CPMBeeConfig(**{**original_config, "half": False})).float().eval()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    prefixes = [p for p in ("llm.", "cpmbee.") if any(k.startswith(p) for k in state)]
    state = {
        k.removeprefix(prefixes[0]) if prefixes else k: v.float() for k, v in state.items() if k != "lm_head.weight"
    }
    model.load_state_dict(state, strict=True)
    generation = VLLMCPMBeeGeneration.__new__(VLLMCPMBeeGeneration)
    generation.tokenizer = CPMBeeTokenizer()
    generation.device = "cpu"
    inputs, _ = generation._process_list([dict(CPMBEE_PROMPT)])
    with torch.no_grad():
        logits, _, _ = model.inference(
            input=inputs["input_ids"],
            input_sub=inputs["input_id_subs"],
            position=inputs["input_pos"],
            context=inputs["context"],
            sample_ids=inputs["sample_idx"],
            num_segments=inputs["num_segments"],
            segment=inputs["segment_ids"],
            segment_rel_offset=inputs["segment_rel_offset"],
            segment_rel=inputs["segment_rel"],
            ext_table_ids=inputs["batch_ext_table_ids"],
            ext_table_sub=inputs["batch_ext_table_sub"],
        )
    return logits


CONVERTED_RUNS = {
    "cpmbee": ("logits", converted_cpmbee_logits),
    "viscpm_chat": ("logits", converted_chat_logits),
    "viscpm_paint": ("pixels", converted_paint_image),
}


def verify(
    original: str | Path, converted: str | Path, kind: str, original_config: str | Path | dict | None = None
) -> Report:
    """Run the converted repo (and the original when possible); see the module docstring."""
    kind = KINDS.get(kind, kind)
    output, run = CONVERTED_RUNS[kind]
    ours = run(converted)
    report = _checksums(kind, output, ours)
    if not original_available():
        report.original = "the VisCPM package is not importable"
    elif kind != "cpmbee":
        report.original = "VisCPM is importable, but verify runs the original for --kind cpmbee only"
    elif original_config is None:
        report.original = "VisCPM is importable, but --original-config is needed to build the original model"
    else:
        config = original_config
        if not isinstance(config, dict):
            config = json.loads(Path(config).read_text(encoding="utf-8"))
        theirs = original_cpmbee_logits(original, config)
        if theirs.shape != ours.shape:
            raise ValueError(f"original logits have shape {list(theirs.shape)}, converted {list(ours.shape)}")
        report.original = "VisCPM " + str(Path(sys.modules["VisCPM"].__file__).parent)
        report.max_abs_diff = float((theirs.float() - ours.float()).abs().max())
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: 0 when the converted model runs (and matches the original within tolerance)."""
    parser = argparse.ArgumentParser(prog="verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--original", required=True, help="the original checkpoint the repo was converted from")
    parser.add_argument("--converted", required=True, help="the converted folder (or a hub repo id)")
    parser.add_argument("--kind", required=True, choices=sorted(KINDS))
    parser.add_argument("--original-config", help="original CPM-Bee config JSON (to build the original model)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed difference (default 1e-4)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # library chatter must not mix with the report
        report = verify(args.original, args.converted, args.kind, args.original_config)
    print(json.dumps(report.__dict__) if args.json else "\n".join(report.lines()))
    if report.max_abs_diff is not None and report.max_abs_diff > args.tolerance:
        print(f"error: difference {report.max_abs_diff:.3e} exceeds the tolerance {args.tolerance:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
