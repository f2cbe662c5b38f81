"""CPM-Bee 10B on one GPU: eager vs compiled static-cache decoding against the HBM bound, and a 2,048-token prefill.

Builds the released 10B shape (`tests/fixtures/cpm-bee-10b.json`: 48 layers, dim 4096, 32 heads x 128, FF 10240,
86,583-entry vocabulary) with random bf16 weights directly on the device (no checkpoint, no conversion), then:

- bandwidth: bytes moved by a large device-to-device copy (read + write) per second;
- bound: decoding reads every weight matrix once per step, so `tok/s <= bandwidth / weight bytes` at batch 1
  (the KV cache of a 128-token prompt is < 1 % of the weights);
- decode at batch 1 and 8 after a 128-token prompt through stock greedy `generate(cache_implementation="static")`:
  eager (`disable_compile=True`) and compiled (generate's own automatic compile of the decoding step, inductor,
  CUDA graphs); a step's time is `(t(1 + N tokens) - t(1 token)) / N`, synchronised, best of `--repeats`;
  the compiled row also prints the compile time (the first call's extra time);
- prefill of a 2,048-token prompt (one forward, logits of the last token): seconds and achieved TFLOP/s.

Goal: compiled decode at batch 1 >= 80 % of the HBM bound.

    python benchmarks/bench_gpu_10b.py                       # the 10B shape, on cuda
    python benchmarks/bench_gpu_10b.py --small --device cpu  # a 2-layer model, to check the script itself
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import CompileConfig, GenerationConfig

from transformers_viscpm.models.cpmbee.configuration_cpmbee import CpmBeeConfig
from transformers_viscpm.models.cpmbee.modeling_cpmbee import CpmBeeForCausalLM

RELEASED_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "cpm-bee-10b.json"
SMALL = {"num_layers": 2, "dim_model": 256, "dim_ff": 640, "num_heads": 4, "dim_head": 64}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes per second of a device-to-device copy (each byte read once and written once)."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = min(timed(device, lambda: target.copy_(source)) for _ in range(10))
    return 2 * source.numel() / seconds


def build(small: bool, device: torch.device) -> CpmBeeForCausalLM:
    original = json.loads(RELEASED_CONFIG.read_text())
    if small:
        original.update(SMALL)
    config = CpmBeeConfig.from_original_config(original)
    config.init_std = 0.02  # random weights: keep the activations finite over 48 layers
    with torch.device(device):
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = CpmBeeForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None
    return model.eval()


def decode_step_s(model: CpmBeeForCausalLM, batch: int, prompt: int, steps: int, repeats: int, compiled: bool):
    """Seconds per decoding step at `batch`, and the compile time when compiled (else None)."""
    device = model.device
    ids = torch.randint(10, model.config.vocab_size, (batch, prompt), device=device)

    compile_config = None  # on a GPU, generate compiles static-cache decoding by itself
    if compiled and device.type != "cuda":
        compile_config = CompileConfig(fullgraph=True, dynamic=False, mode=None)
        compile_config._compile_all_devices = True  # elsewhere only when told (to check this script on CPU)

    def generate(new_tokens: int) -> None:
        config = GenerationConfig(
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            cache_implementation="static",
            disable_compile=not compiled,
            compile_config=compile_config,
        )
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)

    first = timed(device, lambda: generate(1 + steps))
    prefill = min(timed(device, lambda: generate(1)) for _ in range(repeats))
    total = min(timed(device, lambda: generate(1 + steps)) for _ in range(repeats))
    step = (total - prefill) / steps
    return step, (first - total if compiled else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a 2-layer model of the same vocabulary")
    parser.add_argument("--prompt", type=int, default=128, help="prompt length before decoding")
    parser.add_argument("--steps", type=int, default=32, help="decoding steps per measurement")
    parser.add_argument("--prefill", type=int, default=2048, help="prefill length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--copy-mb", type=int, default=2048, help="size of the bandwidth copy")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    model = build(args.small, device)
    matrices = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    weight_bytes = sum(w.nbytes for w in matrices.values())
    parameters = sum(p.numel() for p in model.parameters())
    bandwidth = copy_bandwidth(device, args.copy_mb)
    bound = bandwidth / weight_bytes
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}: {parameters / 1e9:.2f} B parameters, {weight_bytes / 2**30:.1f} GiB of weight matrices (bf16)")
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s -> HBM bound {bound:.1f} tok/s at batch 1")

    verdicts = []
    print(f"{'decode after ' + str(args.prompt):24s} {'tok/s':>9s} {'% bound':>8s} {'compile s':>10s}")
    for batch in (int(b) for b in args.batches.split(",")):
        for compiled in (False, True):
            step, compile_s = decode_step_s(model, batch, args.prompt, args.steps, args.repeats, compiled)
            share = 100 / step / bound  # per sequence, against the batch-1 bound
            label = f"batch {batch} {'compiled' if compiled else 'eager'}"
            compile_text = f"{compile_s:10.1f}" if compile_s is not None else f"{'-':>10s}"
            print(f"{label:24s} {batch / step:9.1f} {share:8.1f} {compile_text}")
            if batch == 1 and compiled:
                verdicts.append(
                    f"goal compiled decode batch 1 >= 80 % of HBM bound: {share:.1f} % "
                    f"{'met' if share >= 80 else 'NOT MET'}"
                )

    ids = torch.randint(10, model.config.vocab_size, (1, args.prefill), device=device)
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)
        seconds = min(timed(device, lambda: model(input_ids=ids, logits_to_keep=1)) for _ in range(args.repeats))
    tflops = 2 * parameters * args.prefill / seconds / 1e12
    print(
        f"prefill {args.prefill} tokens: {seconds * 1000:.1f} ms ({args.prefill / seconds:.0f} tok/s, {tflops:.1f} TFLOP/s)"
    )
    for verdict in verdicts:
        print(verdict)


if __name__ == "__main__":
    main()
