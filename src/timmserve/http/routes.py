"""The HTTP layer of both engines: the inference endpoints, the one error path, the middlewares.

A request's path, top to bottom:

    POST /predict                         POST /v2/models/{name}/infer
    payload.parse_predict_request         oip.parse_infer_request (+ top_k checked)
                 └──── service.classify(images, HttpCall(request)) ────┘
                       an engine's data plane: the workers (engines/litserve/frontend.py),
                       Ray's batcher (engines/ray.py); one result per image:
                       list[Prediction] | RequestError
    predictions_body (JSON)               oip.infer_response (JSON or binary)

Answers are encoded once, here. Every RequestError, raised anywhere below a handler, and every
HTTP error of the framework's (404 no such route, 405 wrong method) becomes its response in one
registered exception handler (KServe's pattern): `{"detail": …}` on timmserve's own routes,
`{"error": …}` under `/v2` as the Open Inference Protocol specifies (tritonclient reads only that
key), with the error's status and headers. The engines differ only in the data plane and their
health checks. The same data plane serves gRPC (grpc.py): a `Call` is one request, whatever
its transport.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Protocol

from fastapi import FastAPI
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from timmserve import __version__
from timmserve.errors import InternalError, RequestError, UnknownModelError
from timmserve.http import oip, openapi
from timmserve.http.middleware import (
    ApiKeyAuth,
    CloseUnreadBody,
    HeadAsGet,
    RequestContext,
    ResponseHeaders,
    request_id_of,
)
from timmserve.http.payload import PayloadLimits, check_top_k, parse_predict_request, predictions_body, read_body
from timmserve.model.classifier import Result
from timmserve.model.types import ImageRequest

logger = logging.getLogger(__name__)

PREDICT_PATH = "/predict"
METRICS_PATH = "/metrics"
RANDOM_WEIGHTS_HEADER = "X-Timmserve-Random-Weights"


class Call(Protocol):
    """One inbound request as an engine's data plane sees it, whatever its transport."""

    request_id: str

    async def disconnected(self) -> None:
        """Returns when the client has gone before its answer."""


@dataclass
class HttpCall:
    """An HTTP request as a Call: its id (middleware.RequestContext's) and its disconnect."""

    request: Request

    @property
    def request_id(self) -> str:
        return request_id_of(self.request.scope)

    async def disconnected(self) -> None:
        # Once the body is read, the server's next message for this request is `http.disconnect`
        # (as Starlette's StreamingResponse listens for it).
        while (await self.request.receive())["type"] != "http.disconnect":
            pass


# An engine's data plane: classify these images for this call; one result per image, in order.
# Raises a RequestError for the request as a whole (503 overloaded, 504 timed out, …).
Classify = Callable[[Sequence[ImageRequest], Call], Awaitable[list[Result]]]


@dataclass(frozen=True)
class InferenceService:
    """What the endpoints need from an engine."""

    model_name: str  # the name in /v2 URLs
    limits: PayloadLimits
    classify: Classify
    ready: Callable[[], bool]  # every worker or replica can take requests
    # Prometheus text and its content type for `GET /metrics`; None: the engine has no /metrics.
    metrics: Callable[[], tuple[bytes, str]] | None = None


def add_inference_routes(app: FastAPI, service: InferenceService) -> None:
    """`POST /predict`, `GET /metrics` and the Open Inference Protocol endpoints under `/v2`.
    (On the app itself, not an APIRouter: FastAPI keeps an included router's routes out of
    `app.routes`, where the metrics' endpoint labels and the OpenAPI document look for them.)"""

    @app.post(PREDICT_PATH)
    async def predict(request: Request) -> JSONResponse:
        image = await parse_predict_request(request, service.limits)
        [result] = await service.classify([image], HttpCall(request))
        if isinstance(result, RequestError):
            raise result
        return JSONResponse(predictions_body(result))

    if service.metrics is not None:
        render_metrics = service.metrics

        @app.get(METRICS_PATH)
        async def metrics() -> Response:
            body, content_type = render_metrics()
            return Response(body, media_type=content_type)

    @app.get("/v2")
    async def v2_server_metadata() -> JSONResponse:
        return JSONResponse({"name": "timmserve", "version": __version__, "extensions": ["binary_tensor_data"]})

    @app.get("/v2/health/live")
    async def v2_live() -> JSONResponse:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def v2_ready() -> JSONResponse:
        ready = service.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def v2_model_metadata(model_name: str, request: Request) -> JSONResponse:
        _check_model(request, service)
        return JSONResponse(oip.model_metadata(service.model_name, service.limits.default_top_k))

    async def v2_model_ready(model_name: str, request: Request) -> JSONResponse:
        _check_model(request, service)
        ready = service.ready()
        return JSONResponse({"name": model_name, "ready": ready}, status_code=200 if ready else 503)

    async def v2_infer(model_name: str, request: Request) -> Response:
        """One OIP inference request: each of its images goes through the batcher on its own."""
        _check_model(request, service)
        body = await read_body(request, service.limits)
        infer_request = oip.parse_infer_request(
            body, request.headers.get(oip.HEADER_LENGTH), max_images=service.limits.max_images
        )
        top_k = check_top_k(infer_request.top_k, service.limits)
        images = [ImageRequest(data, top_k) for data in infer_request.images]
        results = await service.classify(images, HttpCall(request))
        for index, result in enumerate(results):
            if isinstance(result, RequestError):
                raise result.with_detail(f"image {index}: {result.detail}")
        content, headers = oip.infer_response(service.model_name, infer_request, results)
        return Response(content, headers=headers)

    # Each model endpoint, also under the model's version (tritonclient's `model_version="1"`).
    for model_path in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
        app.add_api_route(model_path, v2_model_metadata, methods=["GET"])
        app.add_api_route(f"{model_path}/ready", v2_model_ready, methods=["GET"])
        app.add_api_route(f"{model_path}/infer", v2_infer, methods=["POST"])


def _check_model(request: Request, service: InferenceService) -> None:
    """404 unless the model a `/v2/models/…` path names, and its version where it names one, are served here."""
    check_model(service, request.path_params["model_name"], request.path_params.get("model_version", oip.MODEL_VERSION))


def check_model(service: InferenceService, model_name: str, version: str) -> None:
    """UnknownModelError (404) unless this model and version are served here."""
    if model_name != service.model_name:
        raise UnknownModelError(f"unknown model {model_name!r}; this server has {service.model_name!r}")
    if version != oip.MODEL_VERSION:
        raise UnknownModelError(
            f"unknown version {version!r} of model {model_name!r}; this server has version {oip.MODEL_VERSION!r}"
        )


async def error_response(request: Request, error: Exception) -> Response:
    """The one place an error becomes a response (registered on the app for RequestError and for the
    framework's HTTPException: no such route, wrong method)."""
    if isinstance(error, HTTPException):
        if not oip.is_oip_path(request.url.path):
            return await http_exception_handler(request, error)  # FastAPI's own: {"detail": …}
        # Its detail is the status's phrase alone ("Not Found"): say what was asked, and what is allowed.
        allowed = (error.headers or {}).get("Allow")
        detail = f"{error.detail}: {request.method} {request.url.path}" + (f" (allowed: {allowed})" if allowed else "")
        return JSONResponse(oip.error_body(detail), status_code=error.status_code, headers=error.headers)
    assert isinstance(error, RequestError)
    if isinstance(error, InternalError):
        logger.error("answered 500: %s", error.detail, extra={"request_id": request_id_of(request.scope)})
    body = oip.error_body(error) if oip.is_oip_path(request.url.path) else {"detail": error.detail}
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


def add_demo_page(app: FastAPI) -> None:
    """The browser page at `/`, in place of whatever the engine put there (LitServe's plain-text index)."""
    page = (files("timmserve.http") / "static" / "index.html").read_text(encoding="utf-8")

    async def demo_page() -> HTMLResponse:
        return HTMLResponse(page)

    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/"]
    app.add_api_route("/", demo_page, methods=["GET"], include_in_schema=False)


def install(
    app: FastAPI,
    service: InferenceService,
    *,
    api_key: str | None,
    random_weights: bool,
    proxy_sets_request_id: bool = False,
) -> None:
    """Give an engine's FastAPI app timmserve's HTTP contract: the inference endpoints, the demo
    page, the OpenAPI document, the error path, and the middlewares (request id + access log +
    HTTP metrics outermost, then the connection closed after a body left unread, then HEAD answered
    as GET without its body, then the random-weights header on every response, then the API key).
    `proxy_sets_request_id`: the app runs behind Ray Serve's proxy, which sets `X-Request-ID`
    itself (see RequestContext). Call after the engine added its own routes."""
    add_inference_routes(app, service)
    add_demo_page(app)
    openapi.document(app)
    app.add_exception_handler(RequestError, error_response)
    app.add_exception_handler(HTTPException, error_response)
    if api_key is not None:
        app.add_middleware(ApiKeyAuth, api_key=api_key)
    if random_weights:  # random weights serve meaningless answers: every response says so, 401s too
        app.add_middleware(ResponseHeaders, headers={RANDOM_WEIGHTS_HEADER: "true; throughput studies only"})
    app.add_middleware(HeadAsGet)  # every GET route: timmserve's, and LitServe's /health and /info
    known_paths = frozenset(route.path for route in app.routes if "{" not in getattr(route, "path", "{"))
    app.add_middleware(CloseUnreadBody)
    # Outermost: added last.
    app.add_middleware(RequestContext, known_paths=known_paths, proxy_sets_id=proxy_sets_request_id)
