"""VisCPM-Chat speed against the original: time to first token and decode tokens per second of `chat()`.

Both sides load the same seeded original-layout checkpoint (`transformers_viscpm.synthetic.chat`) at a tiny-ish size
(CPM-Bee with the real 86,583-entry vocabulary, BEiT-3 at 224 px with 64 queries) and answer the same question about
the same image with the original chat decoding (beam search: 3 beams, temperature 0.7, repetition penalty 1.1,
length penalty 3). Ours goes through the converter and `from_pretrained`; the original (`VLU_CPMBee` +
`VLLMCPMBeeBeamSearch.generate`, exactly as `VisCPMChat.chat` calls it) runs in the reference venv when it exists.

A run with `max_new_tokens=0` takes the time to the first token (preprocessing, vision tower, mapping, prefill and the
first beam step); decode speed is `N / (t(N) - t(0))` beam steps per second. `</s>` is left at its random weight, so
answers run to the length limit on both sides; the script checks that the answers are identical.

Rounds alternate ours / original (the machine may be shared); the best round of each is kept, the range printed, and
the goal (beam decoding >= 1.5x the original) gets a verdict.

    python benchmarks/bench_chat.py [--dim 256 --layers 4 --vision-dim 256 --vision-layers 4 --new-tokens 24]
        [--threads 1] [--rounds 2] [--stock-linear] [--reference-python /tmp/viscpm-ref/bin/python] [--reference-dir ../shared/reference]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transformers_viscpm.conversion.convert_viscpm_chat import convert_viscpm_chat
from transformers_viscpm.models.viscpm_chat.modeling_viscpm_chat import VisCPMChatForConditionalGeneration
from transformers_viscpm.synthetic.chat import TINY_CHAT_VISION, original_chat_state_dict, tiny_chat_llm_config

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is in the image?"
CHAT_SETTINGS = dict(beam_size=3, temperature=0.7, repetition_penalty=1.1, length_penalty=3)

# Runs in the reference venv: the original model on the checkpoint, timed like ours. argv: spec JSON.
ORIGINAL_SCRIPT = r"""
import json, statistics, sys, time
import numpy as np
import torch
from PIL import Image
from _original import original_chat_model
from VisCPM.cpm_tokenizers.bee import CPMBeeTokenizer
from VisCPM.generation.vllm_bee import VLLMCPMBeeBeamSearch
from VisCPM.utils import utils

spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
model = original_chat_model(spec)
model.load_state_dict(torch.load(spec["checkpoint"]), strict=True)
model.eval()
beam_search = VLLMCPMBeeBeamSearch(model, CPMBeeTokenizer(), utils.build_transform(is_train=False), device="cpu")
image = Image.open(spec["image"]).convert("RGB")

def run(max_length):
    start = time.perf_counter()
    res = beam_search.generate([image], max_inp_length=3000, max_length=max_length,
                               extra_inp_dict={"context": "", "question": spec["question"]}, **spec["settings"])
    return time.perf_counter() - start, res[0]["<ans>"]

run(0)
results = {}
for max_length in (0, spec["new_tokens"]):
    times, answer = [], None
    for _ in range(spec["repeats"]):
        seconds, answer = run(max_length)
        times.append(seconds)
    results[max_length] = (statistics.median(times), answer)
print(json.dumps({"ttft": results[0][0], "total": results[spec["new_tokens"]][0], "answer": results[spec["new_tokens"]][1]}))
"""


def _image(path: Path) -> Image.Image:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    base = np.stack([x * 255 / 640, y * 255 / 480, (x + y) * 255 / 1120], axis=-1) + rng.normal(0, 20, (480, 640, 3))
    image = Image.fromarray(np.clip(np.rint(base), 0, 255).astype(np.uint8), mode="RGB")
    image.save(path)
    return image


def _ours(folder: Path, image: Image.Image, new_tokens: int, repeats: int) -> dict:
    model = VisCPMChatForConditionalGeneration.from_pretrained(folder).eval()
    settings = CHAT_SETTINGS.copy()
    kwargs = dict(
        num_beams=settings.pop("beam_size"),
        temperature=settings["temperature"],
        repetition_penalty=settings["repetition_penalty"],
        length_penalty=settings["length_penalty"],
    )

    def run(max_new_tokens: int) -> tuple[float, str]:
        start = time.perf_counter()
        answer, _, _ = model.chat(image, QUESTION, max_new_tokens=max_new_tokens, **kwargs)
        return time.perf_counter() - start, answer

    run(0)
    results = {}
    for max_new_tokens in (0, new_tokens):
        timed = [run(max_new_tokens) for _ in range(repeats)]
        results[max_new_tokens] = (statistics.median(t for t, _ in timed), timed[-1][1])
    return {"ttft": results[0][0], "total": results[new_tokens][0], "answer": results[new_tokens][1]}


def _original(spec: dict, python: str, reference_dir: Path) -> dict | None:
    if not Path(python).exists():
        return None
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(reference_dir), str(Path(__file__).parent)]))
    done = subprocess.run(
        [python, "-c", ORIGINAL_SCRIPT, json.dumps(spec)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _decode(result: dict, new_tokens: int) -> float:
    # max_new_tokens=N runs N + 2 beam steps, max_new_tokens=0 runs 2: the difference is N decode steps.
    return new_tokens / (result["total"] - result["ttft"])


def _report(name: str, rounds: list[dict], new_tokens: int) -> tuple[float, float]:
    """Print the best round (and the range over rounds); return its time to first token and decode speed."""
    ttfts, decodes = [r["ttft"] for r in rounds], [_decode(r, new_tokens) for r in rounds]
    print(
        f"{name:>9}: time to first token {min(ttfts) * 1000:7.1f} ms ({min(ttfts) * 1000:.1f}-"
        f"{max(ttfts) * 1000:.1f}), decode {max(decodes):6.1f} steps/s ({min(decodes):.1f}-{max(decodes):.1f})"
    )
    return min(ttfts), max(decodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256, help="CPM-Bee width")
    parser.add_argument("--layers", type=int, default=4, help="CPM-Bee layers")
    parser.add_argument("--vision-dim", type=int, default=256, help="BEiT-3 width")
    parser.add_argument("--vision-layers", type=int, default=4, help="BEiT-3 layers")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of ours / original; best kept")
    parser.add_argument("--reference-python", default="/tmp/viscpm-ref/bin/python")
    parser.add_argument("--reference-dir", default=str(ROOT.parent / "shared" / "reference"))
    parser.add_argument(
        "--stock-linear",
        action="store_true",
        help="F.linear everywhere (VISCPM_MEASURED_LINEAR=0): what runs on a machine where it is the faster route",
    )
    args = parser.parse_args()
    if args.stock_linear:
        os.environ["VISCPM_MEASURED_LINEAR"] = "0"
    torch.set_num_threads(args.threads)

    heads = max(1, args.dim // 64)
    llm = tiny_chat_llm_config(
        dim_model=args.dim, dim_ff=args.dim * 4, num_layers=args.layers, num_heads=heads, dim_head=args.dim // heads
    )
    vision = dict(
        TINY_CHAT_VISION,
        hidden_size=args.vision_dim,
        num_attention_heads=max(1, args.vision_dim // 64),
        intermediate_size=args.vision_dim * 4,
        num_hidden_layers=args.vision_layers,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = _image(tmp / "image.png")
        torch.save(original_chat_state_dict(llm, vision), tmp / "checkpoint.pt")
        convert_viscpm_chat(
            tmp / "checkpoint.pt", tmp / "converted", llm_config=llm, vision_config=vision, show_progress=False
        )
        print(
            f"CPM-Bee dim {args.dim} x {args.layers} layers, BEiT-3 dim {args.vision_dim} x {args.vision_layers} "
            f"layers, 64 queries, fp32, {args.threads} thread(s), beam 3, {args.new_tokens} new tokens"
        )
        spec = dict(
            checkpoint=str(tmp / "checkpoint.pt"),
            image=str(tmp / "image.png"),
            question=QUESTION,
            llm=llm,
            vision=vision,
            text_vocab=100,
            query_num=64,
            settings=CHAT_SETTINGS,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            threads=args.threads,
        )
        ours_rounds, original_rounds = [], []
        for _ in range(args.rounds):
            ours_rounds.append(_ours(tmp / "converted", image, args.new_tokens, args.repeats))
            original = _original(spec, args.reference_python, Path(args.reference_dir))
            if original is not None:
                original_rounds.append(original)
    ours_ttft, ours_decode = _report("ours", ours_rounds, args.new_tokens)
    if not original_rounds:
        print(f"original: not run ({args.reference_python} not found)")
        return
    original_ttft, original_decode = _report("original", original_rounds, args.new_tokens)
    identical = all(r["answer"] == original_rounds[0]["answer"] for r in ours_rounds + original_rounds)
    ratio = ours_decode / original_decode
    print(
        f"ratio ours/original: time to first token {ours_ttft / original_ttft:.2f}x, "
        f"decode speed {ratio:.2f}x; answers identical: {identical}"
    )
    print(f"goal Chat beam decode >= 1.5x the original: {ratio:.2f}x {'met' if ratio >= 1.5 else 'NOT MET'}")


if __name__ == "__main__":
    main()
