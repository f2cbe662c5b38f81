"""Fine-tuning against the original: the training loss and gradients equal the original's.

Golden values come from `tests/fixtures/record/record_train.py` (the original `convert_data_to_id` + `CPMBeeCollater` +
`VLU_CPMBee.forward(data=...)` / `CPMBeeTorch.forward`, mean cross-entropy, backward) on the tiny seeded checkpoints
of `test_modeling_viscpm_chat` and `synthetic.cpmbee`. Ours: the same checkpoints through our converters, the records
through our collators, `model(**batch).loss.backward()`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_modeling_viscpm_chat import convert_tiny_chat, make_image
from transformers import AutoTokenizer

from transformers_viscpm import CpmBeeForCausalLM, VisCPMChatForConditionalGeneration, VisCPMChatProcessor
from transformers_viscpm.conversion.convert_cpmbee import convert_cpmbee
from transformers_viscpm.synthetic.cpmbee import original_cpmbee_state_dict
from transformers_viscpm.training import CpmBeeDataCollator, VisCPMChatDataCollator, freeze_for_finetuning

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
