# Copyright 2025 The transformers-viscpm developers. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""`viscpm finetune`: fine-tune VisCPM-Chat on a llava-format JSON/JSONL file with `Trainer`, fully or with LoRA.

The result is a repo that `chat()` loads: merged weights (full fine-tuning, or LoRA with `--merge`), or a LoRA adapter
(`adapter_config.json` pointing at the base model) that transformers loads through its PEFT integration. Under
`torchrun --nproc_per_node N` / `accelerate launch` it trains data-parallel (gloo on CPU); `--deepspeed cfg.json`
hands the config to `Trainer` (ZeRO on GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "load_records", "main", "run"]


class FinetuneError(ValueError):
    """A user error of `viscpm finetune` (bad data file, options that do not fit together)."""


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a llava JSON file (a list) or a JSONL file (one record a line)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        records = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as err:
        raise FinetuneError(f"{path} is neither a JSON list nor JSONL: {err}") from None
    if not records or not all(isinstance(r, dict) and ("conversations" in r or "messages" in r) for r in records):
        raise FinetuneError(f"{path} must hold llava records with `image` and `conversations` (or `messages`).")
    return records


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viscpm finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="converted VisCPM-Chat folder or hub repo id")
    parser.add_argument("--data", required=True, help="llava-format JSON or JSONL records")
    parser.add_argument("--image-folder", help="folder that relative `image` paths are read from")
    parser.add_argument("--output", required=True, help="folder of the fine-tuned repo (must not exist or be empty)")
    parser.add_argument("--eval-data", help="records for the eval loss (default: a held-out part of --data)")
    parser.add_argument(
        "--eval-ratio", type=float, default=0.05, help="held-out fraction when there is no --eval-data"
    )
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter (peft) instead of all weights")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-target-modules", nargs="+", help="default: CPM-Bee's project_q and project_v")
    parser.add_argument("--merge", action="store_true", help="with --lora: save merged weights, not the adapter")
    parser.add_argument("--no-tune-vision", dest="tune_vision", action="store_false", help="freeze BEiT-3's A experts")
    parser.add_argument("--no-tune-llm", dest="tune_llm", action="store_false", help="freeze the language model")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=1, help="records per device and step")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--lr-scheduler-type", default="linear", help="a transformers scheduler name (e.g. constant)")
    parser.add_argument("--max-length", type=int, help="longest round in tokens (a longer one is an error)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--deepspeed", help="DeepSpeed config JSON (e.g. ZeRO-2/3), passed to Trainer")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser


def _split(records: list[dict], eval_records: list[dict] | None, ratio: float, seed: int) -> tuple[list, list]:
    if eval_records is not None or ratio <= 0 or len(records) < 2:
        return records, eval_records or []
    shuffled = records[:]
    random.Random(seed).shuffle(shuffled)
    held_out = min(len(records) - 1, max(1, round(ratio * len(records))))
    return shuffled[held_out:], shuffled[:held_out]


def _card(args: argparse.Namespace, metrics: dict[str, float], adapter: bool) -> str:
    kind = "a LoRA adapter for" if adapter else "a fine-tuned"
    return textwrap.dedent(
        f"""\
        ---
        library_name: {"peft" if adapter else "transformers"}
        base_model: {args.model}
        pipeline_tag: image-text-to-text
        tags: [viscpm, viscpm_chat, fine-tuned]
        ---
        # {Path(args.output).name}

        This is {kind} VisCPM-Chat (`{args.model}`), trained with `viscpm finetune` on `{Path(args.data).name}`
        ({"LoRA r=" + str(args.lora_r) if args.lora else "full fine-tuning"}, the original VisCPM objective).
        Final eval loss: {metrics.get("eval_loss", float("nan")):.4f}.

        ```python
        import transformers_viscpm  # registers VisCPM-Chat with transformers
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained("{Path(args.output).name}")
        answer, context, _ = model.chat(image, "What is in the image?")
        ```
        """
    )


def run(argv: Sequence[str] | None = None):
    """Fine-tune as `viscpm finetune` does; returns the `Trainer` (its model is the trained one)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments, set_seed

    from .conversion._io import atomic_output_dir, check_output_dir
    from .training import VisCPMChatDataCollator, freeze_for_finetuning

    args = build_parser().parse_args(argv)
    if args.merge and not args.lora:
        raise FinetuneError("--merge merges a LoRA adapter: it needs --lora")
    check_output_dir(args.output, args.overwrite)
    set_seed(args.seed)
    train_records, eval_records = _split(
        load_records(args.data), load_records(args.eval_data) if args.eval_data else None, args.eval_ratio, args.seed
    )
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model)
    freeze_for_finetuning(model, tune_vision=args.tune_vision, tune_llm=args.tune_llm)
    if args.lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise FinetuneError("--lora needs peft: pip install 'transformers-viscpm[train]'") from None
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=args.lora_target_modules)
        model = get_peft_model(model, config)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    import torch

    training_args = TrainingArguments(
        output_dir=str(Path(args.output).absolute().parent / f".{Path(args.output).name}.trainer"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # the collator reads the record columns (image, conversations)
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        deepspeed=args.deepspeed,
        seed=args.seed,
        disable_tqdm=not args.progress,
        use_cpu=not torch.cuda.is_available(),  # also what makes torchrun on CPU data-parallel (gloo)
        ddp_backend="gloo" if world_size > 1 and not torch.cuda.is_available() else None,
        dataloader_num_workers=0,
    )
    collator = VisCPMChatDataCollator(processor, image_folder=args.image_folder, max_length=args.max_length)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_records,
        eval_dataset=eval_records or None,
        data_collator=collator,
    )
    trainer.train()
    metrics = trainer.evaluate() if eval_records else {}
    if metrics:
        trainer.log_metrics("eval", metrics)
    if trainer.is_world_process_zero():
        with atomic_output_dir(args.output, overwrite=args.overwrite) as folder:
            trained = trainer.model
            adapter = args.lora and not args.merge
            if args.lora and args.merge:
                trained = trained.merge_and_unload()
            trained.save_pretrained(folder)
            processor.save_pretrained(folder)
            (folder / "README.md").write_text(_card(args, metrics, adapter), encoding="utf-8")
            (folder / "finetune_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        shutil.rmtree(training_args.output_dir, ignore_errors=True)  # logs only: save_strategy="no"
    return trainer


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `viscpm finetune` (and `python -m transformers_viscpm.finetune`)."""
    try:
        run(argv)
    except (FinetuneError, FileExistsError, FileNotFoundError) as err:
        print(f"viscpm finetune: error: {err}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
