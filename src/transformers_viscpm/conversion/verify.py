"""Check a converted repo on a fixed input, against the original implementation when it is importable.

``python conversion/verify.py --original CKPT --converted REPO --kind {cpmbee,chat,paint} [--original-config JSON]``
confirms each shard of REPO against the SHA-256 its index records, runs the converted model on a fixed input and
prints checksums of its output. The model runs with this package's classes: the repo's own Python code runs only
with ``--trust-remote-code``, as in transformers. When the original ``VisCPM`` package
can be imported, the original model is built from ``CKPT``, run on the same input, and the largest absolute
difference of the outputs is printed; the exit status is 1 when it exceeds ``--tolerance``. Without the original,
the report says so and only the converted model's numbers are printed.

- ``cpmbee``: prefill logits of a fixed prompt; the original CPM-Bee is built from ``--original-config``.
- ``chat``: prefill logits of a fixed image and question; the original ``VLU_CPMBee`` (BEiT-3 + CPM-Bee) takes its
  sizes from the converted repo's ``config.json`` (``vision_config``, ``query_num``, and ``text_config`` unless
  ``--original-config`` is given).
- ``paint``: the pixels of a fixed caption, seed and step count; the original ``VLG_CPMBee`` takes the CPM-Bee,
  UNet and trans block weights from ``CKPT`` and, as the original's checkpoint has none, the VAE and the
  scheduler from the converted repo (the stable-diffusion-2-1-base parts it was converted with).
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

from ._io import CheckpointError

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
    shards_verified: int = 0

    def lines(self) -> list[str]:
        lines = [
            f"kind: {self.kind}",
            f"converted {self.output}: shape {self.shape}, sum {self.total:.6f}, abs max {self.abs_max:.6f}",
            f"converted {self.output} sha256 (float32): {self.sha256}",
            f"shard checksums: {self.shards_verified} confirmed",
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


def _loaders(trust_remote_code: bool, plugin: tuple, auto: tuple) -> tuple[tuple, dict]:
    """The plugin's own classes, or with ``trust_remote_code`` the Auto classes, which run the repo's shipped code."""
    return (auto, {"trust_remote_code": True}) if trust_remote_code else (plugin, {})


def converted_cpmbee_logits(repo: str | Path, trust_remote_code: bool = False) -> torch.Tensor:
    """Logits ``(1, L, vocab + E)`` of the converted CPM-Bee on :data:`CPMBEE_PROMPT`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models.cpmbee.encoding_cpmbee import encode_structured
    from ..models.cpmbee.modeling_cpmbee import CpmBeeForCausalLM
    from ..models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer
    from .convert_cpmbee import check_vocabulary

    (tokenizer_cls, model_cls), kwargs = _loaders(
        trust_remote_code, (CpmBeeTokenizer, CpmBeeForCausalLM), (AutoTokenizer, AutoModelForCausalLM)
    )
    tokenizer = tokenizer_cls.from_pretrained(repo, **kwargs)
    model = model_cls.from_pretrained(repo, dtype=torch.float32, **kwargs).eval()
    check_vocabulary(model.config, tokenizer, str(repo))
    encoding, _ = encode_structured(tokenizer, [CPMBEE_PROMPT])
    with torch.no_grad():
        return model(**encoding).logits


def converted_chat_logits(repo: str | Path, trust_remote_code: bool = False) -> torch.Tensor:
    """Logits of the converted VisCPM-Chat on a gradient image and :data:`CHAT_QUESTION`."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..models.viscpm_chat.modeling_viscpm_chat import VisCPMChatForConditionalGeneration
    from ..models.viscpm_chat.processing_viscpm_chat import VisCPMChatProcessor
    from .convert_cpmbee import check_vocabulary

    (processor_cls, model_cls), kwargs = _loaders(
        trust_remote_code,
        (VisCPMChatProcessor, VisCPMChatForConditionalGeneration),
        (AutoProcessor, AutoModelForImageTextToText),
    )
    processor = processor_cls.from_pretrained(repo, **kwargs)
    model = model_cls.from_pretrained(repo, dtype=torch.float32, **kwargs).eval()
    check_vocabulary(model.config.text_config, processor.tokenizer, str(repo))
    image = Image.linear_gradient("L").convert("RGB").resize((320, 240))
    with torch.no_grad():
        return model(**processor(images=image, text=CHAT_QUESTION)).logits


def converted_paint_image(repo: str | Path, trust_remote_code: bool = False) -> torch.Tensor:
    """The converted VisCPM-Paint image (``(1, 3, H, W)`` in [0, 1]) for :data:`PAINT_CAPTION`, seed 0.

    Without ``trust_remote_code`` the pipeline is assembled from the plugin's classes, component by component, so
    that none of the repo's own code runs; with it, ``DiffusionPipeline`` loads the repo as it ships.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

    from ..models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer
    from ..pipelines.viscpm_paint import VisCPMPaintPipeline, VisCPMPaintTextEncoder
    from .convert_cpmbee import check_vocabulary

    repo = _local_repo(repo)
    if trust_remote_code:
        pipe = DiffusionPipeline.from_pretrained(repo, torch_dtype=torch.float32, trust_remote_code=True)
    else:
        pipe = VisCPMPaintPipeline(
            vae=AutoencoderKL.from_pretrained(repo / "vae", torch_dtype=torch.float32),
            text_encoder=VisCPMPaintTextEncoder.from_pretrained(repo / "text_encoder", dtype=torch.float32),
            tokenizer=CpmBeeTokenizer.from_pretrained(repo / "tokenizer"),
            unet=UNet2DConditionModel.from_pretrained(repo / "unet", torch_dtype=torch.float32),
            scheduler=DDPMScheduler.from_pretrained(repo / "scheduler"),
        )
    check_vocabulary(pipe.text_encoder.config.cpmbee_config, pipe.tokenizer, str(repo))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(PAINT_CAPTION, num_inference_steps=PAINT_STEPS, generator=generator, output_type="pt").images


def original_available() -> bool:
    """Whether the original implementation (the ``VisCPM`` package) can be imported here."""
    return importlib.util.find_spec("VisCPM") is not None


def _prepare_original() -> None:
    """On a machine without CUDA the original needs the reference helper that fixes its rotary table's device."""
    if not torch.cuda.is_available() and importlib.util.find_spec("original_on_cpu") is not None:
        import original_on_cpu  # noqa: F401


def _original_llm(original_config: dict):
    """The original fp32 ``CPMBeeTorch`` of ``original_config`` (weights still to load)."""
    from VisCPM.models.cpmbee import CPMBeeConfig, CPMBeeTorch

    return CPMBeeTorch(CPMBeeConfig(**{**original_config, "half": False})).float()


def _original_llm_config(config: dict) -> dict:
    """An original CPM-Bee config dict from the ``config.json`` fields of our ``CpmBeeConfig``."""
    from ..models.cpmbee.configuration_cpmbee import _ORIGINAL_KEYS

    return {key: config[key] for key in _ORIGINAL_KEYS if key in config}


def _read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _local_repo(repo: str | Path) -> Path:
    """The converted repo's folder (a hub repo id is downloaded, or read from the cache)."""
    if Path(repo).is_dir():
        return Path(repo)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(repo)))


def _llm_inference(llm, inputs: dict, **kwargs) -> torch.Tensor:
    """``CPMBeeTorch.inference`` on the inputs of the original ``_process_list`` (its first decoding call)."""
    logits, _, _ = llm.inference(
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
        **kwargs,
    )
    return logits


def original_cpmbee_logits(checkpoint: str | Path, original_config: dict) -> torch.Tensor:
    """Logits of the ORIGINAL ``CPMBeeTorch`` (fp32) on :data:`CPMBEE_PROMPT`, encoded by the original code."""
    _prepare_original()
    from VisCPM.cpm_tokenizers.bee import CPMBeeTokenizer
    from VisCPM.generation.vllm_bee import VLLMCPMBeeGeneration

    model = _original_llm(original_config).eval()
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
        return _llm_inference(model, inputs)


def original_chat_logits(
    checkpoint: str | Path, repo: str | Path, original_config: dict | None = None
) -> torch.Tensor:
    """Logits of the ORIGINAL ``VLU_CPMBee`` (fp32) on the image and question of :func:`converted_chat_logits`.

    The model is built as ``VisCPMChat.__init__`` builds it (BEiT-3 large settings of torchscale's
    ``EncoderConfig``), with the sizes of the converted repo's ``config.json``; the first call of the original
    beam search (``get_vllm_embedding``, then ``llm.inference``) gives the logits.
    """
    _prepare_original()
    from PIL import Image
    from torchscale.architecture.config import EncoderConfig
    from VisCPM.cpm_tokenizers.bee import CPMBeeTokenizer
    from VisCPM.generation.vllm_bee import VLLMCPMBeeBeamSearch
    from VisCPM.models import VLU_CPMBee
    from VisCPM.models.beit3 import BEiT3Wrapper
    from VisCPM.utils import utils

    config = _read_json(_local_repo(repo) / "config.json")
    vision = config["vision_config"]
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    encoder_config = EncoderConfig(
        img_size=vision["image_size"],
        patch_size=vision["patch_size"],
        vocab_size=state["vpm.beit3.text_embed.weight"].shape[0],
        multiway=True,
        layernorm_embedding=False,
        normalize_output=True,
        no_output_layer=True,
        drop_path_rate=0,
        encoder_embed_dim=vision["hidden_size"],
        encoder_attention_heads=vision["num_attention_heads"],
        encoder_ffn_embed_dim=vision["intermediate_size"],
        encoder_layers=vision["num_hidden_layers"],
        checkpoint_activations=None,
        max_source_positions=vision["max_text_positions"],
    )
    llm = _original_llm(original_config or _original_llm_config(config["text_config"]))
    model = VLU_CPMBee(
        llm=llm,
        vpm=BEiT3Wrapper(encoder_config),
        vision_dim=vision["hidden_size"],
        query_num=config["query_num"],
        device=torch.device("cpu"),
    )
    # A checkpoint may lack the unused masked-image-modelling head; every other tensor must be there.
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.startswith("vpm.mim_head.")]
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: missing {missing[:5]}, unexpected {unexpected[:5]} tensors")
    model = model.float().eval()
    beam_search = VLLMCPMBeeBeamSearch(model, CPMBeeTokenizer(), utils.build_transform(is_train=False), device="cpu")
    image = Image.linear_gradient("L").convert("RGB").resize((320, 240))
    data = {"image": "<unk>" * model.query_num, "context": "", "question": CHAT_QUESTION, "<ans>": ""}
    inputs, _ = beam_search._process_list([data])
    inputs["pixel_values"] = beam_search.transform(image).unsqueeze(0)
    with torch.no_grad():
        embedding, _ = model.get_vllm_embedding(inputs)
        return _llm_inference(model.llm, inputs, past_key_values=None, hidden_states=embedding)


def original_paint_image(
    checkpoint: str | Path, repo: str | Path, size: tuple[int, int], original_config: dict | None = None
) -> torch.Tensor:
    """The ORIGINAL VisCPM-Paint image (``(1, 3, H, W)`` in [0, 1]) for :data:`PAINT_CAPTION`, seed 0.

    ``VLG_CPMBee`` around an ``SDWrapper`` made with ``__new__`` (its ``__init__`` downloads SD-2.1-base): CPM-Bee,
    UNet and trans block from ``checkpoint``, the VAE and the ``DDPMScheduler`` from the converted repo. The
    inputs come from the original ``VisCPMPaint.build_input`` and the image from ``VLG_CPMBee.generate``.
    """
    _prepare_original()
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from VisCPM.cpm_tokenizers.bee import CPMBeeTokenizer
    from VisCPM.models.stablediffusion import CPMBeeTransBlock, SDWrapper
    from VisCPM.models.vlg_cpmbee import VLG_CPMBee
    from VisCPM.viscpm_paint import VisCPMPaint

    repo = _local_repo(repo)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    parts = {"llm": {}, "unet": {}, "trans_block": {}}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part not in parts:
            raise ValueError(f"{checkpoint}: unexpected tensor {key}")
        parts[part][rest] = value.float()
    if original_config is None:
        original_config = _original_llm_config(_read_json(repo / "text_encoder" / "config.json")["cpmbee_config"])
    llm = _original_llm(original_config)
    llm.load_state_dict(parts["llm"], strict=True)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(repo / "unet"))
    unet.load_state_dict(parts["unet"], strict=True)
    vae = AutoencoderKL.from_pretrained(repo / "vae", torch_dtype=torch.float32)
    dim_model = original_config["dim_model"]
    trans_block = CPMBeeTransBlock(dim_model, dim_model // 4, unet.config.cross_attention_dim)
    trans_block.load_state_dict(parts["trans_block"], strict=True)

    sd = SDWrapper.__new__(SDWrapper)
    torch.nn.Module.__init__(sd)
    sd.vae, sd.unet, sd.trans_block = vae, unet, trans_block
    sd.noise_scheduler = DDPMScheduler.from_pretrained(repo / "scheduler")
    sd.image_safety_checker = sd.feature_extractor = None
    sd.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    model = VLG_CPMBee(llm, sd).float().eval()
    paint = VisCPMPaint.__new__(VisCPMPaint)
    paint.tokenizer = CPMBeeTokenizer()
    height, width = size
    data, uncond = paint.build_input(PAINT_CAPTION, None, image_size=height)
    with torch.no_grad():
        images = model.generate(
            data,
            uncond,
            num_images_per_prompt=1,
            guidance_scale=7.5,
            num_inference_steps=PAINT_STEPS,
            height=height,
            width=width,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
    return torch.from_numpy(images).permute(0, 3, 1, 2)


CONVERTED_RUNS = {
    "cpmbee": ("logits", converted_cpmbee_logits),
    "viscpm_chat": ("logits", converted_chat_logits),
    "viscpm_paint": ("pixels", converted_paint_image),
}


def verify(
    original: str | Path,
    converted: str | Path,
    kind: str,
    original_config: str | Path | dict | None = None,
    trust_remote_code: bool = False,
) -> Report:
    """Confirm the repo's shard checksums, run it (and the original when possible); see the module docstring.

    The repo is run with this package's classes; only with ``trust_remote_code`` does its own shipped code run.
    """
    from ._io import verify_checksums

    kind = KINDS.get(kind, kind)
    output, run = CONVERTED_RUNS[kind]
    shards = verify_checksums(_local_repo(converted))
    ours = run(converted, trust_remote_code=trust_remote_code)
    report = _checksums(kind, output, ours)
    report.shards_verified = len(shards)
    config = original_config
    if config is not None and not isinstance(config, dict):
        config = _read_json(config)
    if not original_available():
        report.original = "the VisCPM package is not importable"
    elif kind == "cpmbee" and config is None:
        report.original = "VisCPM is importable, but --original-config is needed to build the original model"
    else:
        if kind == "cpmbee":
            theirs = original_cpmbee_logits(original, config)
        elif kind == "viscpm_chat":
            theirs = original_chat_logits(original, converted, config)
        else:
            theirs = original_paint_image(original, converted, tuple(ours.shape[-2:]), config)
        if theirs.shape != ours.shape:
            raise ValueError(f"original {output} have shape {list(theirs.shape)}, converted {list(ours.shape)}")
        report.original = "VisCPM " + str(Path(sys.modules["VisCPM"].__file__).parent)
        report.max_abs_diff = float((theirs.float() - ours.float()).abs().max())
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: 0 when the converted model runs (and matches the original within tolerance)."""
    parser = argparse.ArgumentParser(prog="verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--original", required=True, help="the original checkpoint the repo was converted from")
    parser.add_argument("--converted", required=True, help="the converted folder (or a hub repo id)")
    parser.add_argument("--kind", required=True, choices=sorted(KINDS))
    parser.add_argument(
        "--original-config",
        help="original CPM-Bee config JSON (needed for cpmbee; chat and paint default to the repo's)",
    )
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed difference (default 1e-4)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="load the repo with the Python code it ships (runs that code); by default this package's classes are used",
    )
    args = parser.parse_args(argv)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # library chatter must not mix with the report
            report = verify(args.original, args.converted, args.kind, args.original_config, args.trust_remote_code)
    except CheckpointError as err:
        print(f"{parser.prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(json.dumps(report.__dict__) if args.json else "\n".join(report.lines()))
    if report.max_abs_diff is not None and report.max_abs_diff > args.tolerance:
        print(f"error: difference {report.max_abs_diff:.3e} exceeds the tolerance {args.tolerance:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
