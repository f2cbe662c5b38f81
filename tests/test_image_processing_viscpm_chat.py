"""VisCPMChatImageProcessor against the original transform (torchvision Resize/ToTensor/Normalize on PIL).

Golden values: tests/fixtures/image_processing_viscpm_chat.json, recorded by
tests/fixtures/record/record_image_processing.py, whose `make_images` builds the probe images for both sides.
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transformers_viscpm.models.viscpm_chat.image_processing_viscpm_chat import VisCPMChatImageProcessor

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = json.loads((FIXTURES / "image_processing_viscpm_chat.json").read_text())["images"]

sys.path.insert(0, str(FIXTURES / "record"))
from record_image_processing import image_digest, make_images  # noqa: E402


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    return make_images()


@pytest.fixture(scope="module")
def processor() -> VisCPMChatImageProcessor:
    return VisCPMChatImageProcessor()


def pixels(processor, images, **kwargs) -> torch.Tensor:
    return processor(images, return_tensors="pt", **kwargs)["pixel_values"]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_bit_exact_with_original(processor, images, name):
    golden = GOLDEN[name]
    image = images[name]
    assert image_digest(image) == golden["input_sha256"], "probe image differs from the recorded one"
    out = pixels(processor, image)
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    arr = out[0].numpy()
    corner_diff = np.abs(arr[:, :2, :4] - np.array(golden["corner"])).max()
    center_diff = np.abs(arr[:, 111:113, 110:114] - np.array(golden["center"])).max()
    assert corner_diff == 0.0 and center_diff == 0.0
    assert arr.astype(np.float64).mean(axis=(1, 2)).tolist() == pytest.approx(golden["channel_mean"], abs=1e-12)
    assert hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest() == golden["pixel_values_sha256"]


def test_batches_and_nested_lists(processor, images):
    names = ["rgb_640x480", "p_120x90", "rgb_3x5"]
    batch = pixels(processor, [images[n] for n in names])
    assert batch.shape == (3, 3, 224, 224)
    for i, name in enumerate(names):
        assert torch.equal(batch[i], pixels(processor, images[name])[0])
    nested = pixels(processor, [[images[names[0]]], [images[names[1]], images[names[2]]]])
    assert torch.equal(nested, batch)


def test_array_and_tensor_inputs_match_pil(processor, images):
    rgb = images["rgb_1000x200"]
    expected = pixels(processor, rgb)
    hwc = np.array(rgb)
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    for same in (
        hwc,
        chw,
        hwc.astype(np.float32) / 255,
        hwc / 255.0,
        torch.from_numpy(chw),
        torch.from_numpy(hwc).float() / 255,
        torch.from_numpy(chw).to(torch.float16) / 255,
    ):
        assert torch.equal(pixels(processor, same), expected), type(same)

    stacked = pixels(processor, np.stack([hwc, hwc[::-1]]))
    assert stacked.shape == (2, 3, 224, 224)
    assert torch.equal(stacked[0], expected[0])
    assert torch.equal(stacked[1], pixels(processor, Image.fromarray(hwc[::-1].copy()))[0])


def test_array_channel_rules_match_pil_convert(processor, images):
    gray = images["l_256x256"]
    assert torch.equal(pixels(processor, np.array(gray)), pixels(processor, gray))
    assert torch.equal(pixels(processor, np.array(gray)[..., None]), pixels(processor, gray))
    rgba = images["rgba_300x200"]
    # Alpha is dropped like PIL's convert("RGB"), not composited on white.
    assert torch.equal(pixels(processor, np.array(rgba)), pixels(processor, rgba))
    on_white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    assert not torch.equal(pixels(processor, rgba), pixels(processor, on_white))


def test_return_types_and_serialisation(processor, images, tmp_path):
    out = processor(images["rgb_3x5"], return_tensors="np")["pixel_values"]
    assert isinstance(out, np.ndarray) and out.shape == (1, 3, 224, 224) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0

    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "VisCPMChatImageProcessor"
    assert saved["size"] == {"height": 224, "width": 224} and saved["image_mean"] == [0.5, 0.5, 0.5]
    reloaded = VisCPMChatImageProcessor.from_pretrained(tmp_path)
    assert torch.equal(pixels(reloaded, images["rgb_3x5"]), pixels(processor, images["rgb_3x5"]))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (Image.new("RGB", (0, 5)), "empty image"),
        (np.zeros((0, 5, 3), np.uint8), "empty image"),
        (np.zeros((8, 8, 2), np.uint8), "channel axis"),
        (np.zeros((8, 8, 5), np.uint8), "channel axis"),
        (np.zeros((8, 8, 3), np.int64), "dtype int64"),
        (np.zeros((8, 8, 3), bool), "dtype bool"),
        (torch.zeros(8, 8, 3, dtype=torch.int32), "dtype int32"),
        (np.full((8, 8, 3), 2.0), r"\[0, 1\]"),
        (np.full((8, 8, 3), np.nan, np.float32), r"\[0, 1\]"),
        (np.zeros((2, 2, 8, 8, 3), np.uint8), "2-D/3-D"),
        ([], "empty list"),
        ([np.zeros(8, np.uint8)], "2-D/3-D"),
    ],
)
def test_bad_inputs_raise_one_clear_value_error(processor, bad, message):
    with pytest.raises(ValueError, match=message):
        processor(bad, return_tensors="pt")


def test_conversion_can_be_refused(processor, images):
    with pytest.raises(ValueError, match="do_convert_rgb=True"):
        processor(images["l_256x256"], do_convert_rgb=False)
    with pytest.raises(ValueError, match="4 channels"):
        processor(np.array(images["rgba_300x200"]), do_convert_rgb=False)
    rgb = processor(images["rgb_224x224"], do_convert_rgb=False, return_tensors="pt")["pixel_values"]
    assert torch.equal(rgb, pixels(processor, images["rgb_224x224"]))
