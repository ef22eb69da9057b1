"""Field inputs against a real server (issue 14): a bad image batched with good ones costs only its
own request; a phone's MPO is served; an OIP request is checked by type and by the queue's size;
JPEG variants, a BMP's unused alpha and an absolute-form target with an empty path are answered
as a user expects."""

from __future__ import annotations

import base64
import io
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.conftest import CAT_LABELS

RAW = {"Content-Type": "application/octet-stream"}
MAX_QUEUE = 8


@pytest.fixture(scope="module")
def server(start_module_server):
    # A long batch wait, so requests sent together share one batch.
    return start_module_server("--max-batch-size", "8", "--batch-timeout", "0.3", "--max-queue", str(MAX_QUEUE))


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (40, 90, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def test_an_image_that_breaks_the_resize_costs_only_its_own_request(server, photos):
    # 1 pixel wide and 1,000,000 tall, 4 KB: the resize tried to allocate ~196 GB, and the whole
    # batch got 500. Now a 400 naming the limit, and its six neighbours are classified.
    bodies = [photos["cat"]] * 6 + [png((1, 1_000_000))]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(
            pool.map(lambda body: httpx.post(f"{server.url}/predict", content=body, headers=RAW, timeout=60), bodies)
        )
    *good, bad = responses
    assert [r.status_code for r in good] == [200] * 6, [r.text for r in good]
    assert all(r.json()["predictions"][0]["label"] in CAT_LABELS for r in good)
    assert bad.status_code == 400 and "aspect ratio over the limit of 32:1" in bad.json()["detail"]


def test_a_multi_picture_jpeg_from_a_phone_is_served(server, photos):
    cat = Image.open(io.BytesIO(photos["cat"]))
    buffer = io.BytesIO()
    cat.save(buffer, "MPO", save_all=True, append_images=[cat.rotate(180)])
    response = httpx.post(f"{server.url}/predict", content=buffer.getvalue(), headers=RAW, timeout=60)
    assert response.status_code == 200, response.text  # was 415 "MPO images are not accepted"
    assert response.json()["predictions"][0]["label"] in CAT_LABELS


def infer(server, header: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/tf_efficientnet_lite0/infer", json=header, timeout=60)


def test_an_oip_shape_of_strings_is_a_400_naming_the_field(server, photos):
    data = [base64.b64encode(photos["cat"]).decode()]
    response = infer(server, {"inputs": [{"name": "image", "shape": ["1"], "datatype": "BYTES", "data": data}]})
    assert response.status_code == 400, response.text  # was 500
    assert response.json()["error"].startswith("inputs[0].shape[0]")


def test_an_oip_request_larger_than_the_queue_is_a_413_naming_the_limit(server):
    # Small images: the request stays under the shared servers' body limit (test_ray.py runs this too).
    data = [base64.b64encode(png((64, 64))).decode()] * (MAX_QUEUE + 1)
    header = {"inputs": [{"name": "image", "shape": [MAX_QUEUE + 1], "datatype": "BYTES", "data": data}]}
    response = infer(server, header)
    assert response.status_code == 413, response.text  # was 503 Retry-After: 1, every time
    assert f"at most {MAX_QUEUE} at once" in response.json()["error"]
    header["inputs"][0]["shape"] = [MAX_QUEUE]
    header["inputs"][0]["data"] = data[:MAX_QUEUE]
    assert infer(server, header).status_code == 200


# The second field pass: real files (tests/data/field, README there) and a request target.


def predict(server, data: bytes) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", content=data, headers=RAW, timeout=60)


def test_a_12_bit_jpeg_is_a_415_naming_the_variant(server, field_files):
    response = predict(server, field_files["cat_12bit.jpg"])
    assert response.status_code == 415, response.text  # was 400 "the bytes are not an image"
    assert response.json()["detail"].startswith("12-bit JPEG (SOF1) is not supported; send an 8-bit JPEG")


def test_a_hierarchical_jpeg_is_a_400_naming_the_variant(server, field_files):
    response = predict(server, field_files["cat_hierarchical.jpg"])
    assert response.status_code == 400 and "the hierarchical JPEG (SOF1) could not be decoded" in response.text


def test_a_lossless_jpeg_too_large_for_a_reduced_decode_gets_the_photos_label(server, field_files, photos):
    # 768x512: fast decode's 1/2 scale fails for lossless JPEG (was 400 "corrupt or truncated").
    response = predict(server, field_files["cat_lossless_gray.jpg"])
    assert response.status_code == 200, response.text
    source = predict(server, photos["cat"]).json()["predictions"][0]["label"]
    assert response.json()["predictions"][0]["label"] == source  # the photo it was made from
    assert source in CAT_LABELS


def test_a_bmp_whose_alpha_is_zero_everywhere_is_classified_opaque(server, field_files):
    # Composited onto white it was a blank page: 200 "nematode" at 1 %.
    response = predict(server, field_files["cat_alpha0.bmp"])
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] in CAT_LABELS


@pytest.mark.parametrize("query", ["", "?x=1"])
def test_an_absolute_form_target_with_an_empty_path_is_served_as_the_root(server, query):
    # `GET http://127.0.0.1:PORT HTTP/1.1` means "/" (RFC 9112, 3.2.2): was uvicorn's plain-text 400.
    authority = server.url.removeprefix("http://")
    host, port = authority.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = f"GET http://{authority}{query} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
        sock.sendall(head.encode())
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200 "), response[:200]
    assert b'id="file"' in response  # the demo page, as GET / answers
