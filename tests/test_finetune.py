"""`viscpm finetune`: llava records + an image folder -> a repo that `chat()` loads; 1 and 2 processes (torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _repos import converted_repo
from test_modeling_viscpm_chat import make_image
from transformers import AutoModelForImageTextToText, AutoProcessor

from transformers_viscpm.cli import main as cli_main

QA = [
    ("What is in the image?", "A red apple."),
    ("这是什么？", "一只小猫。"),
    ("What colour is the sky?", "Blue."),
    ("Is a < b?", "Yes, a < b 😀."),
]


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory) -> Path:
    return converted_repo(tmp_path_factory, "viscpm_chat", remote_code=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Four llava records (JSONL, relative image paths) and their image folder."""
    folder = tmp_path_factory.mktemp("llava")
    (folder / "images").mkdir()
    lines = []
    for i, (question, answer) in enumerate(QA):
        make_image(seed=20 + i, width=64, height=48).save(folder / "images" / f"{i}.png")
        turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
        lines.append(json.dumps({"image": f"{i}.png", "conversations": turns}, ensure_ascii=False))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def finetune_args(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--data", str(data / "data.jsonl"), "--image-folder", str(data / "images"),
        "--output", str(output), "--max-steps", "2", "--batch-size", "2", "--learning-rate", "1e-3",
        "--eval-ratio", "0.25", "--no-progress", *extra,
    ]  # fmt: skip


def chats(folder: Path, data: Path) -> str:
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    from PIL import Image

    answer, context, _ = model.chat(Image.open(data / "images" / "0.png"), QA[0][0], processor=processor)
    assert context.startswith(f"User: {QA[0][0]}\nAI: ")
    return answer


def test_finetune_full_writes_a_chat_repo(tiny_chat, dataset, tmp_path):
    out = tmp_path / "full"
    assert cli_main(["finetune", *finetune_args(tiny_chat, dataset, out)]) == 0
    assert (out / "model.safetensors").exists() and (out / "processor_config.json").exists()
    assert "fine-tuned VisCPM-Chat" in (out / "README.md").read_text()
    assert json.loads((out / "finetune_metrics.json").read_text())["eval_loss"] > 0
    assert isinstance(chats(out, dataset), str)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial or trainer folders left


@pytest.mark.parametrize("merge", [False, True])
def test_finetune_lora_adapter_or_merged(tiny_chat, dataset, tmp_path, merge):
    out = tmp_path / "lora"
    extra = ["--lora", "--lora-r", "2", *(["--merge"] if merge else [])]
    assert cli_main(["finetune", *finetune_args(tiny_chat, dataset, out, *extra)]) == 0
    assert (out / "adapter_config.json").exists() != merge
    assert (out / "model.safetensors").exists() == merge
    assert isinstance(chats(out, dataset), str)  # an adapter repo loads its base through transformers' PEFT support


def test_finetune_errors_are_one_line(tiny_chat, dataset, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "records"}')
    assert cli_main(["finetune", *finetune_args(tiny_chat, dataset, tmp_path / "o")[:2], "--data", str(bad),
                     "--output", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "llava records" in capsys.readouterr().out
    assert cli_main(["finetune", *finetune_args(tiny_chat, dataset, tmp_path / "o", "--merge")]) == 2
    assert "--merge merges a LoRA adapter" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_finetune_two_processes_agree(tiny_chat, dataset, tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU): both ranks end with the same weights, rank 0 writes the repo."""
    out, report = tmp_path / "ddp", tmp_path / "report"
    report.mkdir()
    worker = Path(__file__).parent / "ddp_finetune_worker.py"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path]),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(worker), str(report), *finetune_args(tiny_chat, dataset, out, "--batch-size", "1")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    base = AutoModelForImageTextToText.from_pretrained(tiny_chat)
    assert ranks[0]["model.mapping.0.weight"] != float(base.model.mapping[0].weight.double().sum())
    assert (out / "model.safetensors").exists()


def test_finetune_overfits_four_records(dataset, tmp_path):
    """The whole path learns: the tiny model fine-tuned on 4 records answers their questions with their answers."""
    from PIL import Image
    from test_modeling_viscpm_chat import convert_tiny_chat

    base = convert_tiny_chat(tmp_path)
    out = tmp_path / "overfit"
    argv = finetune_args(base, dataset, out, "--batch-size", "4", "--eval-ratio", "0", "--logging-steps", "50")
    argv[argv.index("--max-steps") + 1], argv[argv.index("--learning-rate") + 1] = "50", "1e-2"
    assert cli_main(["finetune", *argv, "--lr-scheduler-type", "constant"]) == 0
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    answers = [
        model.chat(Image.open(dataset / "images" / f"{i}.png"), question, processor=processor, num_beams=1,
                   max_new_tokens=16)[0]
        for i, (question, _) in enumerate(QA)
    ]  # fmt: skip
    assert sum(answer == expected for answer, (_, expected) in zip(answers, QA)) >= 3, answers


def test_readme_finetune_snippet_runs(tmp_path_factory, tmp_path):
    """README's fine-tuning snippet, as written, by repo id against the offline hub cache; the adapter then loads."""
    from _repos import hub_cache, offline_env, run_python

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    snippet = readme.split("<!-- finetune-snippet -->\n```python\n", 1)[1].split("```", 1)[0]
    env = offline_env(hub_cache(tmp_path_factory, remote_code=False), tmp_path / "modules")
    check = (
        "\nimport json\n"
        'loaded = AutoModelForImageTextToText.from_pretrained("viscpm-chat-lora")\n'
        "print(json.dumps({'adapter': bool(getattr(loaded, '_hf_peft_config_loaded', False))}))\n"
    )
    assert run_python(snippet + check, env, tmp_path) == {"adapter": True}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs CUDA (bitsandbytes 4-bit)")
def test_qlora_trains_on_gpu(tiny_chat):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from transformers_viscpm.training import VisCPMChatDataCollator

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForImageTextToText.from_pretrained(tiny_chat, quantization_config=quantization, device_map="cuda")
    model = get_peft_model(prepare_model_for_kbit_training(model), LoraConfig(r=4))
    records = [
        {"image": make_image(seed=30, width=64, height=48),
         "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        for q, a in QA[:2]
    ]  # fmt: skip
    batch = VisCPMChatDataCollator(AutoProcessor.from_pretrained(tiny_chat))(records)
    loss = model(**{k: v.to("cuda") for k, v in batch.items()}).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed ZeRO needs CUDA")
def test_finetune_deepspeed_zero2_on_gpu(tiny_chat, dataset, tmp_path):
    pytest.importorskip("deepspeed")
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                                  "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"}}))  # fmt: skip
    out = tmp_path / "ds"
    assert cli_main(["finetune", *finetune_args(tiny_chat, dataset, out, "--deepspeed", str(config))]) == 0
    assert isinstance(chats(out, dataset), str)
