"""CPM-Bee generation against golden results of the original VisCPM beam search.

The golden file comes from tests/fixtures/record/record_generation_cpmbee.py: tiny seeded CPM-Bee models (the real
vocabulary; EOS and `<unk>` embedding rows scaled so that random weights do pick them), several prompt dicts and
settings, and the original `_decode` result ids.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessorList

from transformers_viscpm.models.cpmbee.configuration_cpmbee import CpmBeeConfig
from transformers_viscpm.models.cpmbee.encoding_cpmbee import encode_structured
from transformers_viscpm.models.cpmbee.generation_cpmbee import (
    MASKED_LOGIT,
    CpmBeeBeamSearchSettings,
    CpmBeeExtTableLogitsProcessor,
    _apply_repetition_penalty,
    _FinishedHypotheses,
    cpmbee_beam_search,
    generate_answers,
)
from transformers_viscpm.models.cpmbee.modeling_cpmbee import CpmBeeForCausalLM
from transformers_viscpm.models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer
from transformers_viscpm.synthetic.cpmbee import original_cpmbee_state_dict

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "generation_cpmbee_golden.json").read_text("utf-8"))
CASES = {case["name"]: case for case in GOLDEN["cases"]}


@cache
def tokenizer() -> CpmBeeTokenizer:
    return CpmBeeTokenizer()


@cache
def model(config_name: str) -> CpmBeeForCausalLM:
    """Our model loaded from the original-layout seeded weights the recorder used (same embedding-row scaling)."""
    original_config = GOLDEN["configs"][config_name]
    state_dict = original_cpmbee_state_dict(original_config, GOLDEN["seed"])
    with torch.no_grad():
        state_dict["input_embedding.weight"][GOLDEN["eos_id"]] *= GOLDEN["eos_scale"][config_name]
        state_dict["input_embedding.weight"][1] *= GOLDEN["unk_scale"][config_name]
        state_dict["input_embedding.weight"][6] *= GOLDEN["bos_scale"][config_name]
    lm = CpmBeeForCausalLM(CpmBeeConfig.from_original_config(original_config))
    missing, unexpected = lm.load_state_dict({f"cpmbee.{k}": v for k, v in state_dict.items()}, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    lm.tie_weights()
    return lm.eval()


def settings_of(case: dict) -> dict:
    s = case["settings"]
    return {
        "num_beams": s["beam_size"],
        "max_new_tokens": s["max_length"],
        "repetition_penalty": s["repetition_penalty"],
        "length_penalty": s["length_penalty"],
        "temperature": s["temperature"],
        "repetition_window": s.get("repetition_window"),
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_beam_search_matches_original(name):
    case = CASES[name]
    encoding, infos = encode_structured(tokenizer(), case["data_list"])
    result = cpmbee_beam_search(model(case["config"]), encoding, infos, **settings_of(case))
    assert [[list(pair) for pair in pairs] for pairs in result] == case["result_ids"]
    for info, golden in zip(infos, case["answers"]):
        assert {str(k): v for k, v in info.ext_table.items()} == golden["ext_table"]
        assert [list(path) for path in info.answer_placeholders] == golden["answer_paths"]


@pytest.mark.parametrize(
    "name", ["nested_chat", "batch_greedy", "batch_oov_chat", "batch_masked_chat", "bos_nested_chat"]
)
def test_generate_answers_fills_dicts(name):
    case = CASES[name]
    generation_config = GenerationConfig(**{k: v for k, v in settings_of(case).items() if k != "repetition_window"})
    filled = generate_answers(
        model(case["config"]),
        tokenizer(),
        case["data_list"],
        generation_config=generation_config,
        repetition_window=settings_of(case)["repetition_window"],
    )
    for data, out, golden in zip(case["data_list"], filled, case["answers"]):
        assert out is not data
        for answer_id, path in enumerate(golden["answer_paths"], start=1):
            node = out["<ans>"]
            for part in path:
                node = node[part]
            expected = golden["answers"].get(str(answer_id))
            # Real text; the original's decode (markup) agrees: these answers hold no `<` outside specials such as `<s>`.
            assert node == (None if expected is None else expected["raw_text"])
            if expected is not None:
                assert expected["raw_text"] == expected["original_decode"]
        assert {k: v for k, v in out.items() if k != "<ans>"} == {k: v for k, v in data.items() if k != "<ans>"}


def test_missing_answer_is_none():
    # batch_greedy: the first sample never emits EOS, so its second answer ("place") is never reached.
    case = CASES["batch_greedy"]
    filled = generate_answers(model("plain"), tokenizer(), case["data_list"], **settings_of(case))
    assert filled[0]["<ans>"]["place"] is None
    assert isinstance(filled[0]["<ans>"]["subject"], str) and filled[0]["<ans>"]["subject"]
    assert case["data_list"][0]["<ans>"] == {"subject": "", "place": ""}


def test_inputs_embeds_path_matches_ids():
    case = CASES["batch_chat"]
    lm = model("plain")
    encoding, infos = encode_structured(tokenizer(), case["data_list"])
    embeds = lm.embed_input_ids(encoding["input_ids"], encoding["input_id_subs"])
    result = cpmbee_beam_search(lm, encoding, infos, inputs_embeds=embeds, **settings_of(case))
    assert [[list(pair) for pair in pairs] for pairs in result] == case["result_ids"]


def test_settings_matter():
    """The golden cases are sensitive to the settings (a broken penalty or window would show)."""
    case = CASES["single_window"]
    encoding, infos = encode_structured(tokenizer(), case["data_list"])
    no_window = {**settings_of(case), "repetition_window": None}
    result = cpmbee_beam_search(model("plain"), encoding, infos, **no_window)
    assert [[list(pair) for pair in pairs] for pairs in result] != case["result_ids"]


def test_ext_table_processor_masks_per_sample_and_beam():
    allow_unk = torch.tensor([True, False])
    ext_mask = torch.tensor([[True, False], [False, True]])
    processor = CpmBeeExtTableLogitsProcessor(allow_unk, ext_mask, vocab_size=5, unk_token_id=1)
    scores = torch.arange(4 * 7, dtype=torch.float32).view(4, 7)  # 2 samples x 2 beams, vocab 5 + 2 ext
    out = processor(torch.zeros(4, 1, dtype=torch.long), scores)
    m = MASKED_LOGIT
    expected = torch.tensor(
        [
            [0, 1, 2, 3, 4, 5, m],
            [7, 8, 9, 10, 11, 12, m],
            [14, m, 16, 17, 18, m, 20],
            [21, m, 23, 24, 25, m, 27],
        ]
    )
    assert torch.equal(out, expected)
    assert scores[2, 1] == 15  # not modified in place
    with pytest.raises(ValueError, match="cannot be split"):
        processor(torch.zeros(3, 1, dtype=torch.long), scores[:3])
    config = CpmBeeConfig(vocab_size=5, dim_model=8, dim_ff=8, num_layers=1, num_heads=1, dim_head=8)
    kwargs = {"allow_unk": allow_unk, "ext_table_mask": ext_mask}
    from_kwargs = CpmBeeExtTableLogitsProcessor.from_model_kwargs(config, kwargs)
    assert torch.equal(from_kwargs(None, scores), expected)
    assert CpmBeeExtTableLogitsProcessor.from_model_kwargs(config, {"allow_unk": allow_unk}) is None


def test_ext_table_processor_in_stock_generate():
    """In stock greedy `generate`, the processor gives the original's ids (golden: beam 1, no EOS ever on top, rp 1)."""
    case = CASES["batch_greedy"]
    encoding, _ = encode_structured(tokenizer(), case["data_list"])
    processor = CpmBeeExtTableLogitsProcessor.from_model_kwargs(model("plain").config, encoding)
    steps = len(case["result_ids"][0])
    out = model("plain").generate(
        **encoding,
        do_sample=False,
        num_beams=1,
        max_new_tokens=steps,
        logits_processor=LogitsProcessorList([processor]),
    )
    generated = out[:, encoding["input_ids"].shape[1] :].tolist()
    assert generated == [[token for token, _ in pairs] for pairs in case["result_ids"]]


def test_repetition_penalty_rule():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5]])
    fed = torch.tensor([[0, 1, 0, 4]])
    out = _apply_repetition_penalty(logits, fed, 2.0, None)
    assert out.tolist() == [[1.0, -4.0, 3.0, -1.0, 0.25]]  # each id once, even when fed twice
    out = _apply_repetition_penalty(logits, fed, 2.0, 2)
    assert out.tolist() == [[1.0, -2.0, 3.0, -1.0, 0.25]]  # window: the last two fed ids only
    assert _apply_repetition_penalty(logits, fed, 1.0, None) is logits


def test_finished_hypotheses_rules():
    hyps = _FinishedHypotheses(num_beams=2, length_penalty=2.0)
    hyps.add([(1, 1)], -1.0)  # score -1
    hyps.add([(2, 1), (7, 1)], -8.0)  # score -2
    assert hyps.worst_score == -2.0
    hyps.add([(3, 1), (7, 1)], -2.0)  # score -0.5 evicts -2
    assert [s for s, _ in hyps.entries] == [-1.0, -0.5] and hyps.worst_score == -1.0
    assert hyps.best() == [(3, 1), (7, 1)]
    assert hyps.is_done(-4.0, 2) and not hyps.is_done(-3.0, 2)
    assert not _FinishedHypotheses(1, 1.0).is_done(0.0, 1)  # no finished hypothesis yet


def test_settings_from_generation_config():
    config = GenerationConfig(num_beams=4, temperature=0.7, length_penalty=3.0)
    settings = CpmBeeBeamSearchSettings.from_generation_config(config, repetition_window=5, max_new_tokens=7)
    assert (settings.num_beams, settings.temperature, settings.length_penalty) == (4, 0.7, 3.0)
    assert (settings.repetition_window, settings.max_new_tokens, settings.repetition_penalty) == (5, 7, 1.0)
    assert CpmBeeBeamSearchSettings.from_generation_config(GenerationConfig()) == CpmBeeBeamSearchSettings()
    with pytest.raises(TypeError, match="top_k"):
        CpmBeeBeamSearchSettings.from_generation_config(None, top_k=3)
    with pytest.raises(ValueError, match="repetition_penalty"):
        CpmBeeBeamSearchSettings(repetition_penalty=0.9)
    with pytest.raises(ValueError, match="sample"):
        CpmBeeBeamSearchSettings.from_generation_config(GenerationConfig(do_sample=True))


def test_prompt_without_answer_is_refused() -> None:
    tokenizer = CpmBeeTokenizer()
    model = CpmBeeForCausalLM(CpmBeeConfig(num_layers=1, dim_model=16, num_heads=2, dim_head=8, dim_ff=16)).eval()
    with pytest.raises(ValueError, match="<ans>"):
        generate_answers(model, tokenizer, [{"input": "no answer field"}], max_new_tokens=2)
