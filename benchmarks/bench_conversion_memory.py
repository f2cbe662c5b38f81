"""Peak memory of the CPM-Bee converter on a checkpoint several times larger than a shard.

Writes a synthetic original-layout CPM-Bee checkpoint of at least ``--size-gb`` GB (torch.save, zip format), converts
it in a subprocess with ``--max-shard-size`` and records the child's peak RSS (VmHWM, file-backed mmap pages
included). The converter promises a peak of at most 1.25 x max shard size + 300 MB; the script exits 1 if not.

    python benchmarks/bench_conversion_memory.py [--size-gb 2.2] [--max-shard-size 500MB] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from transformers_viscpm.conversion._io import parse_size

DISK_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _config(size_bytes: int, itemsize: int) -> dict:
    """A wide original config with few, large tensors and enough layers to reach ``size_bytes``."""
    dim, dim_ff, vocab = 2048, 8192, 86583
    per_layer = (4 * dim * dim + 3 * dim * dim_ff + 2 * dim) * itemsize
    fixed = (vocab * dim + dim + 64 * 16) * itemsize
    layers = max(1, -(-(size_bytes - fixed) // per_layer))
    return {
        "vocab_size": vocab,
        "dim_model": dim,
        "dim_ff": dim_ff,
        "num_layers": layers,
        "num_heads": 16,
        "dim_head": 128,
        "position_bias_num_buckets": 32,
        "position_bias_num_segment_buckets": 32,
        "position_bias_max_distance": 2048,
        "eps": 1e-6,
        "half": itemsize == 2,
    }


def _shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    dim, ff, inner = cfg["dim_model"], cfg["dim_ff"], cfg["num_heads"] * cfg["dim_head"]
    shapes: dict[str, tuple[int, ...]] = {
        "input_embedding.weight": (cfg["vocab_size"], dim),
        "position_bias.relative_attention_bias": (
            cfg["position_bias_num_buckets"] + cfg["position_bias_num_segment_buckets"],
            cfg["num_heads"],
        ),
        "encoder.output_layernorm.weight": (dim,),
    }
    for i in range(cfg["num_layers"]):
        p = f"encoder.layers.{i}."
        shapes[p + "self_att.layernorm_before_attention.weight"] = (dim,)
        for name in ("project_q", "project_k", "project_v"):
            shapes[p + f"self_att.self_attention.{name}.weight"] = (inner, dim)
        shapes[p + "self_att.self_attention.attention_out.weight"] = (dim, inner)
        shapes[p + "ffn.layernorm_before_ffn.weight"] = (dim,)
        shapes[p + "ffn.ffn.w_in.w_0.weight"] = (ff, dim)
        shapes[p + "ffn.ffn.w_in.w_1.weight"] = (ff, dim)
        shapes[p + "ffn.ffn.w_out.weight"] = (dim, ff)
    return shapes


# Runs a script and records its own peak RSS (VmHWM: anonymous and file-backed pages, mmap included). The exec'd
# process starts a fresh address space, so unlike getrusage(RUSAGE_CHILDREN) this is not inflated by this
# process's own peak (the generated checkpoint) through fork.
_MEASURE = """
import os, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open("/proc/self/status") as status:
        hwm = next(line for line in status if line.startswith("VmHWM:")).split()[1]
    with open(os.environ["BENCH_HWM"], "w") as out:
        out.write(hwm)
"""


def _fill_value(i: int) -> float:
    return (i % 251) / 64.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.2, help="checkpoint size to generate (default 2.2)")
    parser.add_argument("--max-shard-size", default="500MB")
    parser.add_argument("--disk-dtype", choices=sorted(DISK_DTYPES), default="float16")
    parser.add_argument("--dtype", choices=sorted(DISK_DTYPES), help="output dtype (default: keep)")
    parser.add_argument("--workdir", default=None, help="where to write the files (default: a temp dir in /tmp)")
    args = parser.parse_args()

    disk_dtype = DISK_DTYPES[args.disk_dtype]
    work = Path(tempfile.mkdtemp(prefix="bench-conversion-", dir=args.workdir))
    try:
        cfg = _config(int(args.size_gb * 1e9), disk_dtype.itemsize)
        shapes = _shapes(cfg)
        t0 = time.perf_counter()
        state = {k: torch.full(s, _fill_value(i), dtype=disk_dtype) for i, (k, s) in enumerate(shapes.items())}
        torch.save(state, work / "original.pt")
        del state
        (work / "config.json").write_text(json.dumps(cfg))
        size = (work / "original.pt").stat().st_size
        print(
            f"wrote {size / 1e9:.2f} GB original checkpoint ({cfg['num_layers']} layers) in {time.perf_counter() - t0:.1f} s"
        )

        script = str(Path(__file__).resolve().parents[1] / "conversion" / "convert_cpmbee.py")
        args_convert = [
            "--checkpoint", str(work / "original.pt"),
            "--config", str(work / "config.json"),
            "--output", str(work / "converted"),
            "--max-shard-size", args.max_shard_size,
            "--quiet",
        ]  # fmt: skip
        if args.dtype:
            args_convert += ["--dtype", args.dtype]
        peaks = {}
        for name, script_args in (("import only (--help)", ["--help"]), ("conversion", args_convert)):
            t0 = time.perf_counter()
            hwm = work / "hwm"
            command = [sys.executable, "-c", _MEASURE, script, *script_args]
            result = subprocess.run(command, env={**os.environ, "BENCH_HWM": str(hwm)}, stdout=subprocess.DEVNULL)
            if result.returncode != 0:
                print(f"{name} failed with status {result.returncode}")
                return 1
            peaks[name] = int(hwm.read_text()) * 1024  # VmHWM is in kB
            print(f"{name}: peak RSS {peaks[name] / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s")

        out = work / "converted"
        shards = sorted(out.glob("model*.safetensors"))
        out_dtype = DISK_DTYPES[args.dtype] if args.dtype else disk_dtype
        for i, key in enumerate(shapes):
            if i % 97 == 0 or key == "input_embedding.weight":
                target = "cpmbee." + key
                shard = next(s for s in shards if target in safe_open(s, framework="pt").keys())
                with safe_open(shard, framework="pt") as f:
                    got = f.get_slice(target)[-1:].flatten()[-1].item()
                    assert got == torch.tensor(_fill_value(i), dtype=disk_dtype).to(out_dtype).item(), key
        shard_size = parse_size(args.max_shard_size)
        bound = 1.25 * shard_size + 300e6
        peak = peaks["conversion"]
        largest = max(s.stat().st_size for s in shards)
        print(
            f"{len(shards)} shards (largest {largest / 1e6:.0f} MB) from a {size / 1e9:.2f} GB checkpoint; "
            f"peak RSS {peak / 1e6:.0f} MB vs bound 1.25 x {shard_size / 1e6:.0f} MB + 300 MB = {bound / 1e6:.0f} MB "
            f"({peak / bound:.2f} of the bound; {peak / size:.2f} of the checkpoint size; "
            f"{(peak - peaks['import only (--help)']) / 1e6:.0f} MB above importing the converter)"
        )
        if peak > bound:
            print("FAIL: peak RSS exceeds the bound")
            return 1
        print("OK")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
