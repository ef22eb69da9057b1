"""What wraps every HTTP request, as plain ASGI middleware (no per-request task or body buffering):

- RequestContext (outermost): a request id (the client's `X-Request-ID` when it is a sane token,
  else a new one; behind Ray Serve's proxy, the proxy's) on the response and in the access log
  line, the request counter and latency histogram by endpoint and status.
- HeadAsGet: HEAD answered on every GET route, as GET without the body (FastAPI's routes answer
  only the methods they were declared with, so HEAD got 405).
- ResponseHeaders: fixed headers on every response (the random-weights warning).
- ApiKeyAuth: with an API key set, every route but the probes and the static pages answers 401
  without it. The key is compared in constant time.
- CloseUnreadBody (right inside RequestContext): a response that starts before its request's body
  was read to the end closes the connection.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from timmserve.errors import ClientGoneError
from timmserve.http import metrics, oip
from timmserve.http.protocol import announces_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = "X-Request-ID"
API_KEY_HEADER = "X-API-Key"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Load balancers and orchestrators probe these without credentials; the pages carry no data.
OPEN_PATHS = frozenset({"/", "/health", "/v2/health/live", "/v2/health/ready", "/docs", "/openapi.json"})

access_log = logging.getLogger("timmserve.access")


def endpoint_label(path: str, known_paths: frozenset[str]) -> str:
    """The route a path belongs to, for metric labels: few values, whatever clients send."""
    if path in known_paths:
        return path
    if path.startswith("/v2/models/"):
        tail = path.rsplit("/", 1)[-1]
        return "/v2/models/{model}/" + tail if tail in ("infer", "ready") else "/v2/models/{model}"
    return "other"


def request_id_of(scope: Scope) -> str:
    """The id RequestContext gave this request."""
    return scope.get("state", {}).get("request_id", "-")


class RequestContext:
    def __init__(self, app: ASGIApp, known_paths: frozenset[str], *, proxy_sets_id: bool = False) -> None:
        """`proxy_sets_id`: behind Ray Serve's proxy, which gives every request an `X-Request-ID`
        (the client's as sent, else a new one) and returns it on the response itself: that id is
        taken as it is, and none is added (the response would carry two)."""
        self.app = app
        self.known_paths = known_paths
        self.proxy_sets_id = proxy_sets_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = _header(scope, REQUEST_ID_HEADER)
        kept = given and (self.proxy_sets_id or _SANE_REQUEST_ID.fullmatch(given))
        request_id = given if kept else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500  # unless a response starts: an exception escaped the app

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if not self.proxy_sets_id:
                    message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:  # Ray Serve cancels the request of a client that left
            status = ClientGoneError.status_code
            raise
        finally:
            elapsed = time.perf_counter() - started
            endpoint = endpoint_label(scope["path"], self.known_paths)
            metrics.count_request(endpoint, str(status), elapsed)
            access_log.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "request_id": request_id,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "client": (scope.get("client") or ("-",))[0],
                },
            )


class CloseUnreadBody:
    """A response that starts before the application read its request's body to the end (a 413 for
    a body over the limit, a 401, a 415, a 408 for a stalled body) says `Connection: close`, and
    the server closes the connection once it is sent: the unread rest cannot be told apart from a
    next request. Without it uvicorn keeps the connection and reads and discards whatever the client
    goes on sending (found by the hostile-client pass: 16 GB in 20 s after a 413, on one connection)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not announces_body(scope["headers"]):
            await self.app(scope, receive, send)
            return
        body_read = False

        async def receive_noting_the_end() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read = True
            return message

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_read:
                headers = [(name, value) for name, value in message.get("headers", []) if name.lower() != b"connection"]
                message["headers"] = [*headers, (b"connection", b"close")]
            await send(message)

        await self.app(scope, receive_noting_the_end, send_closing)


class HeadAsGet:
    """HEAD is GET without the body (RFC 9110, 9.3.2): the same status and headers, on every route.
    Done here, not by adding HEAD to each route, so the OpenAPI document keeps one operation each."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        # A copy: the server's own scope keeps saying HEAD (uvicorn then writes no body either).
        await self.app({**scope, "method": "GET"}, receive, send_without_body)


class ResponseHeaders:
    """Adds the same headers to every response the wrapped app sends."""

    def __init__(self, app: ASGIApp, headers: dict[str, str]) -> None:
        self.app = app
        self.headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class ApiKeyAuth:
    """Accepts `X-API-Key: KEY` or `Authorization: Bearer KEY`."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        detail = "missing or wrong API key: send it as X-API-Key or Authorization: Bearer"
        body = json.dumps(oip.error_body(detail) if oip.is_oip_path(scope["path"]) else {"detail": detail})
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})

    def _authorized(self, scope: Scope) -> bool:
        given = _header(scope, API_KEY_HEADER)
        if given is None:
            authorization = _header(scope, "Authorization") or ""
            scheme, _, token = authorization.partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else None
        return given is not None and hmac.compare_digest(given.encode(), self.api_key)


def _header(scope: Scope, name: str) -> str | None:
    wanted = name.lower().encode()
    for key, value in scope.get("headers", []):
        if key.lower() == wanted:
            return value.decode("latin-1")
    return None
