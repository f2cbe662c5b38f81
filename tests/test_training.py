"""Fine-tuning against the original: the training loss and gradients equal the original's.

Golden values come from `tests/fixtures/record/record_train.py` (the original `convert_data_to_id` + `CPMBeeCollater` +
`VLU_CPMBee.forward(data=...)` / `CPMBeeTorch.forward`, mean cross-entropy, backward) on the tiny seeded checkpoints
of `test_modeling_viscpm_chat` and `synthetic.cpmbee`. Ours: the same checkpoints through our converters, the records
through our collators, `model(**batch).loss.backward()`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _repos import converted_repo
from test_modeling_viscpm_chat import convert_tiny_chat, make_image
from transformers import AutoTokenizer, Trainer, TrainingArguments

from transformers_viscpm import CpmBeeForCausalLM, VisCPMChatForConditionalGeneration, VisCPMChatProcessor
from transformers_viscpm.conversion.convert_cpmbee import convert_cpmbee
from transformers_viscpm.models.cpmbee.encoding_cpmbee import encode_structured
from transformers_viscpm.models.cpmbee.structure_cpmbee import GENERATION_KEYS
from transformers_viscpm.synthetic.cpmbee import original_cpmbee_state_dict
from transformers_viscpm.training import (
    CpmBeeDataCollator,
    VisCPMChatDataCollator,
    freeze_for_finetuning,
)

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "train_golden.json").read_text(encoding="utf-8"))
LOSS_TOL = 1e-5
GRAD_RTOL = 1e-4


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> Path:
    return convert_tiny_chat(tmp_path_factory.mktemp("train-chat"))


@pytest.fixture(scope="module")
def cpmbee_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train-cpmbee")
    cfg = GOLDEN["cpmbee_config"]
    torch.save(original_cpmbee_state_dict(cfg, seed=GOLDEN["cpmbee_seed"]), folder / "cpm-bee.pt")
    (folder / "cpm-bee.json").write_text(json.dumps(cfg))
    return convert_cpmbee(folder / "cpm-bee.pt", folder / "cpm-bee.json", folder / "converted", show_progress=False)


@pytest.fixture(scope="module")
def cpmbee_model(cpmbee_folder) -> CpmBeeForCausalLM:
    return CpmBeeForCausalLM.from_pretrained(cpmbee_folder).train()


@pytest.fixture(scope="module")
def chat_model(chat_folder) -> VisCPMChatForConditionalGeneration:
    return freeze_for_finetuning(VisCPMChatForConditionalGeneration.from_pretrained(chat_folder).train())


@pytest.fixture(scope="module")
def processor(chat_folder) -> VisCPMChatProcessor:
    return VisCPMChatProcessor.from_pretrained(chat_folder)


def llava_record(name: str) -> dict:
    """A golden record in the released llava format (the image as a PIL image)."""
    record = GOLDEN["records"][name]
    conversations = []
    for i, (question, answer) in enumerate(record["rounds"]):
        conversations.append({"from": "human", "value": f"<image>\n{question}" if i == 0 else question})
        conversations.append({"from": "gpt", "value": answer})
    return {"image": make_image(**GOLDEN["images"][record["image"]]), "conversations": conversations}


def our_parameter(model: torch.nn.Module, original_name: str) -> torch.nn.Parameter:
    """Our parameter for an original VLU_CPMBee / CPMBeeTorch name (the converters' key maps, by suffix)."""
    prefix, _, rest = original_name.partition(".")
    params = dict(model.named_parameters())
    if prefix == "llm" or prefix not in {"query", "mapping", "vpm"}:
        suffix = rest if prefix == "llm" else original_name
        scope = "language_model." if prefix == "llm" else ""
    elif prefix == "vpm":
        suffix, scope = rest.removeprefix("beit3."), "vision_model."
    else:
        suffix, scope = original_name, "model."
    matches = [name for name in params if name.endswith(suffix) and scope in name and "lm_head" not in name]
    assert len(matches) == 1, (original_name, matches)
    return params[matches[0]]


def assert_rows_match(batch: dict, golden_rows: list[dict], eos_id: int) -> None:
    """Our (left-padded) ids/labels are the original's (right-padded) ids/targets; ours may close with `</s>`."""
    for b, row in enumerate(golden_rows):
        valid = batch["attention_mask"][b].bool()
        ids = batch["input_ids"][b][valid].tolist()
        labels = batch["labels"][b][valid].tolist()
        shifted = labels[1:] + [-100]  # the target of each position, as the original's `target`
        n = len(row["input_ids"])
        assert ids[:n] == row["input_ids"]
        assert ids[n:] in ([], [eos_id])  # the closing `</s>` of an answer that ends the sample
        assert shifted[:n] == row["target"]
        assert all(label == -100 for label in shifted[n:])


def assert_grads_match(model: torch.nn.Module, golden_norms: dict[str, float]) -> dict[str, float]:
    errors = {}
    for name, expected in golden_norms.items():
        grad = our_parameter(model, name).grad
        actual = 0.0 if grad is None else grad.double().norm().item()
        errors[name] = abs(actual - expected) / max(expected, 1e-12)
        assert actual == pytest.approx(expected, rel=GRAD_RTOL, abs=1e-9), name
    return errors


@pytest.mark.parametrize("case", sorted(GOLDEN["chat_cases"]))
def test_chat_loss_and_gradients_match_original(chat_model, processor, case):
    golden = GOLDEN["chat_cases"][case]
    batch = VisCPMChatDataCollator(processor)([llava_record(name) for name in golden["records"]])
    assert_rows_match(batch, golden["rows"], processor.tokenizer.eos_token_id)
    assert int((batch["labels"] != -100).sum()) == golden["num_targets"]
    chat_model.zero_grad()
    loss = chat_model(**batch).loss
    loss.backward()
    assert loss.item() == pytest.approx(golden["loss"], abs=LOSS_TOL)
    assert_grads_match(chat_model, golden["grad_norms"])


@pytest.mark.parametrize("case", sorted(GOLDEN["cpmbee_cases"]))
def test_cpmbee_loss_and_gradients_match_original(cpmbee_folder, cpmbee_model, case):
    golden = GOLDEN["cpmbee_cases"][case]
    tokenizer = AutoTokenizer.from_pretrained(cpmbee_folder)
    batch = CpmBeeDataCollator(tokenizer)(golden["dicts"])
    assert_rows_match(batch, golden["rows"], tokenizer.eos_token_id)
    model = cpmbee_model
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    assert loss.item() == pytest.approx(golden["loss"], abs=LOSS_TOL)
    assert_grads_match(model, golden["grad_norms"])


# --- the encoding rule, Trainer, PEFT (on the shared tiny repos of `_repos`) ---


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory) -> Path:
    return converted_repo(tmp_path_factory, "viscpm_chat", remote_code=False)


@pytest.fixture(scope="module")
def tiny_cpmbee(tmp_path_factory) -> Path:
    return converted_repo(tmp_path_factory, "cpmbee", remote_code=False)


def records(n: int = 2) -> list[dict]:
    qa = [("What is in the image?", "A red apple."), ("这是什么？", "一只小猫 😀。"), ("Is a < b?", "Yes, a < b.")]
    return [
        {
            "image": make_image(seed=10 + i, width=64, height=48),
            "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
        }
        for i, (q, a) in enumerate(qa[:n])
    ]


def test_filled_answer_trains_empty_answer_generates(cpmbee_folder):
    tokenizer = AutoTokenizer.from_pretrained(cpmbee_folder)
    prompt, _ = encode_structured(tokenizer, [{"input": "hi", "<ans>": ""}])
    assert "labels" not in prompt and prompt["answer_segment_ids"].shape == (1, 1)
    train, _ = encode_structured(tokenizer, [{"input": "hi", "<ans>": "hello"}])
    answer = tokenizer.encode_markup("hello")[0]
    assert train["labels"][0][train["labels"][0] != -100].tolist() == [*answer, tokenizer.eos_token_id]
    assert train["input_ids"][0, -1] == tokenizer.eos_token_id and not bool(train["context"][0, -1])
    with pytest.raises(ValueError, match="filled and some are empty"):
        encode_structured(tokenizer, [{"input": "hi", "<ans>": {"a": "x", "b": ""}}])
    with pytest.raises(ValueError, match="mixes training samples"):
        encode_structured(tokenizer, [{"input": "hi", "<ans>": "x"}, {"input": "hi", "<ans>": ""}])
    with pytest.raises(ValueError, match="more than max_length=3"):
        encode_structured(tokenizer, [{"input": "hi", "<ans>": "x"}], max_length=3)


def test_labels_after_the_prompt_raise(cpmbee_folder, cpmbee_model):
    tokenizer = AutoTokenizer.from_pretrained(cpmbee_folder)
    prompt, _ = encode_structured(tokenizer, [{"input": "hi", "<ans>": ""}])
    inputs = {k: v for k, v in prompt.items() if k not in GENERATION_KEYS}
    with pytest.raises(ValueError, match="CPM-Bee only learns answers"):
        cpmbee_model(**inputs, labels=inputs["input_ids"])


def test_freeze_for_finetuning_follows_the_original(tiny_chat):
    model = freeze_for_finetuning(
        VisCPMChatForConditionalGeneration.from_pretrained(tiny_chat), tune_vision=False, tune_llm=False
    )
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any("vision_embed" in n or ".A." in n or "language_model" in n for n in trainable)
    assert any(".B." in n for n in trainable) and {"model.query", "model.mapping.0.weight"} <= trainable


def test_trainer_trains_on_llava_records(tiny_chat, tmp_path):
    model = freeze_for_finetuning(VisCPMChatForConditionalGeneration.from_pretrained(tiny_chat))
    processor = VisCPMChatProcessor.from_pretrained(tiny_chat)
    collator = VisCPMChatDataCollator(processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to="none")
    args.update(learning_rate=1e-3, save_strategy="no", use_cpu=True, gradient_checkpointing=True, logging_steps=1)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        Trainer(model=model, args=TrainingArguments(**args), train_dataset=records(), data_collator=collator).train()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**args, remove_unused_columns=False),
        train_dataset=records(),
        eval_dataset=records(),
        data_collator=collator,
    )
    assert trainer.label_names == ["labels"]
    trainer.train()
    losses = [float(log["loss"]) for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "model.mapping.0.weight" in changed and not any("vision_embed" in n for n in changed)


def _lora_layers(model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def test_lora_default_targets_save_load_merge(tiny_chat, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    processor = VisCPMChatProcessor.from_pretrained(tiny_chat)
    batch = VisCPMChatDataCollator(processor)(records())
    lora = get_peft_model(
        VisCPMChatForConditionalGeneration.from_pretrained(tiny_chat), LoraConfig(r=4, init_lora_weights=False)
    )
    layers = _lora_layers(lora)
    assert layers and all(n.endswith(("project_q", "project_v")) and "language_model" in n for n in layers)
    lora.train()
    lora(**batch).loss.backward()
    with_grad = {n for n, p in lora.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    lora.eval()
    with torch.no_grad():
        reference = lora(**batch).logits
    lora.save_pretrained(tmp_path / "adapter")
    base = VisCPMChatForConditionalGeneration.from_pretrained(tiny_chat).eval()
    with torch.no_grad():
        plain = base(**batch).logits
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, reference)
        merged = loaded.merge_and_unload()
        assert not _lora_layers(merged)
        torch.testing.assert_close(merged(**batch).logits, reference, atol=1e-4, rtol=1e-4)
    assert (reference - plain).abs().max() > 1e-3  # the adapter changes the model


def test_lora_on_cpmbee_and_on_named_beit3_experts(tiny_chat, tiny_cpmbee):
    from peft import LoraConfig, get_peft_model

    cpmbee = get_peft_model(CpmBeeForCausalLM.from_pretrained(tiny_cpmbee), LoraConfig(r=2))
    assert _lora_layers(cpmbee) and all(n.endswith(("project_q", "project_v")) for n in _lora_layers(cpmbee))
    experts = get_peft_model(
        VisCPMChatForConditionalGeneration.from_pretrained(tiny_chat),
        LoraConfig(r=2, target_modules=r".*vision_model\..*\.q_proj\.B"),
    )
    layers = _lora_layers(experts)
    assert layers and all("vision_model" in n and n.endswith("q_proj.B") for n in layers)
