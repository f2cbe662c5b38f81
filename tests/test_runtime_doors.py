"""The runtime's shape (issue 11): one declaration of the structured input, LLaVA-shaped Chat, stock doors.

Each test opens a door a transformers user tries: the pre-5 `past_key_values` name, `resize_token_embeddings`,
returned attentions on the autograd graph, `image_outputs`, plain `generate()` being stock greedy, Paint's prompt
encoding without a UNet, and the structure keys written in one place.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch
from test_modeling_cpmbee import build_model
from test_modeling_viscpm_chat import GOLDEN, convert_tiny_chat, make_image
from test_pipeline_viscpm_paint import build_pipeline
from transformers import DynamicCache, GenerationConfig

import transformers_viscpm
from transformers_viscpm.models.cpmbee import structure_cpmbee
from transformers_viscpm.models.cpmbee.encoding_cpmbee import encode_structured
from transformers_viscpm.models.cpmbee.generation_cpmbee import CpmBeeBeamSearchSettings
from transformers_viscpm.models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer
from transformers_viscpm.models.viscpm_chat.modeling_viscpm_chat import VisCPMChatForConditionalGeneration

PACKAGE = Path(transformers_viscpm.__file__).parent
PROMPTS = [{"input": "今天天气真好", "prompt": "中翻英", "<ans>": ""}, {"question": "1 < 2?", "<ans>": ""}]


@pytest.fixture(scope="module")
def tokenizer() -> CpmBeeTokenizer:
    return CpmBeeTokenizer()


@pytest.fixture(scope="module")
def cpmbee():
    from transformers_viscpm.synthetic.cpmbee import tiny_cpmbee_config

    return build_model(tiny_cpmbee_config(), seed=3, attn_implementation="eager")


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> VisCPMChatForConditionalGeneration:
    return VisCPMChatForConditionalGeneration.from_pretrained(convert_tiny_chat(tmp_path_factory.mktemp("doors")))


@pytest.fixture(scope="module")
def image():
    return make_image(**GOLDEN["image"])


def test_structure_keys_are_declared_once():
    """No module of the package spells out a run of the structure keys: they come from `structure_cpmbee`."""
    keys = set(structure_cpmbee.INPUT_KEYS) - set(structure_cpmbee.STOCK_KEYS)
    for path in PACKAGE.rglob("*.py"):
        if path.name == "structure_cpmbee.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                named = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in keys]
                assert len(named) < 3, f"{path.name}:{node.lineno} lists structure keys {named}"
            if isinstance(node, ast.FunctionDef):
                params = [a.arg for a in node.args.args + node.args.kwonlyargs if a.arg in keys]
                assert len(params) < 3, f"{path.name}:{node.lineno} {node.name}() takes structure keys {params}"


def test_forwards_are_typed_with_the_declaration():
    from transformers_viscpm.models.cpmbee.modeling_cpmbee import CpmBeeForCausalLM, CpmBeeModel

    for cls in (CpmBeeModel, CpmBeeForCausalLM, VisCPMChatForConditionalGeneration):
        kwargs = inspect.signature(cls.forward).parameters["kwargs"]
        declared = kwargs.annotation.__args__[0]
        assert set(structure_cpmbee.STRUCTURE_KEYS) <= set(declared.__annotations__), cls


def test_no_import_cycle_between_modeling_and_generation():
    source = (PACKAGE / "models" / "cpmbee" / "generation_cpmbee.py").read_text(encoding="utf-8")
    assert not re.search(r"from \.modeling_cpmbee import|import modeling_cpmbee", source)


def test_past_key_values_is_the_deprecated_name_of_cache(cpmbee, tokenizer):
    """The cache given under the old name is used (plain ids: a causal LM, so a cached step equals the full run)."""
    input_ids = torch.tensor([tokenizer("今天天气真好，我们去公园散步吧")["input_ids"]])
    with torch.no_grad():
        full = cpmbee(input_ids).logits[:, -1]
        cache = cpmbee(input_ids[:, :-1], use_cache=True).cache
        with pytest.warns(FutureWarning, match="past_key_values"):
            step = cpmbee(input_ids[:, -1:], past_key_values=cache).logits[:, -1]
        uncached = cpmbee(input_ids[:, -1:]).logits[:, -1]
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == input_ids.shape[1]
    assert (step - full).abs().max().item() < 1e-5
    assert (uncached - full).abs().max().item() > 1e-3  # so the cache really was used


def test_chat_past_key_values_is_deprecated(chat, image):
    inputs = chat.default_processor(images=image, text="What is in the image?")
    with torch.no_grad(), pytest.warns(FutureWarning, match="past_key_values"):
        chat(**inputs, past_key_values=DynamicCache(config=chat.config.get_text_config()), use_cache=True)


def test_returned_attentions_stay_on_the_graph(cpmbee, tokenizer):
    encoding, _ = encode_structured(tokenizer, PROMPTS)  # two rows: the shorter one is left-padded
    model = cpmbee.train()
    try:
        outputs = model(
            **{k: v for k, v in encoding.items() if k not in structure_cpmbee.GENERATION_KEYS},
            output_attentions=True,
        )
        attentions = outputs.attentions[0]
        attentions.retain_grad()
        outputs.logits.float().pow(2).mean().backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    assert attentions.grad is not None and attentions.grad.abs().sum() > 0
    padding = encoding["attention_mask"] == 0
    assert padding.any()
    row = int(padding.any(1).nonzero()[0])
    assert attentions.detach()[row][:, padding[row]].abs().max() == 0  # padding queries attend to nothing


def test_chat_outputs_carry_image_outputs(chat, image):
    inputs = chat.default_processor(images=image, text="What is in the image?")
    with torch.no_grad():
        outputs = chat(**inputs)
    assert outputs.image_outputs.pooler_output.shape == (1, chat.config.query_num, chat.config.text_config.dim_model)
    assert torch.equal(outputs.vision_hidden_states, outputs.image_outputs.pooler_output)


def test_chat_resize_token_embeddings_keeps_the_head_tied(tmp_path_factory, image):
    model = VisCPMChatForConditionalGeneration.from_pretrained(convert_tiny_chat(tmp_path_factory.mktemp("resize")))
    vocab = model.config.text_config.vocab_size
    model.resize_token_embeddings(vocab + 8)
    assert model.get_input_embeddings().weight.shape[0] == vocab + 8
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.config.text_config.vocab_size == vocab + 8
    inputs = model.default_processor(images=image, text="What is in the image?")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == vocab + 8 + inputs["ext_table_ids"].shape[1]


def test_plain_generate_is_stock_greedy(chat, image):
    """A converted repo's generation config leaves plain `generate()` greedy; chat() keeps the original's beams."""
    assert chat.generation_config.num_beams in (None, 1) and not chat.generation_config.do_sample
    assert CpmBeeBeamSearchSettings.from_generation_config(chat.generation_config).num_beams == 3
    inputs = chat.default_processor(images=image, text="What is in the image?")
    with torch.no_grad():
        out = chat.generate(**inputs, max_new_tokens=4)
        greedy = chat.generate(**inputs, generation_config=GenerationConfig(max_new_tokens=4, num_beams=1))
    assert torch.equal(out, greedy)


def test_paint_encode_prompt_needs_no_unet(tmp_path_factory):
    from transformers_viscpm.synthetic.paint import write_sd_base

    sd_base = tmp_path_factory.mktemp("sd-base")
    write_sd_base(sd_base)
    pipe = build_pipeline(sd_base)
    expected, _ = pipe.encode_prompt("a cat", "cpu", 1, False)
    pipe.unet = None
    embeds, negative = pipe.encode_prompt("a cat", "cpu", 1, True)
    assert torch.equal(embeds, expected) and negative.shape == embeds.shape
    assert embeds.dtype == pipe.text_encoder.dtype


def test_a_vocabulary_that_is_not_the_models_is_refused(chat, image, cpmbee, tmp_path_factory):
    """A tokenizer from another repo would shift every ext id (they start at `vocab_size`): refused, not mis-decoded."""
    import shutil

    from transformers_viscpm.models.cpmbee.generation_cpmbee import generate_answers
    from transformers_viscpm.models.cpmbee.tokenization_cpmbee import default_vocab_file
    from transformers_viscpm.synthetic.paint import write_sd_base

    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    shutil.copy(default_vocab_file(), vocab)
    with vocab.open("a", encoding="utf-8") as extra:
        extra.write("\n一个新词")
    other = CpmBeeTokenizer(vocab_file=str(vocab))
    assert other.vocab_size == CpmBeeTokenizer().vocab_size + 1
    with pytest.raises(ValueError, match="vocabulary has 86584 entries, but the model has vocab_size=86583"):
        generate_answers(cpmbee, other, PROMPTS[:1], max_new_tokens=2)
    processor = type(chat.default_processor)(
        chat.default_processor.image_processor, other, query_num=chat.config.query_num
    )
    with pytest.raises(ValueError, match="same repo"):
        chat.chat(image, "What is in the image?", processor=processor, max_new_tokens=2)
    sd_base = tmp_path_factory.mktemp("sd-base-vocab")
    write_sd_base(sd_base)
    pipe = build_pipeline(sd_base)
    with pytest.raises(ValueError, match="the text encoder has vocab_size=86583"):
        type(pipe)(**{**pipe.components, "tokenizer": other})
