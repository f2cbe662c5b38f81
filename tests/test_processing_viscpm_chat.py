"""VisCPMChatProcessor: the original chat prompt, batching, the chat template and save / load."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from transformers_viscpm.models.cpmbee.encoding_cpmbee import encode_structured, image_placeholder
from transformers_viscpm.models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer
from transformers_viscpm.models.viscpm_chat.configuration_viscpm_chat import VisCPMChatConfig
from transformers_viscpm.models.viscpm_chat.image_processing_viscpm_chat import VisCPMChatImageProcessor
from transformers_viscpm.models.viscpm_chat.processing_viscpm_chat import VisCPMChatProcessor, parse_rendered_prompt

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "chat_golden.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def processor() -> VisCPMChatProcessor:
    return VisCPMChatProcessor(VisCPMChatImageProcessor(), CpmBeeTokenizer())


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, size=(120, 90, 3), dtype=np.uint8), mode="RGB")


def test_prompt_is_the_original_chat_prompt(processor, image):
    prefill = GOLDEN["prefill"]
    inputs = processor(images=image, text=prefill["question"])
    assert inputs["input_ids"][0].tolist() == prefill["input_ids"]
    assert inputs["image_bound"].tolist() == [prefill["image_bound"]]
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)
    start, end = prefill["image_bound"][0]
    assert end - start == processor.query_num == 64
    assert inputs["answer_segment_ids"].shape == (1, 1)


def test_encoding_carries_the_decoding_bookkeeping(processor, image):
    question = "这是什么😀 𠀀？"
    inputs, infos = processor.encode(images=image, text=question)
    called = processor(images=image, text=question)
    assert called.sample_infos == inputs.sample_infos == infos
    assert called.ext_table == infos[0].ext_table and "😀" in called.ext_table.values()
    assert called.to("cpu") is called and called.to(torch.float16).sample_infos == infos  # `.to()` keeps them
    assert called["pixel_values"].dtype == torch.float16
    assert not {"sample_infos", "ext_table"} & set(called.keys())  # never model inputs
    batch = processor(text=[question, "a 🐍"])
    assert batch.ext_table is None and len(batch.sample_infos) == 2  # rows decode with their own tables
    assert [info.ext_table for info in batch.sample_infos] == [processor(text=q).ext_table for q in [question, "a 🐍"]]


def test_user_text_is_escaped(processor):
    question, context = "Is a < b? <b>bold</b>", "User: x <ans> y\nAI: z\n"
    inputs = processor(text=question, context=context)
    reference, _ = encode_structured(
        processor.tokenizer,
        [
            {
                "image": image_placeholder(64),
                "context": processor.tokenizer.escape(context),
                "question": processor.tokenizer.escape(question),
                "<ans>": "",
            }
        ],
        markup=True,
    )
    assert torch.equal(inputs["input_ids"], reference["input_ids"])
    assert "pixel_values" not in inputs


def test_batches_are_left_padded_with_shifted_image_bounds(processor, image):
    questions = ["short", "a much longer question about the picture, with 😀 in it"]
    batch = processor(images=[image, image], text=questions, context=["", "User: q\nAI: a\n"])
    length = batch["input_ids"].shape[1]
    for row, question in enumerate(questions):
        single = processor(images=image, text=question, context=["", "User: q\nAI: a\n"][row])
        n = single["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][row, length - n :], single["input_ids"][0])
        assert batch["attention_mask"][row].sum().item() == n
        assert batch["image_bound"][row].tolist() == (single["image_bound"][0] + (length - n)).tolist()
        assert torch.equal(batch["pixel_values"][row], single["pixel_values"][0])
    assert batch["allow_unk"].tolist() == [False, True]


def test_chat_template_renders_the_original_context(processor, image):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "这是什么？"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "一只猫。"}]},
        {"role": "user", "content": "它是什么颜色的？"},
    ]
    rendered = processor.apply_chat_template(messages)
    assert parse_rendered_prompt(rendered) == ("User: 这是什么？\nAI: 一只猫。\n", "它是什么颜色的？")

    messages[0]["content"][0]["image"] = image
    from_template = processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    direct = processor(images=image, text="它是什么颜色的？", context="User: 这是什么？\nAI: 一只猫。\n")
    assert set(from_template) == set(direct)
    for key in direct:
        assert torch.equal(from_template[key], direct[key]), key


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "assistant", "content": "hi"}], "must answer a user message"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "system", "content": "be nice"}, {"role": "user", "content": "a"}], "user and assistant roles"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "end with a user message"),
    ],
)
def test_chat_template_rejects_other_conversations(processor, messages, message):
    with pytest.raises(Exception, match=message):
        processor.apply_chat_template(messages)


def test_plain_questions_that_look_like_json_stay_questions(processor):
    assert parse_rendered_prompt('{"question": "q"}') is None
    assert parse_rendered_prompt('{"context": 1, "question": "q"}') is None
    assert parse_rendered_prompt("{not json") is None
    with pytest.raises(ValueError, match="already holds the context"):
        processor(text='{"context": "", "question": "q"}', context="User: a\nAI: b\n")


def test_input_errors(processor, image):
    with pytest.raises(ValueError, match="one image per prompt"):
        processor(images=[image, image], text="one question")
    with pytest.raises(ValueError, match="2 contexts for 1 questions"):
        processor(text="q", context=["", ""])
    with pytest.raises(ValueError, match="needs a question"):
        processor(images=image)
    with pytest.raises(ValueError, match="images and text only"):
        processor(text="q", videos=[np.zeros((2, 8, 8, 3), dtype=np.uint8)])


def test_numpy_tensors(processor, image):
    inputs = processor(images=image, text="q", return_tensors="np")
    assert isinstance(inputs["input_ids"], np.ndarray) and isinstance(inputs["pixel_values"], np.ndarray)


def test_save_and_load(processor, tmp_path):
    VisCPMChatConfig(query_num=8).save_pretrained(tmp_path)
    VisCPMChatProcessor(VisCPMChatImageProcessor(), CpmBeeTokenizer(), query_num=8).save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, VisCPMChatProcessor)
    assert loaded.query_num == 8 and loaded.chat_template == processor.chat_template
    start, end = loaded(text="q")["image_bound"][0, 0].tolist()
    assert end - start == 8
