"""OpenAPI documentation for the routes LitServe registers without schemas (`/docs`, `/openapi.json`).

The endpoints read their bodies themselves (three body forms, the OIP binary extension), so their
request bodies, parameters and every response, errors included, are described here and attached
to the registered routes.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

CAT_JPEG_BASE64 = "/9j/4AAQSkZJRgABAQAAAQABAAD…"  # shortened in examples

_DETAIL = {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
_OIP_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_PREDICTIONS = {
    "type": "object",
    "properties": {
        "predictions": {
            "type": "array",
            "description": "top-k classes, highest probability first",
            "items": {
                "type": "object",
                "properties": {"label": {"type": "string"}, "probability": {"type": "number"}},
                "required": ["label", "probability"],
            },
        }
    },
    "required": ["predictions"],
}
_BINARY = {"type": "string", "format": "binary"}


def _error(description: str, example: str, schema: dict[str, Any] = _DETAIL, key: str = "detail") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema, "example": {key: example}}}}


PREDICT = {
    "summary": "Classify one image",
    "description": "The image file as JSON base64 (the body existing LitServe clients send), as the raw body "
    "(`image/*` or `application/octet-stream`), or as a multipart file field `image`.",
    "openapi_extra": {
        "parameters": [
            {
                "name": "top_k",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1},
                "description": "classes to return (raw and multipart bodies; JSON bodies may carry it too)",
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {
                            "image": {"type": "string", "format": "byte", "description": "base64 of an image file"},
                            "top_k": {"type": "integer", "minimum": 1},
                        },
                    },
                    "example": {"image": CAT_JPEG_BASE64, "top_k": 3},
                },
                "image/*": {"schema": _BINARY},
                "application/octet-stream": {"schema": _BINARY},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": _BINARY, "top_k": {"type": "integer", "minimum": 1}},
                    }
                },
            },
        },
    },
    "responses": {
        200: {
            "description": "top-k predictions",
            "content": {
                "application/json": {
                    "schema": _PREDICTIONS,
                    "example": {
                        "predictions": [
                            {"label": "Egyptian cat", "probability": 0.386},
                            {"label": "tiger cat", "probability": 0.363},
                            {"label": "tabby, tabby cat", "probability": 0.176},
                        ]
                    },
                }
            },
        },
        400: _error(
            "malformed body, invalid base64, undecodable or truncated image, bad top_k",
            "the JPEG data is corrupt or truncated (image file is truncated)",
        ),  # fmt: skip
        413: _error(
            "body over --max-body-bytes, or image over --max-image-pixels",
            "the image is 10000x10000 = 100,000,000 pixels; the limit is 67,108,864",
        ),  # fmt: skip
        415: _error(
            "content type or image format not accepted",
            "content type 'text/plain' is not accepted; send application/json, image/*, "
            "application/octet-stream or multipart/form-data",
        ),  # fmt: skip
        401: _error(
            "an API key is required (--api-key-env) and was missing or wrong",
            "missing or wrong API key: send it as X-API-Key or Authorization: Bearer",
        ),
        503: _error(
            "the queue is at --max-queue, or the worker holding the image died; retry after Retry-After seconds",
            "the server is at its limit of 128 queued images; retry later",
        ),
        504: _error("no answer within --timeout", "no answer within the server's request timeout of 30 s"),
    },
}

INFER = {
    "summary": "Open Inference Protocol (KServe v2) inference",
    "description": "One BYTES input `image` of shape [n]: base64 strings in JSON, or raw bytes with the binary "
    "tensor extension (`Inference-Header-Content-Length`). Outputs `label` (BYTES) and `probability` (FP32), "
    "shape [n, k]. Optional request parameter `top_k`.",
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["inputs"],
                        "properties": {
                            "id": {"type": "string"},
                            "parameters": {"type": "object"},
                            "inputs": {"type": "array", "items": {"type": "object"}},
                            "outputs": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                    "example": {
                        "id": "1",
                        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [CAT_JPEG_BASE64]}],
                    },
                },
                "application/octet-stream": {"schema": _BINARY},
            },
        }
    },
    "responses": {
        200: {
            "description": "outputs label and probability",
            "content": {
                "application/json": {
                    "example": {
                        "model_name": "tf_efficientnet_lite0",
                        "model_version": "1",
                        "id": "1",
                        "outputs": [
                            {
                                "name": "label",
                                "datatype": "BYTES",
                                "shape": [1, 2],
                                "data": ["Egyptian cat", "tiger cat"],
                            },
                            {"name": "probability", "datatype": "FP32", "shape": [1, 2], "data": [0.386, 0.363]},
                        ],
                    }
                }
            },
        },
        400: _error(
            "malformed inference request or a bad image", "image 0: the bytes are not an image", _OIP_ERROR, "error"
        ),
        404: _error(
            "no such model", "unknown model 'resnet50'; this server has 'tf_efficientnet_lite0'", _OIP_ERROR, "error"
        ),  # fmt: skip
        413: _error(
            "body over --max-body-bytes", "the body is over the limit of 20,971,520 bytes", _OIP_ERROR, "error"
        ),
        503: _error(
            "the queue is at --max-queue",
            "the server is at its limit of 128 queued images; retry later",
            _OIP_ERROR,
            "error",
        ),
    },
}

_SIMPLE = {
    "/health": (
        "Ready to serve",
        {200: {"description": "every worker loaded the model and warmed up"}, 503: {"description": "not ready yet"}},
    ),  # fmt: skip
    "/info": ("Model and configuration", {200: {"description": "model name, weights, classes, data config, settings"}}),
    "/metrics": ("Prometheus metrics, over all processes", {200: {"description": "text exposition format"}}),
    "/v2": ("OIP server metadata", {200: {"description": "name, version, extensions"}}),
    "/v2/health/live": ("OIP liveness", {200: {"description": "the server answers"}}),
    "/v2/health/ready": ("OIP readiness", {200: {"description": "ready"}, 503: {"description": "not ready yet"}}),
    "/v2/models/{model_name}": (
        "OIP model metadata",
        {
            200: {"description": "inputs and outputs"},
            404: _error("no such model", "unknown model", _OIP_ERROR, "error"),
        },
    ),  # fmt: skip
    "/v2/models/{model_name}/ready": (
        "OIP model readiness",
        {200: {"description": "ready"}, 404: _error("no such model", "unknown model", _OIP_ERROR, "error")},
    ),  # fmt: skip
}


def document(app: FastAPI) -> None:
    """Attach summaries, request bodies and responses to the registered routes (a model endpoint's
    versioned twin, `/v2/models/{model_name}/versions/{model_version}/…`, gets the endpoint's)."""
    for route in app.router.routes:
        if not isinstance(route, APIRoute):
            continue
        path = route.path.replace("/versions/{model_version}", "")
        if path == "/predict":
            _apply(route, PREDICT)
        elif path == "/v2/models/{model_name}/infer":
            _apply(route, INFER)
        elif path in _SIMPLE:
            summary, responses = _SIMPLE[path]
            _apply(route, {"summary": summary, "responses": responses})
    app.openapi_schema = None  # regenerate on the next request


def _apply(route: APIRoute, spec: dict[str, Any]) -> None:
    route.summary = spec.get("summary", route.summary)
    route.description = spec.get("description", route.description)
    route.responses = {**route.responses, **spec.get("responses", {})}
    route.openapi_extra = spec.get("openapi_extra", route.openapi_extra)
