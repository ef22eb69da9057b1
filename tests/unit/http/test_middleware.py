from __future__ import annotations

import asyncio
import json
import logging

import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from timmserve.http import metrics
from timmserve.http.middleware import (
    ApiKeyAuth,
    CloseUnreadBody,
    HeadAsGet,
    RequestContext,
    endpoint_label,
    request_id_of,
)
from timmserve.logs import JsonFormatter, TextFormatter

KNOWN = frozenset({"/predict", "/health", "/metrics"})


async def echo_id(request):
    return PlainTextResponse(request_id_of(request.scope))


@pytest.fixture
def client() -> TestClient:
    app = Starlette(routes=[Route(path, echo_id) for path in ("/predict", "/health", "/metrics")])
    app.add_middleware(ApiKeyAuth, api_key="k3y")
    app.add_middleware(RequestContext, known_paths=KNOWN)
    return TestClient(app)


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/predict", "/predict"),
        ("/v2/models/resnet/infer", "/v2/models/{model}/infer"),
        ("/v2/models/x/ready", "/v2/models/{model}/ready"),
        ("/v2/models/anything", "/v2/models/{model}"),
        ("/wp-admin.php", "other"),
    ],
)
def test_endpoint_labels_stay_few_whatever_the_path(path, label):
    assert endpoint_label(path, KNOWN) == label


def test_the_key_is_required_except_on_open_paths(client):
    assert client.get("/health").status_code == 200
    for headers in ({}, {"X-API-Key": "k3y "}, {"X-API-Key": "K3Y"}, {"Authorization": "Basic k3y"}):
        response = client.get("/predict", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["WWW-Authenticate"] == "Bearer" and "API key" in response.json()["detail"]
    assert client.get("/metrics", headers={"X-API-Key": "k3y"}).status_code == 200
    assert client.get("/metrics", headers={"Authorization": "bearer k3y"}).status_code == 200


def test_the_key_refusal_under_v2_uses_the_protocols_error_format(client):
    # Every non-200 under /v2 is {"error": …}: tritonclient reads only that key (the 401 was {"detail"}).
    response = client.get("/v2/models/m/ready")
    assert response.status_code == 401 and "API key" in response.json()["error"]


def test_request_id_is_kept_when_sane_and_made_when_not(client):
    headers = {"X-API-Key": "k3y"}
    kept = client.get("/predict", headers={**headers, "X-Request-ID": "abc-123"})
    assert kept.headers["X-Request-ID"] == "abc-123" == kept.text  # the endpoint saw the same id
    made = client.get("/predict", headers={**headers, "X-Request-ID": "x" * 200})
    assert made.headers["X-Request-ID"] != "x" * 200 and len(made.headers["X-Request-ID"]) == 32
    refused = client.get("/predict")
    assert refused.status_code == 401 and refused.headers["X-Request-ID"]  # 401s carry an id too


def test_behind_ray_serves_proxy_its_request_id_is_kept_as_sent_and_not_added_again():
    app = Starlette(routes=[Route("/predict", echo_id)])
    app.add_middleware(RequestContext, known_paths=KNOWN, proxy_sets_id=True)
    response = TestClient(app).get("/predict", headers={"X-Request-ID": "x" * 200})
    assert response.text == "x" * 200  # the proxy answers with this id: the log must say the same
    assert "X-Request-ID" not in response.headers  # the proxy adds it


def test_a_request_cancelled_because_its_client_left_counts_as_499(monkeypatch):
    """Ray Serve cancels the request of a client that left: not a 500."""
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)

    async def cancelled_app(scope, receive, send) -> None:
        raise asyncio.CancelledError

    async def call() -> None:
        scope = {"type": "http", "method": "POST", "path": "/predict", "headers": []}
        await RequestContext(cancelled_app, KNOWN)(scope, None, None)

    def counted(status: str) -> float:
        return metrics.http_metrics().requests.labels("/predict", status)._value.get()

    before = counted("499")
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(call())
    assert counted("499") == before + 1


def test_head_is_get_without_the_body():
    seen, sent = [], []

    async def app(scope, receive, send):
        seen.append(scope["method"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"9")]})
        await send({"type": "http.response.body", "body": b"some text"})

    async def record(message):
        sent.append(message)

    scope = {"type": "http", "method": "HEAD", "path": "/info", "headers": []}
    asyncio.run(HeadAsGet(app)(scope, None, record))
    assert seen == ["GET"] and scope["method"] == "HEAD"  # the server's own scope still says HEAD
    assert sent[0] == {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"9")]}
    assert sent[1] == {"type": "http.response.body", "body": b""}


def test_head_answers_on_fastapi_get_routes_only():
    app = FastAPI()  # FastAPI's routes, unlike Starlette's, answer only the methods they declare

    @app.get("/info")
    async def info() -> PlainTextResponse:
        return PlainTextResponse("some text")

    @app.post("/predict")
    async def predict() -> PlainTextResponse:
        return PlainTextResponse("posted")

    app.add_middleware(HeadAsGet)
    client = TestClient(app)
    assert client.head("/info").status_code == 200 and client.get("/info").text == "some text"
    assert client.head("/predict").status_code == client.get("/predict").status_code == 405
    assert client.head("/nowhere").status_code == 404 and client.post("/predict").text == "posted"


def _record(**extra) -> logging.LogRecord:
    record = logging.LogRecord("timmserve.access", logging.INFO, __file__, 1, "POST %s %d", ("/predict", 200), None)
    record.__dict__.update(extra)
    return record


def test_json_logs_are_one_object_with_the_extra_fields():
    entry = json.loads(JsonFormatter().format(_record(request_id="r1", status=200, color_message="x")))
    assert entry["message"] == "POST /predict 200" and entry["request_id"] == "r1" and entry["status"] == 200
    assert entry["level"] == "info" and entry["logger"] == "timmserve.access" and entry["time"].endswith("Z")
    assert "color_message" not in entry


def test_text_logs_end_with_the_fields_as_key_value():
    line = TextFormatter().format(_record(request_id="r1", duration_ms=1.5))
    assert line.endswith("timmserve.access: POST /predict 200 request_id=r1 duration_ms=1.5")


def test_an_answer_given_before_the_body_was_read_closes_the_connection():
    async def reads_the_body(request):
        return PlainTextResponse(str(len(await request.body())))

    async def answers_at_once(request):
        return PlainTextResponse("refused", status_code=413)

    app = Starlette(
        routes=[Route("/read", reads_the_body, methods=["POST"]), Route("/refuse", answers_at_once, methods=["POST"])]
    )
    app.add_middleware(CloseUnreadBody)
    client = TestClient(app)
    assert client.post("/refuse", content=b"x" * 10).headers["connection"] == "close"
    assert client.post("/refuse", content=iter([b"x"] * 3)).headers["connection"] == "close"  # chunked
    read = client.post("/read", content=b"x" * 10)
    assert read.text == "10" and "connection" not in read.headers
    assert "connection" not in client.post("/refuse").headers  # no body: nothing left unread
