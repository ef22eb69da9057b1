"""Bad input never becomes a 5xx and never harms anyone else: every malformed request of the table,
then a property-based fuzzer (hypothesis) over random bodies, content types, queries and headers,
all sent while a steady stream of good requests runs against the same server."""

from __future__ import annotations

import base64
import gzip
import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import CAT_LABELS

MAX_BODY = 256 * 1024  # small, so the oversized-body case stays small too


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height, with almost no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


RAW = {"Content-Type": "application/octet-stream"}
# 32 MiB of zeros in 32 kB: under this module's body limit as sent, over every server's once inflated
GZIP_BOMB = gzip.compress(bytes(32 * 2**20))
JPEG = {"Content-Type": "image/jpeg"}

# (case, request keyword arguments, status, words the detail must contain)
BAD_INPUTS = [
    ("not JSON", {"content": b"{oops", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    ("JSON array", {"json": [1, 2]}, 400, "must be an object"),
    ("JSON string", {"json": "image"}, 400, "must be an object"),
    ("missing image", {"json": {"picture": "x"}}, 400, '"image"'),
    ("image is a number", {"json": {"image": 5}}, 400, "base64 string"),
    ("image is null", {"json": {"image": None}}, 400, "base64 string"),
    ("invalid base64", {"json": {"image": "***"}}, 400, "base64"),
    ("base64 of nothing", {"json": {"image": ""}}, 400, "empty"),
    ("empty raw body", {"content": b"", "headers": RAW}, 400, "empty"),
    ("text, not an image", {"content": b"not an image at all", "headers": JPEG}, 400, "not an image"),
    ("JPEG marker then noise", {"content": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "headers": JPEG}, 400,
     "not an image"),
    ("PDF", {"content": b"%PDF-1.4\n1 0 obj\n", "headers": RAW}, 400, "not an image"),
    ("SVG", {"content": b"<svg xmlns='http://www.w3.org/2000/svg'/>", "headers": {"Content-Type": "image/svg+xml"}},
     400, "not an image"),
    ("TIFF", {"content": encoded(Image.new("RGB", (8, 8)), "TIFF"), "headers": RAW}, 415, "TIFF"),
    ("zero-width PNG", {"content": png_with_header(0, 10), "headers": RAW}, 400, "not an image"),
    ("bomb over the pixel limit", {"content": png_with_header(9000, 9000), "headers": RAW}, 413, "the limit is"),
    ("bomb over Pillow's own limit", {"content": png_with_header(100_000, 100_000), "headers": RAW}, 413,
     "the image is 100000x100000 = 10,000,000,000 pixels; the limit is"),
    ("body over the limit", {"content": b"\xff" * (MAX_BODY + 1), "headers": RAW}, 413, "limit"),
    ("form-urlencoded", {"content": b"x=1", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 415,
     "not accepted"),
    ("text/plain", {"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "not accepted"),
    ("no content type", {"content": b"hello", "headers": {"Content-Type": ""}}, 415, "not accepted"),
    ("multipart without image", {"files": {"picture": ("a.jpg", b"x")}}, 400, '"image"'),
    ("top_k 0", {"params": {"top_k": 0}}, 400, "top_k"),
    ("top_k negative", {"params": {"top_k": -3}}, 400, "top_k"),
    ("top_k not a number", {"params": {"top_k": "five"}}, 400, "top_k"),
    ("top_k a fraction", {"params": {"top_k": "1.5"}}, 400, "top_k"),
    ("top_k over the classes", {"params": {"top_k": 1001}}, 400, "top_k"),
    ("top_k in JSON a list", {"json_top_k": [3]}, 400, "top_k"),
    ("top_k in JSON true", {"json_top_k": True}, 400, "top_k"),
    ("top_k a superscript two", {"params": {"top_k": "²"}}, 400, "top_k"),
    ("top_k of 5,000 digits", {"params": {"top_k": "1" * 5000}}, 400, "top_k"),
    ("top_k in JSON a superscript two", {"json_top_k": "²"}, 400, "top_k"),
    ("top_k in a form a superscript two", {"form_top_k": "²"}, 400, "top_k"),
    ("base64 with a stray character", {"json": {"image": "aGVsbG8gd29y!bGQ="}}, 400,
     "invalid character '!' at position 12"),
    ("gzip bomb", {"content": GZIP_BOMB, "headers": {**RAW, "Content-Encoding": "gzip"}}, 413,
     "inflates to over the limit"),
    ("gzip that is not", {"content": b"plain", "headers": {**RAW, "Content-Encoding": "gzip"}}, 400,
     "not valid gzip"),
    ("content encoding br", {"content": b"x", "headers": {**RAW, "Content-Encoding": "br"}}, 415,
     "'br' is not accepted"),
]  # fmt: skip


@pytest.fixture(scope="module")
def server(start_module_server):
    return start_module_server("--max-batch-size", "8", "--batch-timeout", "0.01", "--max-body-bytes", str(MAX_BODY))


@pytest.fixture(scope="module")
def good_traffic(server, photos) -> Iterator[list[tuple[int, str | None]]]:
    """Good requests, one after another, for as long as the module's tests run (bounded: 10 min)."""
    outcomes: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def send() -> None:
        deadline = time.monotonic() + 600
        with httpx.Client(timeout=60) as client:
            while not stop.is_set() and time.monotonic() < deadline:
                response = client.post(f"{server.url}/predict", content=photos["cat"], headers=JPEG)
                label = response.json()["predictions"][0]["label"] if response.status_code == 200 else None
                outcomes.append((response.status_code, label))
                time.sleep(0.02)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    yield outcomes
    stop.set()
    thread.join(timeout=60)


def send_case(url: str, photos: dict[str, bytes], kwargs: dict) -> httpx.Response:
    kwargs = dict(kwargs)
    if "params" in kwargs:  # a good image with a bad query
        kwargs.update(content=photos["cat"], headers=RAW)
    if "json_top_k" in kwargs:
        kwargs = {"json": {"image": b64(photos["cat"]), "top_k": kwargs["json_top_k"]}}
    if "form_top_k" in kwargs:
        kwargs = {"files": {"image": ("cat.jpg", photos["cat"])}, "data": {"top_k": kwargs["form_top_k"]}}
    return httpx.post(f"{url}/predict", timeout=60, **kwargs)


@pytest.mark.parametrize(("case", "kwargs", "status", "words"), BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_its_4xx_with_a_detail(server, good_traffic, photos, case, kwargs, status, words):
    response = send_case(server.url, photos, kwargs)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert response.headers["X-Request-ID"]


@pytest.mark.parametrize(
    ("case", "image"),
    [
        ("1x1 pixel", encoded(Image.new("RGB", (1, 1), "red"), "PNG")),
        ("CMYK JPEG", encoded(Image.new("CMYK", (40, 30)), "JPEG")),
        ("16-bit greyscale PNG", encoded(Image.new("I;16", (40, 30)), "PNG")),
        ("grey with alpha", encoded(Image.new("LA", (40, 30)), "PNG")),
        ("palette GIF", encoded(Image.new("P", (40, 30)), "GIF")),
    ],
)
def test_odd_but_valid_images_are_classified(server, good_traffic, case, image):
    response = httpx.post(f"{server.url}/predict", content=image, headers=RAW, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 5


CONTENT_TYPES = st.sampled_from(
    ["application/json", "image/jpeg", "image/png", "application/octet-stream", "multipart/form-data",
     "multipart/form-data; boundary=xyz", "text/plain", "application/x-www-form-urlencoded", "", "image/*",
     "application/json; charset=utf-8", "application/xml"]
)  # fmt: skip
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
BODIES = st.one_of(
    st.binary(max_size=2048),
    st.text(max_size=512).map(str.encode),
    JSON_VALUES.map(lambda value: httpx.Request("POST", "/", json=value).content),
    st.fixed_dictionaries(
        {"image": st.one_of(st.text(max_size=64), st.binary(max_size=256).map(b64), st.integers())},
        optional={"top_k": JSON_VALUES},
    ).map(lambda value: httpx.Request("POST", "/", json=value).content),
    st.binary(max_size=1024).map(lambda noise: b"\x89PNG\r\n\x1a\n" + noise),
    st.binary(max_size=1024).map(lambda noise: b"\xff\xd8\xff" + noise),
)
HEADER_NAMES = st.sampled_from(["X-Request-ID", "Accept", "Content-Encoding", "X-API-Key", "X-Whatever"])
HEADER_VALUES = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(str.strip)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=BODIES,
    content_type=CONTENT_TYPES,
    top_k=st.one_of(st.none(), st.text(max_size=6), st.integers(-5, 2000)),
    headers=st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=2),
)
def test_fuzzed_requests_never_get_a_5xx(server, good_traffic, body, content_type, top_k, headers):
    headers = {**headers, "Content-Type": content_type}
    params = {} if top_k is None else {"top_k": top_k}
    response = httpx.post(f"{server.url}/predict", content=body, headers=headers, params=params, timeout=60)
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code != 200:
        assert response.json()["detail"]


def test_good_traffic_was_unharmed_and_the_server_is_alive(server, good_traffic):
    """Runs last in this module: everything above ran while the good requests flowed."""
    assert len(good_traffic) >= 20
    assert {status for status, _ in good_traffic} == {200}
    assert all(label in CAT_LABELS for _, label in good_traffic)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
