"""Image processor of VisCPM-Chat (PIL backend only: the package must not need torchvision)."""

import base64
import binascii
import os
from io import BytesIO
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    infer_channel_dimension_format,
    is_pil_image,
    is_torch_tensor,
)
from transformers.processing_utils import ImagesKwargs, Unpack


class VisCPMChatImagesKwargs(ImagesKwargs, total=False):
    """
    apply_exif_orientation (`bool`, defaults to False):
        Rotate / flip images by their EXIF orientation tag (`PIL.ImageOps.exif_transpose`) before resizing. The
        original does not, so the default keeps its pixels; either way paths, URLs and PIL images get the same rule.
    url_timeout (`float`, defaults to 10.0):
        Seconds to wait for an image URL (connect and each read) before a `ValueError`.
    """

    apply_exif_orientation: bool
    url_timeout: float


class VisCPMChatImageProcessor(PilBackend):
    r"""
    Bit-exact port of VisCPM's evaluation transform (`build_transform(is_train=False)`: torchvision
    `Resize((224, 224), BICUBIC)` on a PIL image, `ToTensor`, `Normalize` with the inception mean/std 0.5): the
    image is squashed (no crop, no aspect ratio kept) to 224x224 with PIL's bicubic filter on 8-bit RGB, scaled
    to [0, 1] and mapped to [-1, 1].

    Inputs may be PIL images (any mode), NumPy arrays or torch tensors (`HW`, `HWC` or `CHW`; `uint8` in 0..255
    or floating point in 0..1), a list of those, or a batch (`NHWC` / `NCHW`). Colour conversion follows the
    original's documented usage, `Image.open(path).convert("RGB")`: PIL's plain `convert("RGB")`, so an alpha
    channel is dropped, not composited onto a background. Arrays get the same rule (one channel is repeated, a
    fourth channel dropped); float arrays are rounded to 8 bits first, because the original resizes 8-bit images.
    Anything else (an empty image, another channel count, another dtype, values out of range or not finite) raises
    `ValueError`.

    Strings are image files, `http(s)://` URLs (fetched with a `url_timeout`) or `data:image/...;base64,` URIs, opened
    with PIL exactly as a PIL image passed in would be: without EXIF rotation, as the original, unless
    `apply_exif_orientation=True` (which then applies to PIL images too).
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = False
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    apply_exif_orientation = False
    url_timeout = 10.0
    valid_kwargs = VisCPMChatImagesKwargs

    def __init__(self, **kwargs: Unpack[VisCPMChatImagesKwargs]):
        super().__init__(**kwargs)

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Open strings (paths, URLs, data URIs) as PIL images; everything else passes through unchanged.

        Unlike transformers' `load_image`, nothing is EXIF-rotated or converted here: `process_image` applies one
        rule to every PIL image, however it came.
        """
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, str):
            return _open_image(image_url_or_urls, self.url_timeout)
        return image_url_or_urls

    def _prepare_images_structure(self, images: ImageInput, expected_ndims: int = 3) -> list[Any]:
        """A flat list of single images; 2-D arrays are grayscale images, 4-D arrays are batches."""
        images = self.fetch_images(images)
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("Got an empty list of images.")
            flat = []
            for item in images:
                flat.extend(item if isinstance(item, (list, tuple)) else [item])
        elif _ndim(images) == 4:
            flat = list(images)
        else:
            flat = [images]
        for image in flat:
            if not (is_pil_image(image) or _ndim(image) in (2, 3)):
                raise ValueError(
                    "Each image must be a PIL image or a 2-D/3-D numpy array or torch tensor, got "
                    f"{type(image).__name__}{_shape_note(image)}."
                )
        return flat

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        **kwargs: Unpack[ImagesKwargs],
    ) -> np.ndarray:
        """One image as a channels-first uint8 RGB array, converted the way the original's callers do."""
        if is_pil_image(image):
            if self.apply_exif_orientation:
                image = PIL.ImageOps.exif_transpose(image)
            if image.width == 0 or image.height == 0:
                raise ValueError(f"Got an empty image of size {image.size}.")
            if image.mode != "RGB":
                if not do_convert_rgb:
                    raise ValueError(f"Got a {image.mode!r} image; pass do_convert_rgb=True to convert it to RGB.")
                image = image.convert("RGB")
            return np.array(image).transpose(2, 0, 1)
        if is_torch_tensor(image):
            image = image.detach().cpu()
            image = (image.float() if image.is_floating_point() else image).numpy()
        return _array_to_rgb_uint8(image, input_data_format, do_convert_rgb)


def _open_image(source: str, timeout: float) -> PIL.Image.Image:
    """A path, `http(s)://` URL or `data:image/...;base64,` URI as a loaded PIL image; one `ValueError` otherwise."""
    name = source if len(source) <= 200 else source[:200] + "..."
    if source.startswith(("http://", "https://")):
        import httpx  # huggingface_hub's HTTP client; only URLs need it

        try:
            response = httpx.get(source, timeout=timeout, follow_redirects=True)
            response.raise_for_status()
        except httpx.TimeoutException:
            raise ValueError(f"Fetching the image {name} timed out after {timeout} s.") from None
        except httpx.HTTPError as err:
            raise ValueError(f"Cannot fetch the image {name}: {err}") from None
        data: Any = BytesIO(response.content)
    elif source.startswith("data:image/") and ";base64," in source:
        try:
            data = BytesIO(base64.b64decode(source.split(",", 1)[1], validate=True))
        except binascii.Error as err:
            raise ValueError(f"Cannot decode the image data URI {name}: {err}") from None
    elif os.path.isfile(source):
        data = source
    else:
        raise ValueError(f"Image not found: {name!r} is neither a file, an http(s) URL nor a data URI.")
    try:
        with PIL.Image.open(data) as image:
            image.load()
            return image.copy()  # keeps `info`, so EXIF orientation stays readable
    except (PIL.UnidentifiedImageError, OSError) as err:
        raise ValueError(f"Cannot read the image {name}: {err}") from None


def _ndim(image: Any) -> int | None:
    return image.ndim if isinstance(image, np.ndarray) or is_torch_tensor(image) else None


def _shape_note(image: Any) -> str:
    return f" of shape {tuple(image.shape)}" if hasattr(image, "shape") else ""


def _array_to_rgb_uint8(
    image: np.ndarray, input_data_format: str | ChannelDimension | None, do_convert_rgb: bool | None
) -> np.ndarray:
    """Validate an HW / HWC / CHW array and return it as CHW uint8 RGB."""
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        raise ValueError(
            f"Image arrays must be uint8 (0..255) or floating point (0..1), got dtype {image.dtype}; "
            "convert with .astype(np.uint8) or divide by 255."
        )
    if image.ndim == 2:
        image = image[None]
    elif input_data_format is None:
        try:
            input_data_format = infer_channel_dimension_format(image, num_channels=(1, 3, 4))
        except ValueError:
            raise ValueError(
                f"Cannot find the channel axis of an image of shape {image.shape}: expected 1, 3 or 4 channels "
                "first or last."
            ) from None
    if input_data_format == ChannelDimension.LAST:
        image = np.moveaxis(image, -1, 0)
    num_channels, height, width = image.shape
    if height == 0 or width == 0:
        raise ValueError(f"Got an empty image of shape {image.shape}.")
    if num_channels not in (1, 3, 4) or (num_channels != 3 and not do_convert_rgb):
        raise ValueError(
            f"Got an image with {num_channels} channels; expected 3 (RGB), or 1 / 4 with do_convert_rgb=True."
        )
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all() or image.min() < 0.0 or image.max() > 1.0:
            raise ValueError("Floating-point images must hold finite values in [0, 1].")
        image = np.rint(image.astype(np.float64) * 255).astype(np.uint8)
    if num_channels == 1:
        image = np.repeat(image, 3, axis=0)
    return np.ascontiguousarray(image[:3])


__all__ = ["VisCPMChatImageProcessor"]
