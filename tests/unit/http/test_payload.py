"""payload.py behind a real (in-process) Starlette app and HTTP client."""

from __future__ import annotations

import asyncio
import base64
import gzip
import re
import time
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from timmserve.errors import InvalidRequestError, RequestError, RequestTimeoutError
from timmserve.http.payload import PayloadLimits, decode_base64, parse_predict_request, read_body

LIMITS = PayloadLimits(
    max_body_bytes=16384, num_classes=10, default_top_k=5, max_images=128
)  # room for 5,000-digit top_k
IMAGE = b"\xff\xd8\xff\xe0 pretend JPEG bytes"


async def endpoint(request: Request) -> JSONResponse:
    try:
        parsed = await parse_predict_request(request, LIMITS)
    except RequestError as error:
        return JSONResponse({"detail": error.detail}, status_code=error.status_code)
    return JSONResponse({"data": base64.b64encode(parsed.data).decode(), "top_k": parsed.top_k})


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(Starlette(routes=[Route("/predict", endpoint, methods=["POST"])]))


def parsed(response) -> tuple[bytes, int]:
    assert response.status_code == 200, response.text
    return base64.b64decode(response.json()["data"]), response.json()["top_k"]


class StubReceive:
    """An ASGI receive: the given chunks, each after `pause` seconds, then (stall) nothing, ever."""

    def __init__(self, chunks: list[bytes], pause: float = 0.0, stall: bool = False) -> None:
        self.chunks, self.pause, self.stall, self.calls = chunks, pause, stall, 0

    async def __call__(self) -> dict:
        self.calls += 1
        if self.calls > len(self.chunks):
            await asyncio.sleep(3600)  # a client that stopped sending
        await asyncio.sleep(self.pause)
        more = self.stall or self.calls < len(self.chunks)
        return {"type": "http.request", "body": self.chunks[self.calls - 1], "more_body": more}


def stub_request(chunks: list[bytes], *, pause: float = 0.0, stall: bool = False, headers=()) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": list(headers), "query_string": b""}
    return Request(scope, StubReceive(chunks, pause, stall))


def test_json_form(client):
    body = {"image": base64.b64encode(IMAGE).decode()}
    assert parsed(client.post("/predict", json=body)) == (IMAGE, 5)
    assert parsed(client.post("/predict", json={**body, "top_k": 3})) == (IMAGE, 3)


def test_json_form_accepts_a_data_url(client):
    body = {"image": "data:image/jpeg;base64," + base64.b64encode(IMAGE).decode()}
    assert parsed(client.post("/predict", json=body)) == (IMAGE, 5)


@pytest.mark.parametrize("content_type", ["image/jpeg", "image/png", "application/octet-stream"])
def test_raw_body_form(client, content_type):
    response = client.post("/predict?top_k=2", content=IMAGE, headers={"Content-Type": content_type})
    assert parsed(response) == (IMAGE, 2)


def test_multipart_form(client):
    response = client.post("/predict", files={"image": ("a.jpg", IMAGE, "image/jpeg")}, data={"top_k": "4"})
    assert parsed(response) == (IMAGE, 4)


@pytest.mark.parametrize(
    ("kwargs", "status", "words"),
    [
        ({"json": [1, 2]}, 400, "must be an object"),
        ({"json": {"image": None}}, 400, "not null"),
        ({"json": {"image": ["a"]}}, 400, "not an array"),
        ({"json": {"image": 5}}, 400, "not an integer"),
        ({"json": {"image": 0.5}}, 400, "not a number"),
        ({"json": {"image": "not base64!"}}, 400, "not valid base64"),
        ({"json": {"image": ""}}, 400, "empty"),
        ({"json": {"image": "aGk=", "top_k": 11}}, 400, "from 1 to 10"),
        ({"json": {"image": "aGk=", "top_k": True}}, 400, "from 1 to 10"),
        ({"json": {"image": "aGk=", "top_k": 2.5}}, 400, "from 1 to 10"),
        ({"content": b"", "headers": {"Content-Type": "application/json"}}, 400, "empty"),
        ({"content": b"[", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        ({"content": IMAGE, "headers": {"Content-Type": "text/plain"}}, 415, "'text/plain' is not accepted"),
        ({"content": IMAGE, "headers": {"Content-Type": ""}}, 415, "'none' is not accepted"),
        ({"files": {"picture": ("a.jpg", IMAGE)}}, 400, 'no file field "image"'),
        (
            {"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
            400,
            "multipart",
        ),
        (
            {
                "content": b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n' * 11 + b"--x--\r\n",
                "headers": {"Content-Type": "multipart/form-data; boundary=x"},
            },
            400,
            "the multipart body cannot be parsed (Too many fields. Maximum number of fields is 10.)",
        ),
        ({"content": b"\0" * 16385, "headers": {"Content-Type": "image/png"}}, 413, "limit is 16,384"),
    ],
)
def test_malformed_bodies_name_the_problem(client, kwargs, status, words):
    response = client.post("/predict", **kwargs)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_chunked_body_over_the_limit_is_refused_while_streaming(client):
    chunks = (b"\0" * 1024 for _ in range(17))  # no Content-Length: sent chunked
    response = client.post("/predict", content=chunks, headers={"Content-Type": "image/png"})
    assert response.status_code == 413 and "over the limit of 16,384" in response.json()["detail"]


# --- top_k: an integer from 1 to the class count, or a 400 naming it, wherever it is given ---

IMAGE_BASE64 = base64.b64encode(IMAGE).decode()
TOP_K_PLACES = {
    "query": lambda client, top_k: client.post(
        "/predict", params={"top_k": top_k}, content=IMAGE, headers={"Content-Type": "image/jpeg"}
    ),
    "form": lambda client, top_k: client.post("/predict", files={"image": ("a.jpg", IMAGE)}, data={"top_k": top_k}),
    "json": lambda client, top_k: client.post("/predict", json={"image": IMAGE_BASE64, "top_k": top_k}),
}


@pytest.mark.parametrize("place", TOP_K_PLACES)
@pytest.mark.parametrize(
    ("top_k", "expected"),
    [
        ("3", 3),
        (" +03 ", 3),
        ("0" * 5000 + "7", 7),
        ("²", None),  # str.isdigit() says yes, int() says no
        ("٣", None),  # int() reads it as 3: not an ASCII digit
        ("1_0", None),  # int() reads it as 10
        ("1" * 5000, None),  # over Python's 4,300-digit int-string limit
        ("0", None),
        ("11", None),
        ("-1", None),
        ("", None),
    ],
)
def test_top_k_is_an_integer_in_range_or_a_400_naming_it(client, place, top_k, expected):
    response = TOP_K_PLACES[place](client, top_k)
    if expected is None:
        assert response.status_code == 400, response.text
        assert response.json()["detail"].startswith("top_k must be an integer from 1 to 10, got ")
        assert len(response.json()["detail"]) < 100  # the value is shown cut short
    else:
        assert parsed(response) == (IMAGE, expected)


def test_a_json_top_k_beyond_the_int_string_limit_is_a_400_naming_it(client):
    body = b'{"image": "aGk=", "top_k": ' + b"9" * 5000 + b"}"
    response = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["detail"] == "top_k must be an integer from 1 to 10, got inf"


def expected_top_k(value: object) -> int | None:
    """The right answer, written independently of payload.py: ASCII decimal 1..10, else a 400."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*\+?0*([0-9]+)\s*", value, re.ASCII)
        value = int(match[1][:3]) if match else None  # 3 digits are plenty to tell 1..10 apart
    in_range = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 10
    return value if in_range else None


@settings(max_examples=300, deadline=None)
@given(
    place=st.sampled_from(sorted(TOP_K_PLACES)),
    top_k=st.one_of(
        st.text(max_size=12),
        st.text("0123456789+- \t²³¹٣۳߃१", max_size=12),
        st.integers(-(10**30), 10**30).map(str),
        st.integers(1, 10).map(lambda k: f" {k} "),
    ),
)
def test_fuzzed_top_k_gets_its_right_answer_and_never_a_5xx(client, place, top_k):
    response = TOP_K_PLACES[place](client, top_k)
    assert response.status_code < 500
    expected = expected_top_k(top_k)
    if expected is None:
        assert response.status_code == 400 and "top_k" in response.json()["detail"], response.text
    else:
        assert parsed(response) == (IMAGE, expected)


@settings(max_examples=100, deadline=None)
@given(
    top_k=st.one_of(
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.lists(st.integers(), max_size=2),
    )
)
def test_fuzzed_json_top_k_values_get_their_right_answer(client, top_k):
    response = TOP_K_PLACES["json"](client, top_k)
    expected = expected_top_k(top_k)
    if expected is None:
        assert response.status_code == 400 and "top_k" in response.json()["detail"], response.text
    else:
        assert parsed(response) == (IMAGE, expected)


# --- Content-Encoding: gzip and deflate inflated, with the size limit after inflating ---


@pytest.mark.parametrize(
    ("coding", "compress"),
    [
        ("gzip", gzip.compress),
        ("GZip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("identity", lambda data: data),
        ("gzip", lambda data: gzip.compress(data[:10]) + gzip.compress(data[10:])),  # two gzip members
        ("gzip", lambda data: gzip.compress(b"") * 63 + gzip.compress(data)),  # 64 members: the limit
    ],
)
def test_compressed_bodies_are_inflated(client, coding, compress):
    headers = {"Content-Type": "image/jpeg", "Content-Encoding": coding}
    assert parsed(client.post("/predict?top_k=2", content=compress(IMAGE), headers=headers)) == (IMAGE, 2)
    json_body = b'{"image": "%s"}' % base64.b64encode(IMAGE)
    headers = {"Content-Type": "application/json", "Content-Encoding": coding}
    assert parsed(client.post("/predict", content=compress(json_body), headers=headers)) == (IMAGE, 5)


@pytest.mark.parametrize(
    ("coding", "body", "status", "detail"),
    [
        ("gzip", gzip.compress(b"\0" * 10**6), 413, "the body inflates to over the limit of 16,384 bytes"),
        ("deflate", zlib.compress(b"\0" * 16385), 413, "the body inflates to over the limit of 16,384 bytes"),
        ("br", IMAGE, 415, "content encoding 'br' is not accepted; send gzip, deflate or none"),
        ("gzip, deflate", IMAGE, 415, "content encoding 'gzip, deflate' is not accepted"),
        ("gzip", IMAGE, 400, "the body is not valid gzip data (Error -3 while decompressing data: incorrect header"),
        ("gzip", gzip.compress(IMAGE)[:-5], 400, "the gzip body is truncated"),
        ("gzip", b"", 400, "the gzip body is truncated"),
        ("deflate", zlib.compress(IMAGE) + b"more", 400, "the deflate body has data after its end"),
        ("gzip", gzip.compress(b"") * 65 + gzip.compress(IMAGE), 400, "the gzip body has more than 64 members"),
    ],
)
def test_bad_compressed_bodies_name_the_problem(client, coding, body, status, detail):
    response = client.post("/predict", content=body, headers={"Content-Type": "image/jpeg", "Content-Encoding": coding})
    assert response.status_code == status, response.text
    assert response.json()["detail"].startswith(detail)


def test_a_bomb_stops_inflating_at_the_limit():
    """100 MB of zeros is 100 kB of gzip, under the limit as sent: inflating stops at the limit,
    instead of holding the 100 MB first."""
    limits = PayloadLimits(max_body_bytes=2**20, num_classes=10, default_top_k=5, max_images=128)
    bomb = gzip.compress(b"\0" * 10**8)
    assert len(bomb) < limits.max_body_bytes
    tracemalloc.start()
    try:
        with pytest.raises(RequestError, match="inflates to over the limit of 1,048,576 bytes") as raised:
            asyncio.run(read_body(stub_request([bomb], headers=[(b"content-encoding", b"gzip")]), limits))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert raised.value.status_code == 413
    assert peak < 4 * limits.max_body_bytes


def test_a_content_length_that_is_not_ascii_digits_is_left_to_the_streamed_count():
    request = stub_request([IMAGE], headers=[(b"content-length", "²".encode("latin-1"))])
    assert asyncio.run(read_body(request, LIMITS)) == IMAGE


# --- a body that stalls: 408 (and the connection closed), not held for ever ---


@pytest.mark.parametrize(
    ("sent", "detail"),
    [
        ([], "no byte of the body arrived for 0.2 s"),
        ([b"part of a body"], "the body came slower than 500 bytes/s over 0.2 s"),  # 14 bytes in the window
    ],
)
def test_a_body_that_stalls_past_the_timeout_is_a_408(sent, detail):
    limits = PayloadLimits(max_body_bytes=4096, num_classes=10, default_top_k=5, max_images=128, body_timeout=0.2)
    reading = read_body(stub_request(sent, stall=True), limits)
    with pytest.raises(RequestTimeoutError, match=f"^{re.escape(detail)}$") as raised:
        asyncio.run(asyncio.wait_for(reading, 10))  # bounded: without the timeout, a TimeoutError
    assert raised.value.status_code == 408  # the connection closes: test_http, middleware.CloseUnreadBody


@pytest.mark.parametrize("burst", [b"", b"a" * 1_000_000])
def test_a_body_that_trickles_is_a_408_within_the_timeout_even_after_a_burst(burst):
    # Found by the hostile-client passes: a byte a second, each pause under the timeout, held the
    # connection for ever; then, counted over the whole body, a 19 MiB burst bought hours of it.
    limits = PayloadLimits(max_body_bytes=2**21, num_classes=10, default_top_k=5, max_images=128, body_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError, match="^the body came slower than 500 bytes/s over 0.3 s$"):
        asyncio.run(read_body(stub_request([burst, *[b"a"] * 100], pause=0.05), limits))  # then 20 bytes/s
    assert time.monotonic() - started < 1.5  # not the 5 s the 100 bytes would take


def test_the_body_timeout_bounds_each_pause_not_the_whole_body():
    limits = PayloadLimits(max_body_bytes=4096, num_classes=10, default_top_k=5, max_images=128, body_timeout=0.2)
    chunks = [b"a" * 100] * 6  # 6 × 0.1 s: longer than the timeout in all, each pause shorter
    assert asyncio.run(read_body(stub_request(chunks, pause=0.1), limits)) == b"a" * 600


# --- base64: one rule for /predict and the Open Inference Protocol ---

# Every byte value ('+' and '/' in the standard alphabet, '-' and '_' in the URL-safe one), and a
# length (769) that base64 pads with '=='.
DATA = bytes(range(256)) * 3 + b"!"
STANDARD = base64.b64encode(DATA).decode()


@pytest.mark.parametrize(
    "text",
    [
        STANDARD,
        base64.encodebytes(DATA).decode(),  # wrapped at 76 characters, a newline at the end
        base64.encodebytes(DATA).decode().replace("\n", "\r\n"),
        " " + STANDARD + " \t",
        base64.urlsafe_b64encode(DATA).decode(),
        STANDARD.rstrip("="),  # both '=' missing
        STANDARD[:-1],  # one '=' missing
        STANDARD + "=",  # more padding than needed
        "data:image/jpeg;base64," + STANDARD,
        "data:;BASE64," + base64.encodebytes(DATA).decode(),
        # wrapped, URL-safe and unpadded at once
        "\n".join(base64.urlsafe_b64encode(DATA).decode().rstrip("=")[i : i + 64] for i in range(0, 1028, 64)),
    ],
)
def test_unambiguous_base64_is_accepted(text):
    assert decode_base64(text, '"image"') == DATA


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        ("aGVsbG8gd29y!bGQ=", "invalid character '!' at position 12"),
        ("aGVsbG8=\u00e9", "invalid character 'é' at position 8"),
        ("data:image/png;base64,aGk*", "invalid character '*' at position 25"),
        ("aGk=aGk=", "padding '=' at position 3 comes before the end"),
        ("aGVsb", "5 base64 characters do not make whole bytes (cut short?)"),
        ("data:image/png,aGk=", 'a data: URI must say ";base64," before its data'),
        ("data:image/png;base64", 'a data: URI must say ";base64," before its data'),
    ],
)
def test_what_is_not_base64_is_named_with_its_cause(text, cause):
    with pytest.raises(InvalidRequestError) as raised:
        decode_base64(text, '"image"')
    assert raised.value.detail == f'"image" is not valid base64: {cause}'
