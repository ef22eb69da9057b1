"""The Open Inference Protocol (KServe v2, REST) for an image classifier: request decoding and
response encoding, as plain functions; the endpoints live in api.py.

Model: one input, `image`, BYTES, shape [n] — encoded image files (base64 strings in JSON, as
KServe's examples send them, or raw bytes in the binary tensor extension that Triton's clients
use). Two outputs, each of shape [n, k]: `label` (BYTES) and `probability` (FP32), highest first.
Outputs are JSON `data`, or binary when the request asks for it (`binary_data_output`, or
`binary_data` on a requested output), with the `Inference-Header-Content-Length` header.
Errors are `{"error": "…"}` with a 4xx status, as the protocol specifies.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from timmserve.errors import InvalidRequestError, RequestError
from timmserve.payload import Prediction, decode_base64

INPUT_NAME = "image"
OUTPUTS = {"label": "BYTES", "probability": "FP32"}
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class InferRequest:
    images: list[bytes]
    top_k: int | None
    request_id: str | None
    outputs: dict[str, bool]  # requested output name → binary


def model_metadata(name: str, top_k: int) -> dict[str, Any]:
    return {
        "name": name,
        "versions": ["1"],
        "platform": "pytorch_timm",
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": output, "datatype": kind, "shape": [-1, top_k]} for output, kind in OUTPUTS.items()],
    }


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """An OIP inference request → the encoded images it carries; raises InvalidRequestError."""
    json_size = _json_size(header_length, len(body))
    try:
        document = json.loads(body[:json_size])
    except (ValueError, RecursionError):
        raise InvalidRequestError("the inference request header is not valid JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise InvalidRequestError('an inference request needs an "inputs" list')
    if len(document["inputs"]) != 1 or not isinstance(document["inputs"][0], dict):
        raise InvalidRequestError(f'this model takes exactly one input, "{INPUT_NAME}" (BYTES, shape [n])')
    tensor = document["inputs"][0]
    if tensor.get("datatype") != "BYTES":
        raise InvalidRequestError(f'input "{tensor.get("name")}" must have datatype BYTES (encoded image files)')
    images = _input_elements(tensor, body[json_size:])
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or int(np.prod(shape)) != len(images) or not images:
        raise InvalidRequestError(f"input shape {shape} does not match its {len(images)} elements")
    parameters = document.get("parameters") or {}
    return InferRequest(
        images=images,
        top_k=_top_k(parameters.get("top_k")),
        request_id=document.get("id") if isinstance(document.get("id"), str) else None,
        outputs=_requested_outputs(document.get("outputs"), bool(parameters.get("binary_data_output"))),
    )


def infer_response(
    model_name: str, request: InferRequest, results: list[list[Prediction]]
) -> tuple[bytes, dict[str, str]]:
    """The response body and headers for one result (top-k predictions) per image."""
    k = len(results[0])
    tensors = {
        "label": [p.label.encode() for row in results for p in row],
        "probability": np.asarray([[p.probability for p in row] for row in results], dtype=np.float32),
    }
    header: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": []}
    if request.request_id is not None:
        header["id"] = request.request_id
    blobs = []
    for name, binary in request.outputs.items():
        output: dict[str, Any] = {"name": name, "datatype": OUTPUTS[name], "shape": [len(results), k]}
        if binary:
            blob = _serialize(tensors[name])
            output["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif name == "label":
            output["data"] = [label.decode() for label in tensors["label"]]
        else:
            output["data"] = tensors[name].ravel().tolist()
        header["outputs"].append(output)
    head = json.dumps(header).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def error_body(error: RequestError | str) -> dict[str, str]:
    return {"error": error.detail if isinstance(error, RequestError) else error}


def _json_size(header_length: str | None, body_size: int) -> int:
    if header_length is None:
        return body_size
    if not header_length.isdigit() or int(header_length) > body_size:
        raise InvalidRequestError(f"{HEADER_LENGTH} must be the JSON header's size, at most the body's")
    return int(header_length)


def _input_elements(tensor: dict[str, Any], binary: bytes) -> list[bytes]:
    parameters = tensor.get("parameters") or {}
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not isinstance(size, int) or size != len(binary):
            raise InvalidRequestError("binary_data_size does not match the binary data after the JSON header")
        return _deserialize_bytes(binary)
    data = tensor.get("data")
    if not isinstance(data, list):
        raise InvalidRequestError(f'input "{tensor.get("name")}" has no "data" (base64 strings) and no binary data')
    flat = list(_flatten(data))
    if not all(isinstance(item, str) for item in flat):
        raise InvalidRequestError("BYTES data in JSON must be base64 strings of image files")
    return [decode_base64(item, f'element {index} of input "{INPUT_NAME}"') for index, item in enumerate(flat)]


def _deserialize_bytes(blob: bytes) -> list[bytes]:
    """Triton's BYTES encoding: each element is a 4-byte little-endian length, then the bytes."""
    items, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise InvalidRequestError("truncated BYTES tensor in the binary data")
        (length,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + length > len(blob):
            raise InvalidRequestError("truncated BYTES tensor in the binary data")
        items.append(blob[offset : offset + length])
        offset += length
    return items


def _serialize(tensor: list[bytes] | np.ndarray) -> bytes:
    if isinstance(tensor, np.ndarray):
        return tensor.astype("<f4").tobytes()
    return b"".join(struct.pack("<I", len(item)) + item for item in tensor)


def _requested_outputs(outputs: Any, binary_default: bool) -> dict[str, bool]:
    if outputs is None:
        return dict.fromkeys(OUTPUTS, binary_default)
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InvalidRequestError('"outputs" must be a list of {"name": …}')
    requested = {}
    for output in outputs:
        if output.get("name") not in OUTPUTS:
            raise InvalidRequestError(f"unknown output {output.get('name')!r}; this model has {', '.join(OUTPUTS)}")
        requested[output["name"]] = bool((output.get("parameters") or {}).get("binary_data", binary_default))
    return requested


def _top_k(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequestError(f"parameter top_k must be a positive integer, got {value!r}")
    return value


def _flatten(data: list[Any]):  # noqa: ANN202 - a generator over nested lists
    for item in data:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item
