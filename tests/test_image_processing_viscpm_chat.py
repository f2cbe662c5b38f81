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


# --- every input kind, the same pixels ---------------------------------------------------------------------------

ORIENTATIONS = (1, 3, 6, 8)  # upright, rotated 180, 90 and 270 degrees


def exif_photo(tmp_path: Path, orientation: int, suffix: str = ".jpg") -> Path:
    """A non-square photo whose EXIF tag says how to turn it upright (as phones save them)."""
    rng = np.random.default_rng(orientation)
    image = Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo-{orientation}{suffix}"
    image.save(path, exif=exif.tobytes())
    return path


class _Server:
    """A local HTTP server: `/photo` serves `body`, `/missing` is a 404, `/stall` never answers."""

    def __init__(self, body: bytes):
        import http.server
        import threading

        release = self.release = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/stall":
                    release.wait(30)
                    return
                found = self.path == "/photo"
                self.send_response(200 if found else 404)
                self.end_headers()
                self.wfile.write(body if found else b"no")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_paths_urls_pil_and_arrays_give_the_same_pixels(processor, tmp_path, orientation, suffix):
    """The original opens files with PIL and never reads EXIF: by default no input kind is rotated."""
    path = exif_photo(tmp_path, orientation, suffix)
    with Image.open(path) as opened:
        opened.load()
        reference = pixels(processor, opened)
        as_array = pixels(processor, np.array(opened))
        upright = Image.open(path)
        from PIL import ImageOps

        upright = ImageOps.exif_transpose(upright)
    server = _Server(path.read_bytes())
    try:
        kinds = {
            "path": pixels(processor, str(path)),
            "url": pixels(processor, f"{server.url}/photo"),
            "data uri": pixels(
                processor, "data:image/jpeg;base64," + __import__("base64").b64encode(path.read_bytes()).decode()
            ),
            "array": as_array,
        }
        rotating = VisCPMChatImageProcessor(apply_exif_orientation=True)
        rotated = {
            "path": pixels(rotating, str(path)),
            "url": pixels(rotating, f"{server.url}/photo"),
            "pil": pixels(rotating, Image.open(path)),
        }
    finally:
        server.close()
    for kind, value in kinds.items():
        assert torch.equal(value, reference), kind
    for kind, value in rotated.items():
        assert torch.equal(value, pixels(processor, upright)), kind
    assert torch.equal(rotated["path"], reference) == (orientation == 1)


def test_exif_option_round_trips(tmp_path):
    VisCPMChatImageProcessor(apply_exif_orientation=True, url_timeout=2.5).save_pretrained(tmp_path)
    loaded = VisCPMChatImageProcessor.from_pretrained(tmp_path)
    assert loaded.apply_exif_orientation is True and loaded.url_timeout == 2.5
    assert VisCPMChatImageProcessor().apply_exif_orientation is False


def test_unreachable_and_stalled_urls_are_one_clear_error(tmp_path):
    import time

    server = _Server(b"not an image")
    processor = VisCPMChatImageProcessor(url_timeout=0.5)
    try:
        start = time.perf_counter()
        with pytest.raises(ValueError, match="timed out after 0.5 s"):
            processor(f"{server.url}/stall")
        assert time.perf_counter() - start < 10
        with pytest.raises(ValueError, match="Cannot fetch the image .*404"):
            processor(f"{server.url}/missing")
        with pytest.raises(ValueError, match="Cannot read the image"):
            processor(f"{server.url}/photo")
    finally:
        server.close()
    with pytest.raises(ValueError, match="Image not found"):
        processor(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="Cannot decode the image data URI"):
        processor("data:image/png;base64,@@@")
    with pytest.raises(ValueError, match="Cannot read the image"):
        (tmp_path / "fake.png").write_bytes(b"\x89PNG garbage")
        processor(str(tmp_path / "fake.png"))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused(processor, value):
    array = np.full((8, 8, 3), 0.5, np.float32)
    array[3, 4, 1] = value
    for bad in (array, torch.from_numpy(array), torch.from_numpy(array).permute(2, 0, 1)):
        with pytest.raises(ValueError, match="finite"):
            processor(bad, return_tensors="pt")
