from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from timmserve.errors import InvalidImageError, PayloadTooLargeError, UnsupportedMediaError
from timmserve.model.decode import decode_image, open_checked
from timmserve.model.preprocess import Normalizer, Preprocessor

LIMIT = 64 * 1024 * 1024


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def red(size=(40, 30), mode="RGB") -> Image.Image:
    return Image.new("RGB", size, (200, 30, 30)).convert(mode)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_every_accepted_format_decodes_to_rgb(fmt):
    image = decode_image(encode(red(), fmt), max_pixels=LIMIT)
    assert image.mode == "RGB" and image.size == (40, 30)
    r, g, b = image.getpixel((20, 15))
    assert r > 150 and g < 80 and b < 80  # still red, whatever the codec did


def test_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    r, g, b = decode_image(buffer.getvalue(), max_pixels=LIMIT).getpixel((8, 8))
    assert r > 200 and b < 50


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("RGBA", "WEBP"),
        ("CMYK", "JPEG"),
        ("1", "BMP"),
        ("L", "JPEG"),
    ],
)
def test_every_mode_becomes_rgb(mode, fmt):
    image = decode_image(encode(red(mode=mode), fmt), max_pixels=LIMIT)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_transparent_pixels_are_composited_on_white():
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert decode_image(encode(clear, "PNG"), max_pixels=LIMIT).getpixel((4, 4)) == (255, 255, 255)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert decode_image(encode(palette, "PNG", transparency=0), max_pixels=LIMIT).getpixel((4, 4)) == (255, 255, 255)


def test_sixteen_bit_images_are_scaled_not_clipped():
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    decoded = decode_image(encode(image, "PNG"), max_pixels=LIMIT)
    assert [decoded.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encode(Image.new("RGB", (40, 20), (0, 128, 0)), "JPEG", exif=exif)
    assert decode_image(data, max_pixels=LIMIT).size == (20, 40)


def test_pixel_limit_is_checked():
    with pytest.raises(PayloadTooLargeError, match="1,200 pixels; the limit is 1,000"):
        decode_image(encode(red(), "PNG"), max_pixels=1000)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width × height and carries almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))


@pytest.mark.parametrize("side", [10_000, 100_000])  # over our limit; over Pillow's own, too
def test_decompression_bomb_is_refused_before_decoding(side):
    with pytest.raises(PayloadTooLargeError, match=rf"^the image is {side}x{side} = {side * side:,} pixels; the limit"):
        decode_image(png_header_only(side, side), max_pixels=LIMIT)


def test_a_pixel_limit_above_pillows_own_is_the_one_that_holds():
    # Found by the hostile-client pass: Pillow refused anything over 179 MP (its limit) with its
    # own message, whatever --max-image-pixels said.
    image = open_checked(png_header_only(15_000, 15_000), max_pixels=400_000_000).image
    assert image.size == (15_000, 15_000)
    with pytest.raises(PayloadTooLargeError, match=r"the limit is 200,000,000$"):
        open_checked(png_header_only(15_000, 15_000), max_pixels=200_000_000)


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        (b"", InvalidImageError, "empty"),
        (b"hello world, not an image", InvalidImageError, "not an image"),
        (png_header_only(50, 50), InvalidImageError, "corrupt or truncated"),
    ],
)
def test_bad_bytes_raise_typed_errors(data, error, words):
    with pytest.raises(error, match=words):
        decode_image(data, max_pixels=LIMIT)


def test_truncated_jpeg_is_invalid(photos):
    with pytest.raises(InvalidImageError, match="truncated"):
        decode_image(photos["cat"][:5000], max_pixels=LIMIT)


def test_unaccepted_format_is_415():
    with pytest.raises(UnsupportedMediaError, match="TIFF"):
        decode_image(encode(red(), "TIFF"), max_pixels=LIMIT)


def test_preprocessor_follows_the_model_data_config(photos):
    config = {
        "input_size": (3, 160, 160),
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.95,
        "crop_mode": "center",
    }
    tensor = Preprocessor(config, max_pixels=LIMIT)(photos["cat"])
    assert tensor.shape == (3, 160, 160) and tensor.dtype == torch.uint8
    gray = Preprocessor(config, max_pixels=LIMIT)(encode(Image.new("RGB", (50, 50), (128, 128, 128)), "PNG"))
    normalised = Normalizer(config, torch.device("cpu"))(gray.unsqueeze(0))
    assert normalised.dtype == torch.float32 and normalised.abs().max() < 0.01  # (128/255 - 0.5) / 0.5


@pytest.mark.parametrize("model", ["tf_efficientnet_lite0", "mambaout_femto"])
def test_uint8_path_then_batch_normalise_matches_timms_own_transform(photos, model):
    config = resolve_data_config({}, model=timm.create_model(model, pretrained=False))
    reference = create_transform(**config, is_training=False)  # PIL, float per image, normalised
    pixels = create_transform(**config, is_training=False, normalize=False)  # PIL, uint8
    preprocessor = Preprocessor(config, max_pixels=LIMIT)
    assert preprocessor.tensor_transform is not None  # timm's center crop has a v2 twin
    preprocessor.draft_size = None  # the resize kernels alone: every photo decoded in full
    normalizer = Normalizer(config, torch.device("cpu"))
    for data in photos.values():
        image = decode_image(data, max_pixels=LIMIT)
        ours = preprocessor(data)
        # torchvision v2's uint8 resize against Pillow's: the same filter, rounding apart.
        levels = (ours.int() - pixels(image).int()).abs()
        assert levels.max() <= 2 and levels.float().mean() < 0.05
        # The batch normalise is timm's normalise, exactly, on the same pixels.
        expected = reference.transforms[-1](pixels(image).float() / 255)
        assert torch.allclose(normalizer(pixels(image).unsqueeze(0))[0], expected, atol=1e-6)


def test_without_fast_decode_timms_pil_transform_runs_as_is(photos):
    config = resolve_data_config({}, model=timm.create_model("tf_efficientnet_lite0", pretrained=False))
    preprocessor = Preprocessor(config, max_pixels=LIMIT, fast_decode=False)
    assert preprocessor.tensor_transform is None and preprocessor.draft_size is None
    image = decode_image(photos["grace_hopper"], max_pixels=LIMIT)
    assert torch.equal(preprocessor(photos["grace_hopper"]), preprocessor.transform(image))


def test_a_crop_mode_without_a_v2_twin_keeps_the_pil_path(photos):
    config = {**resolve_data_config({}, model=timm.create_model("test_vit", pretrained=False)), "crop_mode": "border"}
    preprocessor = Preprocessor(config, max_pixels=LIMIT)
    assert preprocessor.tensor_transform is None
    assert preprocessor(photos["cat"]).shape == (3, 160, 160)


def test_fast_decode_decodes_a_large_photo_at_a_reduced_scale_close_to_the_full_decode(photos):
    big = Image.open(io.BytesIO(photos["grace_hopper"])).resize((2048, 2560), Image.BICUBIC)
    data = encode(big, "JPEG")
    config = resolve_data_config({}, model=timm.create_model("tf_efficientnet_lite0", pretrained=False))
    fast, full = Preprocessor(config, max_pixels=LIMIT), Preprocessor(config, max_pixels=LIMIT, fast_decode=False)
    # 1/8 scale (256×320) is the smallest still at least timm's 256 resize on both sides.
    assert decode_image(data, max_pixels=LIMIT, draft_size=fast.draft_size).size == (256, 320)
    difference = (fast(data).float() - full(data).float()).abs()
    assert difference.mean() < 2.0  # of 255: the DCT-domain downscale is a slightly different filter
    # Never decoded below the resize size, whatever the shape: a small photo is decoded in full.
    assert decode_image(photos["cat"], max_pixels=LIMIT, draft_size=fast.draft_size).size == (451, 300)
