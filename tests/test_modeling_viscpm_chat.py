"""VisCPM-Chat against the original: synthetic original checkpoint -> our converter -> from_pretrained -> outputs.

Golden values come from `tests/fixtures/record/record_chat.py` (the original `VLU_CPMBee`, `VLLMCPMBeeBeamSearch` and
`VisCPMChat.chat` on the same seeded weights and image).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    TextIteratorStreamer,
    pipeline,
)

from transformers_viscpm.conversion.convert_viscpm_chat import convert_viscpm_chat
from transformers_viscpm.models.cpmbee.generation_cpmbee import cpmbee_beam_search
from transformers_viscpm.models.viscpm_chat.modeling_viscpm_chat import (
    UnsafeImageError,
    VisCPMChatForConditionalGeneration,
    VisCPMChatImageSafetyChecker,
    VisCPMChatModel,
)
from transformers_viscpm.synthetic.chat import TINY_CHAT_VISION, original_chat_state_dict, tiny_chat_llm_config

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "chat_golden.json").read_text(encoding="utf-8"))
TOL = 1e-4


def make_image(seed: int, width: int, height: int) -> Image.Image:
    """The recorder's image: a smooth gradient with seeded noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 255 / (width + height)], axis=-1)
    noisy = base + rng.normal(0.0, 20.0, size=base.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), mode="RGB")


def convert_tiny_chat(folder: Path) -> Path:
    """The golden file's tiny VisCPM-Chat, written in the original layout under `folder` and converted there."""
    checkpoint = folder / "viscpm_chat_tiny.pt"
    torch.save(original_chat_state_dict(eos_scale=GOLDEN["eos_scale"], include_mim_head=False), checkpoint)
    return convert_viscpm_chat(
        checkpoint,
        folder / "converted",
        llm_config=tiny_chat_llm_config(),
        vision_config=TINY_CHAT_VISION,
        show_progress=False,
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return convert_tiny_chat(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def model(converted) -> VisCPMChatForConditionalGeneration:
    return VisCPMChatForConditionalGeneration.from_pretrained(converted).eval()


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return make_image(**GOLDEN["image"])


def test_golden_describes_our_tiny_model():
    assert GOLDEN["llm_config"] == tiny_chat_llm_config()
    assert GOLDEN["vision_config"] == TINY_CHAT_VISION
    state_dict = original_chat_state_dict(eos_scale=GOLDEN["eos_scale"])
    assert list(state_dict) == list(GOLDEN["param_checksums"])
    for key, checksum in GOLDEN["param_checksums"].items():
        assert state_dict[key].double().sum().item() == pytest.approx(checksum, abs=1e-3), key


def test_query_outputs_and_features_match_original(model, image):
    inputs = model.default_processor(images=image, text="x")
    assert inputs["pixel_values"].double().sum().item() == pytest.approx(GOLDEN["pixel_values_sum"], abs=1e-6)
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"])
    query_outputs = torch.tensor(GOLDEN["query_outputs"]["values"])
    assert list(features.last_hidden_state.shape) == GOLDEN["query_outputs"]["shape"]
    assert (features.last_hidden_state[0] - query_outputs).abs().max().item() < TOL
    mapped = torch.tensor(GOLDEN["vision_hidden_states"]["rows"])
    assert list(features.pooler_output.shape) == GOLDEN["vision_hidden_states"]["shape"]
    assert (features.pooler_output[0, :8] - mapped).abs().max().item() < TOL
    assert features.pooler_output.double().sum().item() == pytest.approx(
        GOLDEN["vision_hidden_states"]["sum"], abs=1e-2
    )


def test_prefill_logits_match_original(model, image):
    prefill = GOLDEN["prefill"]
    inputs = model.default_processor(images=image, text=prefill["question"])
    assert inputs["input_ids"][0].tolist() == prefill["input_ids"]
    assert inputs["image_bound"][0].tolist() == prefill["image_bound"]
    with torch.no_grad():
        logits = model(**inputs).logits
    assert list(logits.shape) == prefill["shape"]
    for position, expected, top_ids, top_values in zip(
        prefill["positions"], prefill["slices"], prefill["top_ids"], prefill["top_values"]
    ):
        row = logits[0, position]
        assert (row[:: prefill["stride"]] - torch.tensor(expected)).abs().max().item() < TOL
        assert row.topk(10).indices.tolist() == top_ids
        assert (row.topk(10).values - torch.tensor(top_values)).abs().max().item() < TOL


def test_image_features_go_to_image_bound_not_unk_ids(model, image):
    # Out-of-vocabulary question text is encoded as `<unk>` too: only the image segment may be overwritten.
    inputs = model.default_processor(images=image, text="这是什么😀？")
    unk_id = model.default_processor.tokenizer.unk_token_id
    assert (inputs["input_ids"] == unk_id).sum().item() == model.config.query_num + 1
    with torch.no_grad():
        embeds, features = model.model.get_inputs_embeds(
            inputs["input_ids"], inputs["input_id_subs"], inputs["image_bound"], inputs["pixel_values"]
        )
        plain = model.model.language_model.embed_input_ids(inputs["input_ids"], inputs["input_id_subs"])
    start, end = inputs["image_bound"][0, 0].tolist()
    changed = (embeds != plain).any(-1)[0]
    assert changed.nonzero().flatten().tolist() == list(range(start, end))
    assert torch.equal(embeds[0, start:end], features.pooler_output[0])


def _settings(turn: dict) -> dict:
    settings = turn["settings"]
    return dict(
        num_beams=settings["beam_size"],
        temperature=settings["temperature"],
        repetition_penalty=settings["repetition_penalty"],
        length_penalty=settings["length_penalty"],
        max_new_tokens=turn["max_length"],
    )


@pytest.mark.parametrize("name", sorted(GOLDEN["chats"]))
def test_chat_matches_original(model, image, name):
    """Answers, contexts and answer token ids of whole conversations; later turns reuse the vision states."""
    context, vision_hidden_states = "", None
    for turn in GOLDEN["chats"][name]:
        assert turn["context"] == context
        processor = model.default_processor
        inputs, infos = processor.encode(images=image, text=turn["question"], context=context)
        with torch.no_grad():
            embeds, _ = model.model.get_inputs_embeds(
                inputs["input_ids"], inputs["input_id_subs"], inputs["image_bound"], inputs.pop("pixel_values")
            )
        result = cpmbee_beam_search(model, inputs, infos, inputs_embeds=embeds, **_settings(turn))
        assert [list(pair) for pair in result[0]] == turn["result_ids"]
        assert {str(k): v for k, v in infos[0].ext_table.items()} == turn["ext_table"]

        if name == "chat_api":  # the model's converted generation config: the original chat() defaults
            answer, context, vision_hidden_states = model.chat(image, turn["question"], context, vision_hidden_states)
        else:
            answer, context, vision_hidden_states = model.chat(
                image, turn["question"], context, vision_hidden_states, **_settings(turn)
            )
        assert answer == turn["original_answer"]
        assert context == turn["new_context"]
        assert vision_hidden_states.shape == (1, model.config.query_num, model.config.text_config.hidden_size)


def test_chat_reused_vision_states_skip_the_vision_tower(model, image):
    _, context, states = model.chat(image, "What is in the image?", max_new_tokens=4)
    calls = []
    hook = model.model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        again = model.chat(None, "Why?", context, states, max_new_tokens=4)
    finally:
        hook.remove()
    assert calls == []
    assert again == model.chat(image, "Why?", context, max_new_tokens=4)[:2] + (again[2],)
    with pytest.raises(ValueError, match="needs an image"):
        model.chat(None, "Why?")


def test_batch_rows_match_single_prompts(model, image):
    processor = model.default_processor
    other = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    questions, contexts = ["What is in the image?", "这是什么😀？"], ["User: hi\nAI: hello\n", ""]
    batch = processor(images=[image, other], text=questions, context=contexts)
    with torch.no_grad():
        batch_logits = model(**batch).logits
        for row, (picture, question, context) in enumerate(zip([image, other], questions, contexts)):
            single = processor(images=picture, text=question, context=context)
            logits = model(**single).logits
            length = single["input_ids"].shape[1]
            vocab = model.config.text_config.vocab_size
            assert (batch_logits[row, -length:, :vocab] - logits[0, :, :vocab]).abs().max().item() < TOL


def test_stock_generate_and_streaming(model, image):
    processor = model.default_processor
    question = "请描述这张图片。"
    inputs = processor(images=image, text=question)
    output = model.generate(**inputs, max_new_tokens=6, num_beams=1, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(output[:, :prompt_length], inputs["input_ids"])
    new_tokens = output[0, prompt_length:].tolist()
    # Greedy without repetition penalty: the original beam search with one beam takes the same tokens.
    golden = [pair[0] for pair in GOLDEN["chats"]["zh_greedy"][0]["result_ids"]]
    assert new_tokens == golden[: len(new_tokens)] and len(new_tokens) == 6

    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
    model.generate(**inputs, max_new_tokens=6, num_beams=1, do_sample=False, streamer=streamer)
    assert "".join(streamer) == processor.tokenizer.decode(new_tokens)

    beams = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False)
    assert beams.shape[0] == 1 and prompt_length < beams.shape[1] <= prompt_length + 4


def test_image_text_to_text_pipeline(model, image):
    # pipeline() moves a model to the first accelerator unless told otherwise, and `model` is shared by the module
    pipe = pipeline("image-text-to-text", model=model, processor=model.default_processor, device=model.device)
    question = "请描述这张图片。"
    expected = model.generate(**model.default_processor(images=image, text=question), max_new_tokens=6, num_beams=1)
    expected_text = model.default_processor.tokenizer.decode(expected[0, -6:].tolist())
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    result = pipe(text=messages, generate_kwargs=dict(max_new_tokens=6, num_beams=1, do_sample=False))
    assert result[0]["generated_text"][-1] == {"role": "assistant", "content": expected_text}


def test_auto_classes_and_tied_embeddings(converted, model, image):
    loaded = AutoModelForImageTextToText.from_pretrained(converted)
    assert isinstance(loaded, VisCPMChatForConditionalGeneration)
    assert loaded.lm_head.weight is loaded.model.language_model.input_embedding.weight
    base = VisCPMChatModel.from_pretrained(converted).eval()
    inputs = model.default_processor(images=image, text="What is in the image?")
    generation_only = ("ext_table_ids", "ext_table_sub", "ext_table_mask", "allow_unk", "answer_segment_ids")
    with torch.no_grad():
        hidden = base(**{k: v for k, v in inputs.items() if k not in generation_only})
        full = model(**inputs, output_hidden_states=True)
    assert torch.allclose(hidden.last_hidden_state, full.hidden_states[-1], atol=TOL)
    assert torch.allclose(hidden.vision_hidden_states, full.vision_hidden_states)
    assert torch.equal(full.image_outputs.pooler_output, full.vision_hidden_states)
    assert full.image_outputs.last_hidden_state.shape[1] == model.config.query_num


def test_auto_model_opens_chat(converted, model, image):
    """`AutoModel.from_pretrained(chat_repo).chat(...)`, the mission's door, answers as the image-text-to-text head."""
    auto = AutoModel.from_pretrained(converted).eval()
    assert isinstance(auto, VisCPMChatForConditionalGeneration)
    settings = dict(max_new_tokens=8, num_beams=2)
    assert (
        auto.chat(image, "What is in the image?", **settings)[0]
        == model.chat(image, "What is in the image?", **settings)[0]
    )


def test_eager_and_sdpa_agree(converted, image):
    eager = VisCPMChatForConditionalGeneration.from_pretrained(converted, attn_implementation="eager").eval()
    sdpa = VisCPMChatForConditionalGeneration.from_pretrained(converted, attn_implementation="sdpa").eval()
    assert sdpa.model.vision_model.config._attn_implementation == "sdpa"
    inputs = eager.default_processor(images=image, text="What is in the image?")
    with torch.no_grad():
        difference = (eager(**inputs).logits - sdpa(**inputs).logits).abs().max().item()
    assert difference < TOL


def test_input_errors(model, image):
    inputs = model.default_processor(images=image, text="What is in the image?")
    features = torch.zeros(1, model.config.query_num, model.config.text_config.hidden_size)
    with pytest.raises(ValueError, match="either pixel_values or vision_hidden_states"):
        model(**inputs, vision_hidden_states=features)
    without_bound = {k: v for k, v in inputs.items() if k != "image_bound"}
    with pytest.raises(ValueError, match="image_bound"):
        model(**without_bound)
    pixel_values = inputs.pop("pixel_values")
    with pytest.raises(ValueError, match="do not match the image segments"):
        model(**inputs, vision_hidden_states=features[:, :10])
    with pytest.raises(ValueError, match="do not match the image segments"):
        model(**inputs, pixel_values=pixel_values.repeat(2, 1, 1, 1))  # two images for one prompt


@pytest.mark.parametrize("threshold, flagged", [(-10.0, True), (10.0, False)])
def test_optional_image_safety_checker(model, image, threshold, flagged):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    clip = CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(clip)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)  # cosine similarity - threshold > 0 flags a concept
        checker.special_care_embeds_weights.fill_(10.0)
    safety_checker = VisCPMChatImageSafetyChecker(checker, CLIPImageProcessor())
    assert safety_checker([image, image.convert("L")]) == [flagged, flagged]
    assert model.image_safety_checker is None
    model.image_safety_checker = safety_checker
    try:
        if flagged:
            with pytest.raises(UnsafeImageError):
                model.chat(image, "What is in the image?", max_new_tokens=2)
        else:
            assert (
                model.chat(image, "What is in the image?", max_new_tokens=2)[0]
                == model.chat(image.copy(), "What is in the image?", max_new_tokens=2)[0]
            )
        with pytest.raises(TypeError, match="PIL image"):
            model.chat(np.asarray(image), "What is in the image?", max_new_tokens=2)
    finally:
        model.image_safety_checker = None


def test_chat_streams_the_answer(model, image):
    from transformers import TextStreamer

    class Collect(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            chunks.append(text)

    chunks: list[str] = []
    processor = model.default_processor
    question = "画里有什么？😀"
    streamer = Collect(processor.tokenizer)
    answer, _, _ = model.chat(image, question, processor=processor, streamer=streamer, max_new_tokens=6)
    assert "".join(chunks) == answer
    # chat() hands the streamer its prompt's table (the tokenizer keeps none).
    assert streamer.decode_kwargs["ext_table"] == processor.encode(images=image, text=question)[1][0].ext_table
    assert "😀" in streamer.decode_kwargs["ext_table"].values()
    assert not hasattr(processor.tokenizer, "last_ext_table")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_pixels_or_features_are_one_clear_error(model, image, value):
    processor = model.default_processor
    inputs = processor(images=[image], text=["What is it?"], return_tensors="pt")
    bad_pixels = inputs["pixel_values"].clone()
    bad_pixels[0, 0, 0, 0] = value
    with pytest.raises(ValueError, match="`pixel_values` contain NaN or infinite"):
        model(**{**inputs, "pixel_values": bad_pixels})
    _, _, vision_hidden_states = model.chat(image, "What is it?", max_new_tokens=2)
    bad_states = vision_hidden_states.clone()
    bad_states[0, 1, 2] = value
    with pytest.raises(ValueError, match="`vision_hidden_states` contain NaN or infinite"):
        model.chat(None, "And now?", vision_hidden_states=bad_states, max_new_tokens=2)
