"""Field inputs (issue 14): each kind of fault real files and hostile clients found, with its right
answer — the decoder's limits and families, per-image isolation of any failure, the Open Inference
Protocol request checked by its schema."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from timmserve.errors import (
    InternalError,
    InvalidImageError,
    InvalidRequestError,
    PayloadTooLargeError,
    UnsupportedMediaError,
)
from timmserve.http import oip
from timmserve.model.classifier import Classifier
from timmserve.model.decode import (
    FORMAT_FAMILIES,
    MAX_JPEG_SCANS,
    MAX_JPEG_SEGMENTS,
    MAX_JPEG_STRAY_BYTES,
    JpegFrame,
    check_jpeg_markers,
    decode_image,
)
from timmserve.model.preprocess import Preprocessor
from timmserve.model.types import ImageRequest

DATA_CONFIG = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "crop_mode": "center",
}
LIMITS = {"max_pixels": 64 * 1024 * 1024, "max_aspect_ratio": 32}


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_an_extreme_aspect_ratio_is_refused_before_decoding():
    # The examples: 1×1,000,000 (resize tried ~196 GB: a 500 for its whole batch) and 1×4000.
    for size in [(1, 1_000_000), (1, 4000), (4000, 100)]:
        with pytest.raises(InvalidImageError, match=r"aspect ratio over the limit of 32:1"):
            decode_image(encode(Image.new("L", size), "PNG"), **LIMITS)
    assert decode_image(encode(Image.new("RGB", (3200, 100)), "PNG"), **LIMITS).size == (3200, 100)  # 32:1


def test_a_jpeg_with_too_many_scans_is_refused_before_decoding(photos):
    progressive = encode(Image.open(io.BytesIO(photos["cat"])), "JPEG", progressive=True)
    assert decode_image(progressive, **LIMITS).size == Image.open(io.BytesIO(photos["cat"])).size  # 10 scans
    last_scan = progressive.rindex(b"\xff\xda")
    bomb = progressive[:last_scan] + progressive[last_scan:-2] * MAX_JPEG_SCANS + b"\xff\xd9"
    with pytest.raises(InvalidImageError, match=rf"^the JPEG has more than {MAX_JPEG_SCANS} scans, the limit$"):
        decode_image(bomb, **LIMITS)


def test_only_the_first_pictures_markers_count(photos):
    cat = Image.open(io.BytesIO(photos["cat"]))
    progressive = encode(cat, "JPEG", progressive=True)  # 10 scans
    # Start-of-scan bytes where no marker is, found by the hostile-client pass (400 "70 scans"): an
    # MPO's later pictures, never decoded; an APP segment's payload; stray bytes between segments.
    mpo = encode(cat, "MPO", save_all=True, append_images=[cat] * 6, progressive=True)
    assert mpo.count(b"\xff\xda") == 70
    app9 = b"\xff\xe9" + (2 + 65533).to_bytes(2, "big") + b"\xff\xda" * (65533 // 2) + b"\x00"
    for data in [*photos.values(), progressive, mpo, progressive[:2] + app9 * 4 + progressive[2:]]:
        check_jpeg_markers(data)
    check_jpeg_markers(progressive[:2] + b"junk\xff\x00" + progressive[2:])
    assert decode_image(mpo, **LIMITS).size == cat.size
    scan = b"\xff\xda\x00\x02"  # an empty scan: its segment, no entropy-coded data
    check_jpeg_markers(b"\xff\xd8" + scan * MAX_JPEG_SCANS)
    with pytest.raises(InvalidImageError, match=rf"^the JPEG has more than {MAX_JPEG_SCANS} scans, the limit$"):
        check_jpeg_markers(b"\xff\xd8" + scan * (MAX_JPEG_SCANS + 1))


def test_a_jpeg_header_pillow_would_read_for_seconds_is_refused_before_it_reads_it(photos, monkeypatch):
    # Found by the second hostile pass: 20 MB of empty segments (or of stray bytes) before the first
    # scan cost Pillow's header loop, in Python, 9 s of a core for one request.
    comment = b"\xff\xfe\x00\x02"
    check_jpeg_markers(b"\xff\xd8" + comment * (MAX_JPEG_SEGMENTS - 1) + b"\xff\xd9")
    with pytest.raises(InvalidImageError, match=rf"^the JPEG has more than {MAX_JPEG_SEGMENTS:,} marker segments"):
        check_jpeg_markers(b"\xff\xd8" + comment * MAX_JPEG_SEGMENTS + b"\xff\xd9")
    check_jpeg_markers(b"\xff\xd8" + b"\x00" * MAX_JPEG_STRAY_BYTES + comment)
    with pytest.raises(InvalidImageError, match=rf"^the JPEG has over {MAX_JPEG_STRAY_BYTES:,} stray bytes"):
        check_jpeg_markers(b"\xff\xd8" + b"\x00" * (MAX_JPEG_STRAY_BYTES + 1) + comment)
    monkeypatch.setattr("timmserve.model.decode._open", lambda data: pytest.fail("Pillow read the header"))
    for filler in (b"\xff\xe1\x00\x00", b"\xff" * 4, b"\xff\x00" * 2):
        crafted = photos["cat"][:2] + filler * 5_000_000 + photos["cat"][2:]  # 20 MB, as the hostile pass sent
        with pytest.raises(InvalidImageError, match="^the JPEG has"):
            decode_image(crafted, **LIMITS)


def test_formats_are_accepted_by_family_mpo_is_a_jpeg(photos):
    cat = Image.open(io.BytesIO(photos["cat"]))
    mpo = encode(cat, "MPO", save_all=True, append_images=[cat.rotate(90)])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    tensor = Preprocessor(DATA_CONFIG, **{"max_pixels": LIMITS["max_pixels"]})(mpo)
    jpeg = Preprocessor(DATA_CONFIG, **{"max_pixels": LIMITS["max_pixels"]})(encode(cat, "JPEG"))
    assert (tensor.float() - jpeg.float()).abs().mean() < 2  # the first picture, through the JPEG path
    assert set(FORMAT_FAMILIES.values()) == {"JPEG", "PNG", "WEBP", "BMP", "GIF"}
    assert decode_image(encode(Image.new("RGB", (8, 8)), "DIB"), **LIMITS).size == (8, 8)  # a BMP
    for fmt in ("TIFF", "PPM", "ICO", "TGA", "PCX"):
        with pytest.raises(UnsupportedMediaError, match=f"{fmt} images are not accepted"):
            decode_image(encode(Image.new("RGB", (16, 16)), fmt), **LIMITS)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "PA", "I;16", "L", "RGB", "CMYK"])
def test_a_large_image_is_reduced_before_conversion_and_matches_the_full_size_path(mode):
    """The reduced decode (box filter by an integer factor, alpha premultiplied) must give timm's
    answer within the fast path's tolerance: a gradient with a transparent half."""
    ramp = np.linspace(0, 255, 2000, dtype=np.float32)
    rgb = np.stack([np.tile(ramp, (1200, 1)), np.tile(ramp[::-1], (1200, 1)), np.full((1200, 2000), 90)], axis=-1)
    rgba = np.concatenate([rgb, np.full((1200, 2000, 1), 255.0)], axis=-1)
    rgba[:, 1000:, 3] = 0  # transparent right half: its colours must not bleed in
    image = Image.fromarray(rgba.astype(np.uint8), "RGBA")
    image = image.convert("RGB").convert(mode) if mode not in ("RGBA", "LA", "PA") else image.convert(mode)
    data = encode(image, "TIFF")  # lossless for every mode; read through the PNG path below
    source = Image.open(io.BytesIO(data))
    png = encode(source, "PNG") if mode not in ("CMYK", "PA") else encode(source, "TIFF")
    fast = Preprocessor(DATA_CONFIG, max_pixels=LIMITS["max_pixels"], fast_decode=True)
    full = Preprocessor(DATA_CONFIG, max_pixels=LIMITS["max_pixels"], fast_decode=False)
    if mode in ("CMYK", "PA"):
        pytest.skip(f"{mode} has no PNG form here; covered by the other modes' paths")
    from timmserve.model.preprocess import Normalizer

    normalise = Normalizer(DATA_CONFIG, torch.device("cpu"))
    difference = (normalise(fast(png)[None]) - normalise(full(png)[None])).abs().mean().item()
    assert difference < 0.03, difference  # in normalised units (timm's full transform is the reference)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_colours_do_not_bleed_into_a_reduced_image(mode):
    """Every other column transparent red, the others opaque black: on white that is grey, whether
    reduced first (alpha premultiplied) or not; averaged without premultiplying it turns red."""
    pixels = np.zeros((1200, 2000, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    pixels[:, 1::2] = (255, 0, 0, 0)
    png = encode(Image.fromarray(pixels, "RGBA").convert(mode), "PNG")
    fast = Preprocessor(DATA_CONFIG, max_pixels=LIMITS["max_pixels"], fast_decode=True)(png).float()
    full = Preprocessor(DATA_CONFIG, max_pixels=LIMITS["max_pixels"], fast_decode=False)(png).float()
    assert (fast - full).abs().mean() < 3, (fast.mean(dim=(1, 2)), full.mean(dim=(1, 2)))  # of 255 levels


class ExplodingPreprocessor:
    """Raises what nobody anticipated, for the image whose bytes say so."""

    def __init__(self, inner: Preprocessor) -> None:
        self.inner = inner
        self.data_config = inner.data_config

    def __call__(self, data: bytes) -> torch.Tensor:
        if data == b"explode":
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return self.inner(data)


def test_any_failure_reading_one_image_is_its_own_500_never_its_neighbours(photos):
    calls = []

    def backend(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        return torch.zeros(batch.shape[0], 3)

    classifier = Classifier(
        backend,
        ExplodingPreprocessor(Preprocessor(DATA_CONFIG, max_pixels=LIMITS["max_pixels"])),
        ["a", "b", "c"],
        device=torch.device("cpu"),
    )
    requests = [ImageRequest(photos["cat"], 1), ImageRequest(b"explode", 1), ImageRequest(photos["rocket"], 1)]
    first, broken, last = classifier.classify(requests)
    assert isinstance(broken, InternalError) and broken.status_code == 500
    assert [p.label for p in first] == ["a"] and [p.label for p in last] == ["a"]
    assert calls == [2]  # the two good images, in one batch


def infer_body(header: dict, binary: bytes = b"") -> tuple[bytes, str | None]:
    head = json.dumps(header).encode()
    return head + binary, (str(len(head)) if binary else None)


@pytest.mark.parametrize(
    ("header", "words"),
    [
        ({"inputs": [{"name": "image", "shape": ["1"], "datatype": "BYTES", "data": ["aGk="]}]}, "inputs[0].shape[0]"),
        ({"inputs": [{"name": "image", "shape": [1.5], "datatype": "BYTES", "data": ["aGk="]}]}, "inputs[0].shape[0]"),
        ({"inputs": [{"name": "image", "shape": [-1], "datatype": "BYTES", "data": ["aGk="]}]}, "inputs[0].shape[0]"),
        ({"inputs": [{"name": "image", "shape": [], "datatype": "BYTES", "data": ["aGk="]}]}, "inputs[0].shape"),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGk="], "parameters": []}]},
         "inputs[0].parameters"),
        ({"parameters": "fast", "inputs": []}, "parameters"),
        ({"parameters": {"top_k": "5"}, "inputs": []}, "parameters.top_k"),
        ({"parameters": {"binary_data_output": "yes"}, "inputs": []}, "parameters.binary_data_output"),
        ({"inputs": [], "outputs": [{"name": "label", "parameters": 3}]}, "outputs[0].parameters"),
        ({"inputs": "image"}, "inputs"),
        ({"id": 42, "inputs": []}, "id"),
    ],
)  # fmt: skip
def test_every_oip_field_is_checked_by_type_naming_it(header, words):
    body, length = infer_body(header)
    with pytest.raises(InvalidRequestError) as caught:
        oip.parse_infer_request(body, length, max_images=128)
    assert caught.value.detail.startswith(words), caught.value.detail


# Found by the hostile-client pass: a shape of 2**64 overflowed numpy (a plain-text 500), and a
# 20 MB body of millions of empty elements was decoded element by element before the 413 (16 s of
# the API server's event loop). The shape is checked first, in Python's ints; no element is decoded
# until the count is right.
@pytest.mark.parametrize(
    ("shape", "elements", "error", "words"),
    [
        ([2**64], 1, PayloadTooLargeError, "the request has 18446744073709551616 images; this server admits at most 4"),
        ([1, 2**64], 1, PayloadTooLargeError, "the request has 18446744073709551616 images"),
        ([5], 5, PayloadTooLargeError, "the request has 5 images"),
        ([2, 0], 0, InvalidRequestError, "input shape [2, 0] holds no image"),
        ([1], 3, InvalidRequestError, "input shape [1] does not match"),
        ([3], 1, InvalidRequestError, "input shape [3] does not match"),
    ],
)
@pytest.mark.parametrize("binary", [False, True])
def test_an_oip_shape_is_checked_before_any_element_is_decoded(monkeypatch, shape, elements, error, words, binary):
    decoded = []
    monkeypatch.setattr(oip, "decode_base64", lambda text, where: decoded.append(text) or b"x")
    tensor = {"name": "image", "shape": shape, "datatype": "BYTES"}
    if binary:
        blob = (struct.pack("<I", 1) + b"x") * elements
        body, length = infer_body({"inputs": [{**tensor, "parameters": {"binary_data_size": len(blob)}}]}, blob)
    else:
        body, length = infer_body({"inputs": [{**tensor, "data": ["eA=="] * elements}]})
    with pytest.raises(error) as caught:
        oip.parse_infer_request(body, length, max_images=4)
    assert caught.value.detail.startswith(words), caught.value.detail
    assert decoded == []


@pytest.mark.parametrize(
    ("shape", "data", "images"),
    [
        ([2, 1], [["eA=="], ["eQ=="]], [b"x", b"y"]),  # nested as the shape says
        ([2, 1], ["eA==", "eQ=="], [b"x", b"y"]),  # or flat
        ([1, 2], [["eA=="], ["eQ=="]], None),  # found by the second hostile pass: all four were a 200
        ([2], ["eA==", ["eQ=="]], None),
        ([1], [[], [[]], "eA=="], None),
        ([1], [["eA=="]], None),
        ([1], [[]] * 1_000_000 + ["eA=="], None),  # the pass's 20 MB of empty lists: not walked
    ],
)
def test_oip_json_data_is_flat_or_nested_as_its_shape_says(shape, data, images):
    tensor = {"name": "image", "shape": shape, "datatype": "BYTES", "data": data}
    body, length = infer_body({"inputs": [tensor]})
    if images is not None:
        assert oip.parse_infer_request(body, length, max_images=4).images == images
    else:
        with pytest.raises(InvalidRequestError, match=r"^(input shape .* does not match|BYTES data in JSON must be)"):
            oip.parse_infer_request(body, length, max_images=4)


def test_an_oip_input_must_be_named_image():
    body, length = infer_body({"inputs": [{"name": "foo", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}]})
    with pytest.raises(InvalidRequestError, match="""^this model's input is "image", not 'foo'$"""):
        oip.parse_infer_request(body, length, max_images=4)


@pytest.mark.parametrize("length", ["²", "1e3", "-1", "0x10", "9" * 5000, "١٢"])
def test_the_header_length_is_ascii_digits_only(length):
    with pytest.raises(InvalidRequestError, match="Inference-Header-Content-Length must be"):
        oip.parse_infer_request(b'{"inputs": []}', length, max_images=128)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
tensor_like = st.fixed_dictionaries(
    {
        "name": json_values | st.just("image"),
        "shape": json_values | st.just([1]),
        "datatype": json_values | st.just("BYTES"),
    },
    optional={"data": json_values | st.just(["aGk="]), "parameters": json_values | st.just({"binary_data_size": 8})},
)  # fmt: skip
request_like = st.fixed_dictionaries(
    {"inputs": json_values | st.lists(tensor_like, max_size=2)},
    optional={"id": json_values, "parameters": json_values, "outputs": json_values},
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=request_like, binary=st.binary(max_size=24) | st.just(struct.pack("<I", 4) + b"abcd"))
def test_any_oip_request_parses_or_is_a_400(header, binary):
    """The JSON and the binary forms: whatever arrives, a parsed request or an InvalidRequestError."""
    body, length = infer_body(header, binary)
    for header_length in (length, None):
        try:
            parsed = oip.parse_infer_request(body, header_length, max_images=128)
        except (InvalidRequestError, PayloadTooLargeError):
            continue
        assert parsed.images and all(isinstance(image, bytes) for image in parsed.images)


# JPEG variants (the second field pass): the marker walk reads the first frame's header, so a JPEG
# Pillow cannot read says which variant it is.


@pytest.mark.parametrize(
    ("marker", "precision", "hierarchical", "variant"),
    [
        (0xC0, 8, False, None),  # baseline
        (0xC1, 8, False, None),  # extended sequential
        (0xC2, 8, False, None),  # progressive
        (0xC1, 12, False, "12-bit"),
        (0xC3, 8, False, "lossless"),
        (0xC3, 16, False, "16-bit lossless"),
        (0xC5, 8, False, "hierarchical"),
        (0xC1, 8, True, "hierarchical"),  # a DHP marker before a plain frame
        (0xC7, 8, False, "hierarchical lossless"),
        (0xC9, 8, False, "arithmetic-coded"),
        (0xCB, 8, False, "lossless arithmetic-coded"),
        (0xCF, 12, False, "12-bit hierarchical lossless arithmetic-coded"),
    ],
)
def test_a_jpeg_frame_names_its_variant(marker, precision, hierarchical, variant):
    assert JpegFrame(marker, precision, hierarchical).variant == variant


def test_the_marker_walk_reads_the_first_pictures_frame_header(photos, field_files):
    cat = Image.open(io.BytesIO(photos["cat"]))
    assert check_jpeg_markers(photos["cat"]) == JpegFrame(0xC0, 8, False)
    assert check_jpeg_markers(encode(cat, "JPEG", progressive=True)) == JpegFrame(0xC2, 8, False)
    mpo = encode(cat, "MPO", save_all=True, append_images=[cat], progressive=True)
    assert check_jpeg_markers(mpo[:2] + b"\xff\xfe\x00\x02" + mpo[2:]) == JpegFrame(0xC2, 8, False)  # the first's
    assert check_jpeg_markers(field_files["cat_12bit.jpg"]) == JpegFrame(0xC1, 12, False)
    assert check_jpeg_markers(field_files["cat_lossless_gray.jpg"]) == JpegFrame(0xC3, 8, False)
    assert check_jpeg_markers(field_files["cat_hierarchical.jpg"]) == JpegFrame(0xC1, 8, True)
    assert check_jpeg_markers(b"\xff\xd8\xff\xd9") is None


def with_precision(jpeg: bytes, precision: int) -> bytes:
    """The JPEG with its frame header's sample precision byte changed (the byte after SOF's length)."""
    at = jpeg.index(b"\xff\xc0") + 4
    return jpeg[:at] + bytes([precision]) + jpeg[at + 1 :]


def test_a_jpeg_variant_pillow_cannot_open_is_a_415_naming_it(photos, field_files):
    # A valid 12-bit JPEG was a 400 "the bytes are not an image": Pillow reads 8-bit frames only.
    with pytest.raises(UnsupportedMediaError, match=r"^12-bit JPEG \(SOF1\) is not supported; send an 8-bit JPEG"):
        decode_image(field_files["cat_12bit.jpg"], **LIMITS)
    with pytest.raises(UnsupportedMediaError, match=r"^16-bit JPEG \(SOF0\) is not supported"):
        decode_image(with_precision(photos["cat"], 16), **LIMITS)  # the kind, not the one file
    with pytest.raises(InvalidImageError, match="not an image"):  # no frame to name: not a JPEG after all
        decode_image(b"\xff\xd8\xff\xd9", **LIMITS)


def test_a_jpeg_variant_whose_pixels_cannot_be_decoded_is_a_400_naming_it(field_files):
    # A hierarchical JPEG: Pillow reads its header, libjpeg has no decoder for its frames.
    with pytest.raises(
        InvalidImageError, match=r"^the hierarchical JPEG \(SOF1\) could not be decoded: .*send an 8-bit baseline"
    ):
        decode_image(field_files["cat_hierarchical.jpg"], **LIMITS)


def test_a_reduced_decode_that_fails_falls_back_to_the_full_decode(field_files):
    # A lossless JPEG: libjpeg-turbo decodes it at full size only; at a reduced DCT scale (768x512
    # at 1/2) it was a 400 "corrupt or truncated".
    lossless = field_files["cat_lossless_gray.jpg"]
    full = decode_image(lossless, **LIMITS)
    reduced = decode_image(lossless, **LIMITS, draft_size=(256, 256))
    assert full.size == (768, 512) and reduced.size == (384, 256)  # the full decode, then the box filter
    expected = np.asarray(full.reduce(2), dtype=np.float32)
    assert np.abs(np.asarray(reduced, dtype=np.float32) - expected).max() <= 1
    fast = Preprocessor(DATA_CONFIG, max_pixels=LIMITS["max_pixels"], fast_decode=True)(lossless)
    slow = Preprocessor(DATA_CONFIG, max_pixels=LIMITS["max_pixels"], fast_decode=False)(lossless)
    assert fast.shape == (3, 224, 224) and slow.shape == (3, 224, 224)


def test_a_jpeg_whose_full_decode_fails_too_is_a_400(photos):
    large = encode(Image.open(io.BytesIO(photos["cat"])).resize((1200, 800)), "JPEG")
    with pytest.raises(InvalidImageError, match=r"^the JPEG data is corrupt or truncated"):
        decode_image(large[: len(large) // 2], **LIMITS, draft_size=(256, 256))


def bmp_pixel_offset(bmp: bytes) -> int:
    return struct.unpack_from("<I", bmp, 10)[0]


def test_a_bmp_whose_alpha_is_zero_everywhere_is_opaque(field_files):
    # Many writers leave a 32-bit BMP's alpha bytes 0 under an alpha mask; viewers show it opaque.
    # Composited onto white it was a blank page, and a confident wrong label.
    bmp = field_files["cat_alpha0.bmp"]
    assert Image.open(io.BytesIO(bmp)).mode == "RGBA"
    decoded = np.asarray(decode_image(bmp, **LIMITS), dtype=np.float32)
    opaque = np.asarray(Image.open(io.BytesIO(bmp)).convert("RGB"), dtype=np.float32)
    assert np.array_equal(decoded, opaque)
    assert decoded.mean() < 200  # the cat, not white
    half = bytearray(bmp)
    half[bmp_pixel_offset(bmp) + 3 :: 4] = b"\x80" * len(half[bmp_pixel_offset(bmp) + 3 :: 4])
    assert np.asarray(decode_image(bytes(half), **LIMITS)).mean() > decoded.mean() + 40  # a used alpha: composited
    reduced = np.asarray(decode_image(bmp, **LIMITS, draft_size=(64, 48)), dtype=np.float32)
    assert abs(reduced.mean() - decoded.mean()) < 2  # dropped before the reduce, which weights by alpha


def test_a_png_transparent_everywhere_is_still_transparent():
    # Decided: only a BMP's zero alpha is a writer's leftover; a PNG's (or WebP's) alpha is meant.
    for fmt, options in (("PNG", {}), ("WEBP", {"lossless": True})):
        clear = encode(Image.new("RGBA", (32, 32), (200, 0, 0, 0)), fmt, **options)
        assert np.asarray(decode_image(clear, **LIMITS)).min() == 255, fmt  # white, as a browser shows it
