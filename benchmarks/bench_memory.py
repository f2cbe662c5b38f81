"""Memory and decode speed of VisCPM-Chat per way of fitting it on a small machine, and what they project to at 10B.

A VisCPM-Chat with the released widths scaled down by 4 (CPM-Bee 1024 wide, 12 layers, 8 heads of 128, the real
86,583-entry vocabulary: ~240M parameters; BEiT-3 256 wide, 4 layers) is converted once from a seeded original-layout
checkpoint. Each mode then runs in its own fresh process, which loads the model and answers one question about one
image with `chat()` (the original beam search: 3 beams; `</s>` keeps its random weight, so the answer runs to
`--new-tokens`):

- `bf16`: the model in bfloat16, in memory;
- `int8`: torchao int8 weight-only, the tied embedding / head matrix too (`quantization_config("int8")`, what
  `--quantize int8` loads);
- `int8-keep-tied`: torchao int8 weight-only for the linear layers only, the tied matrix kept in bf16;
- `int4`: optimum-quanto int4 (`--quantize int4`; packed two a byte, the tied matrix kept in bf16);
- `disk`: bf16 offloaded to disk (`device_map={"": "disk"}`, `offload_folder`): accelerate loads each layer's
  weights for its forward.

Per mode: peak RSS after loading and after the chat (the process's `VmHWM`, less its peak before loading, with
torch, transformers, this package and the quantization / offload libraries imported), weight bytes
(`get_memory_footprint()`: packed data and scales of quantized weights, offloaded weights not counted), decode speed (`new_tokens / (t(chat with N) - t(chat with 0))`,
beam steps a second), each as a ratio to bf16. Weight bytes per parameter, measured per kind of parameter (the tied
matrix, linear weights, the rest), times the parameter counts of the released shapes give the projected 10B weight
memory; the GPU goals of the issue are checked against those projections (weights only: activations and the CUDA
context come on top).

    python benchmarks/bench_memory.py [--dim 1024 --layers 12 --new-tokens 32 --modes bf16,int8,int8-keep-tied,int4,disk]
        [--threads 2] [--workdir DIR]

On a CUDA machine `--gpu` runs the released 10B shapes with random weights instead (built on the GPU in bf16 and
quantized in place: torchao int8 / int4 weight-only, optimum-quanto int8 / int4; bitsandbytes quantizes only
through `from_pretrained` of a saved checkpoint, which this mode does not write): peak GPU memory and
decode speed per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("bf16", "int8", "int8-keep-tied", "int4", "disk")
GOALS_GB = {"int4": 7.0, "int8": 12.0}  # VisCPM-Chat 10B on a GPU (issue 14)
QUESTION = "What is in the image?"
CHAT = {"num_beams": 3}

# Runs in a fresh process per mode. argv: spec JSON. Prints one JSON line.
CHILD = r"""
import json, sys, time
spec = json.loads(sys.argv[1])

def memory(field):
    # Linux's per-process figures (bytes): `ru_maxrss` would carry the parent's peak over `exec`.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))

import torch
import transformers  # noqa: F401
torch.set_num_threads(spec["threads"])
import transformers_viscpm  # noqa: F401
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers_viscpm.quantization import quantization_config

mode, repo = spec["mode"], spec["repo"]
kwargs = {"dtype": torch.bfloat16}
if mode == "int8":
    kwargs["quantization_config"] = quantization_config("int8")
elif mode == "int8-keep-tied":
    kwargs["quantization_config"] = quantization_config("int8", embeddings=False)
elif mode == "int4":
    kwargs["quantization_config"] = quantization_config("int4")
elif mode == "disk":
    kwargs.update(device_map={"": "disk"}, offload_folder=spec["offload_folder"])
import accelerate, optimum.quanto, torchao  # noqa: F401  (every mode's baseline holds the same libraries)
baseline = memory("VmHWM")
start = time.perf_counter()
model = AutoModelForImageTextToText.from_pretrained(repo, **kwargs).eval()
load_seconds = time.perf_counter() - start
processor = AutoProcessor.from_pretrained(repo)
load_peak = memory("VmHWM")
image = Image.open(spec["image"]).convert("RGB")

def run(new_tokens):
    start = time.perf_counter()
    answer = model.chat(image, spec["question"], processor=processor, max_new_tokens=new_tokens, **spec["chat"])[0]
    return time.perf_counter() - start, answer

run(0)
ttft, _ = run(0)
total, answer = run(spec["new_tokens"])
embedding = model.get_input_embeddings().weight
from transformers_viscpm.quantization import memory_footprint
kinds = {"tied": 0, "linear": 0, "other": 0}
counts = dict(kinds)
linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)} - {id(embedding)}
for param in model.parameters():
    kind = "tied" if param is embedding else "linear" if id(param) in linear_weights else "other"
    holder = torch.nn.Module()
    holder.register_parameter("p", param)
    kinds[kind] += memory_footprint(holder)
    counts[kind] += param.numel()
print(json.dumps({
    "mode": mode, "baseline": baseline, "load_peak": load_peak,
    "chat_peak": memory("VmHWM"),
    "weights": model.get_memory_footprint(), "bytes": kinds, "params": counts,
    "load_seconds": load_seconds, "ttft": ttft, "total": total, "answer": answer,
}))
"""


def build_repo(folder: Path, dim: int, layers: int) -> Path:
    """Convert a seeded original-layout VisCPM-Chat of the scaled-down widths into `folder/converted` (bf16)."""
    import torch

    from transformers_viscpm.conversion.convert_viscpm_chat import convert_viscpm_chat
    from transformers_viscpm.synthetic.chat import TINY_CHAT_VISION, original_chat_state_dict, tiny_chat_llm_config

    converted = folder / "converted"
    if (converted / "config.json").exists():
        return converted
    heads = dim // 128
    llm = tiny_chat_llm_config(dim_model=dim, dim_ff=dim * 10 // 4, num_layers=layers, num_heads=heads, dim_head=128)
    vision = dict(
        TINY_CHAT_VISION, hidden_size=256, num_attention_heads=4, intermediate_size=1024, num_hidden_layers=4
    )
    checkpoint = folder / "viscpm_chat_checkpoint.pt"
    torch.save(original_chat_state_dict(llm, vision, include_mim_head=False), checkpoint)
    try:
        return convert_viscpm_chat(
            checkpoint, converted, llm_config=llm, vision_config=vision, dtype="bfloat16", show_progress=False
        )
    finally:
        checkpoint.unlink()


def released_parameter_counts() -> dict[str, int]:
    """Parameters of the released VisCPM-Chat 10B by kind, counted on the meta device (nothing allocated)."""
    import torch

    from transformers_viscpm.models.viscpm_chat.configuration_viscpm_chat import VisCPMChatConfig
    from transformers_viscpm.models.viscpm_chat.modeling_viscpm_chat import VisCPMChatForConditionalGeneration

    with torch.device("meta"):
        model = VisCPMChatForConditionalGeneration(VisCPMChatConfig())
    embedding = model.get_input_embeddings().weight
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)} - {id(embedding)}
    counts = {"tied": 0, "linear": 0, "other": 0}
    for param in model.parameters():
        counts["tied" if param is embedding else "linear" if id(param) in linear else "other"] += param.numel()
    return counts


def run_mode(spec: dict) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        raise RuntimeError(f"mode {spec['mode']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_main(args: argparse.Namespace) -> None:
    import numpy as np
    from PIL import Image

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    repo = build_repo(workdir, args.dim, args.layers)
    print(f"model: {repo} (built in {time.perf_counter() - start:.0f} s)")
    image_path = workdir / "image.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(image_path)
    spec = {
        "repo": str(repo),
        "image": str(image_path),
        "question": QUESTION,
        "chat": CHAT,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "offload_folder": str(workdir / "offload"),
    }
    results = {}
    for mode in args.modes.split(","):
        results[mode] = run_mode({**spec, "mode": mode})
        print(
            f"  {mode}: done in {time.perf_counter() - start:.0f} s, answer {results[mode]['answer'][:40]!r}",
            flush=True,
        )
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    report(results, args)


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    base = results.get("bf16")
    released = released_parameter_counts()
    params = next(iter(results.values()))["params"]
    total_params = sum(params.values())
    print(
        f"\nVisCPM-Chat scaled down: {total_params / 1e6:.0f}M parameters ({params['tied'] / 1e6:.0f}M tied "
        f"embedding / head, {params['linear'] / 1e6:.0f}M linear, {params['other'] / 1e6:.1f}M other); chat() of "
        f"{args.new_tokens} tokens, {CHAT['num_beams']} beams, {args.threads} threads"
    )
    header = (
        f"| {'mode':<14} | {'load RSS':>9} | {'chat RSS':>9} | {'weights':>9} | {'B/param':>7} | {'decode':>9} "
        f"| {'RSS vs bf16':>11} | {'weights vs bf16':>15} | {'speed vs bf16':>13} | {'10B weights':>11} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    projected = {}
    for mode, r in results.items():
        load = (r["load_peak"] - r["baseline"]) / 2**20
        peak = (r["chat_peak"] - r["baseline"]) / 2**20
        weights = r["weights"] / 2**20
        decode = args.new_tokens / (r["total"] - r["ttft"])
        per_kind = {kind: r["bytes"][kind] / max(r["params"][kind], 1) for kind in released}
        projected[mode] = sum(per_kind[kind] * released[kind] for kind in released) / 1e9
        if base is not None:
            base_peak = (base["chat_peak"] - base["baseline"]) / 2**20
            base_decode = args.new_tokens / (base["total"] - base["ttft"])
            ratios = (
                f"{peak / base_peak:10.2f}x | {r['weights'] / base['weights']:14.2f}x | {decode / base_decode:12.2f}x"
            )
        else:
            ratios = f"{'':>11} | {'':>15} | {'':>13}"
        print(
            f"| {mode:<14} | {load:6.0f} MB | {peak:6.0f} MB | {weights:6.0f} MB | {r['weights'] / total_params:7.2f} "
            f"| {decode:5.2f} t/s | {ratios} | {projected[mode]:8.1f} GB |"
        )
    print(
        f"\n10B projection: bytes per parameter measured per kind (tied matrix / linear / other) x the released "
        f"VisCPM-Chat's {released['tied'] / 1e6:.0f}M / {released['linear'] / 1e9:.2f}B / {released['other'] / 1e6:.0f}M; "
        "weights only (a disk-offloaded model holds none between calls)."
    )
    for mode, goal in GOALS_GB.items():
        if mode in projected:
            verdict = "meets" if projected[mode] <= goal else "MISSES"
            print(f"goal: VisCPM-Chat 10B at {mode} in <= {goal:.0f} GB of GPU memory: projected weights "
                  f"{projected[mode]:.1f} GB -> {verdict} (to be confirmed on a GPU with --gpu)")  # fmt: skip
    if "disk" in results and base is not None:
        slowdown = (results["disk"]["total"] - results["disk"]["ttft"]) / (base["total"] - base["ttft"])
        fastest = max(
            (m for m in results if m != "disk"), key=lambda m: 1 / (results[m]["total"] - results[m]["ttft"])
        )
        print(f"disk offload decodes {slowdown:.1f}x slower than bf16 in memory; fastest mode: {fastest}")


GPU_CHILD = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
import torch
import transformers_viscpm  # noqa: F401
from PIL import Image
from transformers_viscpm.models.viscpm_chat.configuration_viscpm_chat import VisCPMChatConfig
from transformers_viscpm.models.viscpm_chat.modeling_viscpm_chat import VisCPMChatForConditionalGeneration

mode = spec["mode"]
torch.manual_seed(0)
config = VisCPMChatConfig()
with torch.device("cuda"):
    model = VisCPMChatForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
if mode.startswith("torchao"):
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    quantize_(model, Int8WeightOnlyConfig() if mode == "torchao-int8" else Int4WeightOnlyConfig(group_size=128))
elif mode.startswith("quanto"):
    from optimum.quanto import freeze, qint4, qint8, quantize
    quantize(model, weights=qint8 if mode == "quanto-int8" else qint4)
    freeze(model)
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
image = Image.new("RGB", (448, 448), (120, 80, 40))

def run(n):
    torch.cuda.synchronize(); start = time.perf_counter()
    model.chat(image, "What is in the image?", max_new_tokens=n, num_beams=3)
    torch.cuda.synchronize(); return time.perf_counter() - start

run(0)
ttft = run(0)
total = run(spec["new_tokens"])
print(json.dumps({"mode": mode, "weights": model.get_memory_footprint(),
                  "peak": torch.cuda.max_memory_allocated(), "decode": spec["new_tokens"] / (total - ttft)}))
"""


def gpu_main(args: argparse.Namespace) -> None:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    print("VisCPM-Chat 10B shapes, random weights, bf16 on CUDA; chat() of", args.new_tokens, "tokens, 3 beams")
    print("| mode | weights | peak GPU memory | decode |\n|---|---|---|---|")
    for mode in ("bf16", "torchao-int8", "torchao-int4", "quanto-int8", "quanto-int4"):
        done = subprocess.run(
            [sys.executable, "-c", GPU_CHILD, json.dumps({"mode": mode, "new_tokens": args.new_tokens})],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            print(f"| {mode} | failed: {done.stderr.strip().splitlines()[-1][:80]} | | |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {mode} | {r['weights'] / 1e9:.1f} GB | {r['peak'] / 1e9:.1f} GB | {r['decode']:.1f} steps/s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024, help="CPM-Bee width (released: 4096)")
    parser.add_argument("--layers", type=int, default=12, help="CPM-Bee layers (released: 48)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", help="keep the converted model here (reused by later runs)")
    parser.add_argument("--gpu", action="store_true", help="the released 10B shapes on a CUDA GPU")
    args = parser.parse_args()
    gpu_main(args) if args.gpu else cpu_main(args)


if __name__ == "__main__":
    main()
