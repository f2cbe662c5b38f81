"""Overhead of VisCPMPaintPipeline over a bare denoising loop on the same UNet, VAE and scheduler.

    python benchmarks/bench_paint_overhead.py [--size 64] [--steps 20] [--repeats 5] [--device cpu]

Both sides start from the same precomputed prompt embeddings (CPM-Bee encoding is timed separately, it runs once
per call) and do the same work: draw latents, classifier-free guidance over `steps` DDPM steps, VAE decode, scale
to [0, 1] numpy. Runs alternate and the medians are compared; the ratio printed is pipeline / bare - 1 (goal:
at most 2%). The parts are the tiny seeded VisCPM-Paint ones of `transformers_viscpm.synthetic.paint`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from transformers_viscpm.models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer
from transformers_viscpm.pipelines.viscpm_paint import (
    VisCPMPaintPipeline,
    VisCPMPaintTextEncoder,
    VisCPMPaintTextEncoderConfig,
)
from transformers_viscpm.synthetic.paint import (
    TINY_PAINT_UNET,
    original_paint_state_dict,
    tiny_paint_cpmbee_config,
    write_sd_base,
)

PROMPT = "一只可爱的猫，油画风格"


def build(device: torch.device) -> VisCPMPaintPipeline:
    state = original_paint_state_dict()
    config = VisCPMPaintTextEncoderConfig(
        cpmbee_config=tiny_paint_cpmbee_config(), projection_dim=TINY_PAINT_UNET["cross_attention_dim"]
    )
    text_encoder = VisCPMPaintTextEncoder(config)
    text_encoder.load_state_dict(
        {f"cpmbee.{k[4:]}" if k.startswith("llm.") else k: v for k, v in state.items() if not k.startswith("unet.")}
    )
    unet = UNet2DConditionModel(**TINY_PAINT_UNET)
    unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
    with tempfile.TemporaryDirectory() as base:
        write_sd_base(base)
        pipe = VisCPMPaintPipeline(
            vae=AutoencoderKL.from_pretrained(Path(base) / "vae"),
            text_encoder=text_encoder.eval(),
            tokenizer=CpmBeeTokenizer(),
            unet=unet,
            scheduler=DDPMScheduler.from_pretrained(Path(base) / "scheduler"),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def bare_loop(pipe: VisCPMPaintPipeline, embeds: torch.Tensor, size: int, steps: int, guidance: float, seed: int):
    """The minimum a caller would write by hand: no checks, no callbacks, no progress bar."""
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    device = embeds.device
    generator = torch.Generator(device).manual_seed(seed)
    scheduler.set_timesteps(steps, device=device)
    shape = (1, unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    latents = torch.randn(shape, generator=generator, device=device, dtype=embeds.dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        uncond, cond = unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0].chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents, generator=generator).prev_sample
    image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (steadier timings when low)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pipe = build(device)
    guidance, seed = 7.5, 0

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - start, out

    encode_time, (prompt_embeds, negative_embeds) = timed(
        lambda: [t.detach() for t in pipe.encode_prompt(PROMPT, device, 1, True)]
    )
    embeds = torch.cat([negative_embeds, prompt_embeds])

    def run_pipeline():
        return pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=guidance,
            generator=torch.Generator(device).manual_seed(seed),
            output_type="np",
        ).images

    def run_bare():
        return bare_loop(pipe, embeds, args.size, args.steps, guidance, seed)

    run_pipeline(), run_bare()  # warm-up
    pipe_times, bare_times = [], []
    for _ in range(args.repeats):
        seconds, pipe_images = timed(run_pipeline)
        pipe_times.append(seconds)
        seconds, bare_images = timed(run_bare)
        bare_times.append(seconds)
    pipeline_s, bare_s = statistics.median(pipe_times), statistics.median(bare_times)
    print(f"device={device} size={args.size} steps={args.steps} repeats={args.repeats} threads={args.threads}")
    print(f"same images: max abs diff {abs(pipe_images - bare_images).max():.2e}")
    print(f"prompt encoding (once per call): {encode_time * 1e3:.1f} ms")
    print(f"pipeline median {pipeline_s * 1e3:.1f} ms, bare loop median {bare_s * 1e3:.1f} ms")
    print(f"overhead ratio: {pipeline_s / bare_s - 1:+.2%}")


if __name__ == "__main__":
    main()
