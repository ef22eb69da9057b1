"""Image bytes → model input tensor.

Decoding is defensive: the format is checked against the accepted list, the pixel count against
the limit *before* any pixel is decoded (a 50 KB PNG can claim 100k × 100k), EXIF orientation is
applied, and every mode (L, LA, P, RGBA, CMYK, 16-bit …) becomes RGB. Each failure is a typed
RequestError, so the API answers 400/413/415 with a message that says what was wrong.

The tensor transform is timm's own eval transform for the model's data config: input size,
interpolation, crop and mean/std come from the model, never from constants here.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import create_transform

from timmserve.errors import InvalidImageError, PayloadTooLargeError, UnsupportedMediaError

SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
_SUPPORTED_NAMES = "JPEG, PNG, WebP, BMP or GIF"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Transparent pixels are composited onto white, as a browser shows them on a default page.
_BACKGROUND = (255, 255, 255, 255)


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode an image file's bytes to an RGB PIL image (first frame, EXIF orientation applied)."""
    if not data:
        raise InvalidImageError("the image is empty (0 bytes)")
    image = _open(data)
    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedMediaError(f"{image.format} images are not accepted; send {_SUPPORTED_NAMES}")
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImageError(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise PayloadTooLargeError(
            f"the image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}"
        )
    try:
        image.load()  # first frame only for GIF / animated WebP
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError … for bad pixel data
        raise InvalidImageError(f"the {image.format} data is corrupt or truncated ({exc})") from None
    return to_rgb(_apply_exif_orientation(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB; alpha is composited onto white, 16-bit values are scaled, not clipped."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return _sixteen_bit_to_rgb(image)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own pixel limit decides; PIL's warning at its (different) limit would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImageError(f"the bytes are not an image ({_SUPPORTED_NAMES} accepted)") from None
    except Image.DecompressionBombError as exc:
        raise PayloadTooLargeError(f"the image is too large to decode safely ({exc})") from None
    except Exception as exc:  # a header that starts right and then breaks
        raise InvalidImageError(f"cannot read the image header ({exc})") from None


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # broken EXIF: the pixels are fine, serve them unrotated
        return image


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float32)
    # 16-bit sources span 0..65535; a 32-bit "I" image holding 8-bit data keeps its scale.
    full_scale = 65535.0 if image.mode in _SIXTEEN_BIT_MODES or values.max(initial=0) > 255 else 255.0
    scaled = np.clip(values * (255.0 / full_scale), 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled).convert("RGB")  # 2-D uint8 → mode L


class Preprocessor:
    """Bytes → normalised CHW float tensor with timm's eval transform for the model's data config."""

    def __init__(self, data_config: dict[str, Any], *, max_pixels: int) -> None:
        self.data_config = dict(data_config)
        self.max_pixels = max_pixels
        self.transform = create_transform(**self.data_config, is_training=False)

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.transform(decode_image(data, max_pixels=self.max_pixels))
