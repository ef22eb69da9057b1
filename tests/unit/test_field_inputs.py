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

from timmserve import oip
from timmserve.classifier import Classifier
from timmserve.errors import (
    InternalError,
    InvalidImageError,
    InvalidRequestError,
    PayloadTooLargeError,
    UnsupportedMediaError,
)
from timmserve.payload import ImageRequest
from timmserve.preprocess import (
    FORMAT_FAMILIES,
    MAX_JPEG_SCANS,
    MAX_JPEG_SEGMENTS,
    MAX_JPEG_STRAY_BYTES,
    Preprocessor,
    check_jpeg_markers,
    decode_image,
)

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
    monkeypatch.setattr("timmserve.preprocess._open", lambda data: pytest.fail("Pillow read the header"))
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
    from timmserve.preprocess import Normalizer

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
