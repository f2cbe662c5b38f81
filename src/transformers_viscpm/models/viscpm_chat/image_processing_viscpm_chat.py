"""Image processor of VisCPM-Chat (PIL backend only: the package must not need torchvision)."""

from typing import Any

import numpy as np
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
    Anything else (an empty image, another channel count, another dtype, values out of range) raises `ValueError`.
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

    def __init__(self, **kwargs: Unpack[ImagesKwargs]):
        super().__init__(**kwargs)

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
