"""payload.py behind a real (in-process) Starlette app and HTTP client."""

from __future__ import annotations

import base64

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from timmserve.errors import RequestError
from timmserve.payload import PayloadLimits, parse_predict_request

LIMITS = PayloadLimits(max_body_bytes=4096, num_classes=10, default_top_k=5)
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
        ({"content": b"\0" * 5000, "headers": {"Content-Type": "image/png"}}, 413, "limit is 4,096"),
    ],
)
def test_malformed_bodies_name_the_problem(client, kwargs, status, words):
    response = client.post("/predict", **kwargs)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_chunked_body_over_the_limit_is_refused_while_streaming(client):
    chunks = (b"\0" * 1024 for _ in range(10))  # no Content-Length: sent chunked
    response = client.post("/predict", content=chunks, headers={"Content-Type": "image/png"})
    assert response.status_code == 413 and "over the limit of 4,096" in response.json()["detail"]
