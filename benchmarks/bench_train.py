"""VisCPM-Chat fine-tuning step against the original: forward + backward + AdamW step, and peak memory.

Both sides load the same seeded original-layout checkpoint (`transformers_viscpm.synthetic.chat`: CPM-Bee with the
real 86,583-entry vocabulary, BEiT-3 at 224 px with 64 queries) and train on the same batch of one-round records
(`{"image", "context", "question", "<ans>"}` with the answers filled in). Ours: converter -> `from_pretrained` ->
`VisCPMChatDataCollator` -> `model(**batch).loss`. The original (reference venv): the wheel's `convert_data_to_id` +
`CPMBeeCollater` -> `VLU_CPMBee.forward(data=...)` -> `CrossEntropyLoss`, as `finetune/ft_viscpm_chat` trains. Each
side runs in its own process (so that its peak RSS is its own), the rounds alternate between the sides, and each
round reports the median step time after a warm-up step. Ours also runs with gradient checkpointing.

    python benchmarks/bench_train.py [--dim 256 --layers 4 --batch 4 --steps 5 --rounds 3 --threads 1]
        [--reference-python /tmp/viscpm-ref/bin/python] [--reference-dir ../shared/reference]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from transformers_viscpm.conversion.convert_viscpm_chat import convert_viscpm_chat
from transformers_viscpm.synthetic.chat import TINY_CHAT_VISION, original_chat_state_dict, tiny_chat_llm_config

ROOT = Path(__file__).resolve().parents[1]
QA = [
    ("What is in the image?", "A smooth gradient of colours with some noise."),
    ("图片里有什么？", "一幅渐变色的图像。"),
    ("Describe the image.", "It shows colours that change from left to right."),
    ("这是什么颜色？", "左上角是深蓝色，右下角是浅色。"),
]

# Shared by both sides: the seeded images (the recorders' recipe) and the timing loop.
COMMON = r"""
import json, resource, statistics, sys, time
import numpy as np
import torch
from PIL import Image

spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])

def make_image(seed, width=300, height=200):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 255 / (width + height)], axis=-1)
    noisy = base + rng.normal(0.0, 20.0, size=base.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), mode="RGB")

def timed(step, params):
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-5)
    times, losses = [], []
    for _ in range(spec["steps"] + 1):
        start = time.perf_counter()
        loss = step()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step_s": statistics.median(times[1:]), "first_loss": losses[0], "peak_rss_mb": peak}))
"""

ORIGINAL_SCRIPT = (
    COMMON
    + r"""
from _original import original_chat_model
from VisCPM.cpm_tokenizers.bee import CPMBeeTokenizer
from VisCPM.utils import utils

query_num = spec["query_num"]
model = original_chat_model(spec)
model.load_state_dict(torch.load(spec["checkpoint"], weights_only=True), strict=False)
model.train()
model.vpm.beit3.vision_embed.requires_grad_(False)
tokenizer = CPMBeeTokenizer()
transform = utils.build_transform(is_train=False)
items = []
for i, (question, answer) in enumerate(spec["qa"]):
    data = {"image": tokenizer.unk_token * query_num, "context": "", "question": tokenizer.escape(question),
            "<ans>": tokenizer.escape(answer)}
    ids, subs, context, segments, rel, n_segments, _, bound = utils.convert_data_to_id(
        tokenizer, data=data, shuffle_answer=False, max_depth=8)
    n = len(ids)
    items.append({
        "input_ids": torch.from_numpy(ids)[None], "input_id_subs": torch.from_numpy(subs)[None],
        "context": torch.from_numpy(context)[None], "segment_ids": torch.from_numpy(segments)[None],
        "segment_rel_offset": torch.zeros((1, n), dtype=torch.int32), "segment_rel": torch.from_numpy(rel)[None],
        "sample_ids": torch.zeros((1, n), dtype=torch.int32),
        "num_segments": torch.full((1, n), n_segments, dtype=torch.int32), "raw_data": [{}],
        "pixel_values": transform(make_image(i)), "image_bound": torch.from_numpy(bound),
    })
batch = utils.CPMBeeCollater(tokenizer, max_len=max(len(i["input_ids"][0]) for i in items))(items)
loss_fct = torch.nn.CrossEntropyLoss(reduction="mean", ignore_index=-100)

def step():
    logits = model(data=batch).logits
    return loss_fct(logits.view(-1, logits.shape[-1]), batch["target"].view(-1).long())

timed(step, model.parameters())
"""
)

OURS_SCRIPT = (
    COMMON
    + r"""
from transformers_viscpm import VisCPMChatForConditionalGeneration, VisCPMChatProcessor
from transformers_viscpm.training import VisCPMChatDataCollator, freeze_for_finetuning

model = freeze_for_finetuning(VisCPMChatForConditionalGeneration.from_pretrained(spec["converted"]))
if spec["gradient_checkpointing"]:
    model.gradient_checkpointing_enable()
model.train()
records = [
    {"image": make_image(i), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    for i, (q, a) in enumerate(spec["qa"])
]
batch = VisCPMChatDataCollator(VisCPMChatProcessor.from_pretrained(spec["converted"]))(records)
timed(lambda: model(**batch).loss, model.parameters())
"""
)


def run_side(python: str, script: str, spec: dict, env: dict[str, str]) -> dict:
    result = subprocess.run(
        [python, "-c", script, json.dumps(spec)], capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, choices=range(1, len(QA) + 1))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference-python", default="/tmp/viscpm-ref/bin/python")
    parser.add_argument("--reference-dir", default=str(ROOT.parent / "shared" / "reference"))
    args = parser.parse_args()

    llm = tiny_chat_llm_config(dim_model=args.dim, dim_ff=2 * args.dim, num_layers=args.layers, dim_head=64,
                               num_heads=args.dim // 64)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "viscpm_chat_bench.pt"
        torch.save(original_chat_state_dict(llm, include_mim_head=False), checkpoint)
        converted = convert_viscpm_chat(checkpoint, Path(tmp) / "converted", llm_config=llm,
                                        vision_config=TINY_CHAT_VISION, show_progress=False)  # fmt: skip
        spec = dict(threads=args.threads, steps=args.steps, qa=QA[: args.batch], checkpoint=str(checkpoint),
                    converted=str(converted), vision=TINY_CHAT_VISION, llm=llm, query_num=64, text_vocab=100)  # fmt: skip
        ours_env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        ref_env = {**ours_env, "PYTHONPATH": os.pathsep.join([args.reference_dir, str(Path(__file__).parent)])}
        has_reference = Path(args.reference_python).exists() and Path(args.reference_dir).exists()
        rows: dict[str, list[dict]] = {"original": [], "ours": [], "ours + gradient checkpointing": []}
        for _ in range(args.rounds):
            if has_reference:
                rows["original"].append(run_side(args.reference_python, ORIGINAL_SCRIPT, spec, ref_env))
            rows["ours"].append(
                run_side(sys.executable, OURS_SCRIPT, {**spec, "gradient_checkpointing": False}, ours_env)
            )
            rows["ours + gradient checkpointing"].append(
                run_side(sys.executable, OURS_SCRIPT, {**spec, "gradient_checkpointing": True}, ours_env)
            )
    print(f"VisCPM-Chat training step, CPM-Bee dim {args.dim} x {args.layers} layers, batch {args.batch}, "
          f"{args.threads} thread(s), {args.rounds} interleaved rounds x {args.steps} steps")  # fmt: skip
    summary = {}
    for name, runs in rows.items():
        if not runs:
            print(f"  {name:32s} (reference venv not found: {args.reference_python})")
            continue
        summary[name] = statistics.median(r["step_s"] for r in runs)
        peak = max(r["peak_rss_mb"] for r in runs)
        print(f"  {name:32s} step {summary[name] * 1000:8.1f} ms   peak RSS {peak:7.0f} MB   "
              f"first loss {runs[0]['first_loss']:.5f}")  # fmt: skip
    if "original" in summary:
        ratio = summary["ours"] / summary["original"]
        verdict = "MEETS" if ratio <= 1.0 else "MISSES"
        print(f"ratio ours / original: {ratio:.2f}x  ({verdict} the goal of <= 1.0x)")


if __name__ == "__main__":
    main()
