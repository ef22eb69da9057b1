"""The Open Inference Protocol (KServe v2, REST) for an image classifier: request decoding and
response encoding, as plain functions; the endpoints live in routes.py, and grpc.py serves the same
checks (`check_input`, `check_output`) and tensors (`output_values`, `serialize`) over gRPC.

Model: one input, `image`, BYTES, shape [n] — encoded image files (base64 strings in JSON, as
KServe's examples send them, or raw bytes in the binary tensor extension that Triton's clients
use). Two outputs, each of shape [n, k]: `label` (BYTES) and `probability` (FP32), highest first.
Outputs are JSON `data`, or binary when the request asks for it (`binary_data_output`, or
`binary_data` on a requested output), with the `Inference-Header-Content-Length` header.
Errors are `{"error": "…"}` with a 4xx status, as the protocol specifies.

The request's JSON header is described by a schema (`InferRequestHeader`, pydantic, following the
protocol's own `$inference_request` definition): every field is checked by type before it is used,
and a request that does not fit is one 400 naming the field.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from timmserve.errors import InvalidRequestError, PayloadTooLargeError, RequestError
from timmserve.http.payload import decimal_int, decode_base64
from timmserve.model.types import Prediction

INPUT_NAME = "image"
# A server serves its one model as loaded: one version, in the metadata, responses and versioned URLs.
MODEL_VERSION = "1"
OUTPUTS = {"label": "BYTES", "probability": "FP32"}
HEADER_LENGTH = "Inference-Header-Content-Length"
ONE_INPUT = f'this model takes exactly one input, "{INPUT_NAME}" (BYTES, shape [n])'


@dataclass(frozen=True)
class InferRequest:
    images: list[bytes]
    top_k: int | None
    request_id: str | None
    outputs: dict[str, bool]  # requested output name → binary


def model_metadata(name: str, top_k: int) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": "pytorch_timm",
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": output, "datatype": kind, "shape": [-1, top_k]} for output, kind in OUTPUTS.items()],
    }


class _Parameters(BaseModel):
    """A `parameters` object: any names (the protocol's extensions), each value checked where used."""

    model_config = ConfigDict(extra="allow")


class RequestParameters(_Parameters):
    top_k: Annotated[StrictInt, Field(ge=1)] | None = None
    binary_data_output: StrictBool = False


class InputParameters(_Parameters):
    binary_data_size: Annotated[StrictInt, Field(ge=0)] | None = None


class OutputParameters(_Parameters):
    binary_data: StrictBool | None = None


class InputTensor(BaseModel):
    name: StrictStr
    shape: list[Annotated[StrictInt, Field(ge=0)]] = Field(min_length=1)
    datatype: StrictStr
    parameters: InputParameters = InputParameters()
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    name: StrictStr
    parameters: OutputParameters = OutputParameters()


class InferRequestHeader(BaseModel):
    """The JSON part of an inference request (the protocol's `$inference_request`)."""

    id: StrictStr | None = None
    parameters: RequestParameters = RequestParameters()
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None


def parse_infer_request(body: bytes, header_length: str | None, *, max_images: int) -> InferRequest:
    """An OIP inference request → the encoded images it carries. Raises InvalidRequestError (400)
    naming the field for anything that does not fit the protocol or this model, and
    PayloadTooLargeError (413) when its shape holds more than `max_images` images. The shape is
    checked against the limit, then against the elements' count, before any element is decoded:
    a 20 MB body holds millions of empty elements (decoding them all blocked the API server 16 s)."""
    json_size = _json_size(header_length, len(body))
    try:
        header = InferRequestHeader.model_validate_json(body[:json_size])
    except ValidationError as exc:
        raise InvalidRequestError(_first_problem(exc)) from None
    if len(header.inputs) != 1:
        raise InvalidRequestError(ONE_INPUT)
    tensor = header.inputs[0]
    count = check_input(tensor.name, tensor.datatype, tensor.shape, max_images=max_images)
    return InferRequest(
        images=_input_elements(tensor, body[json_size:], count),
        top_k=header.parameters.top_k,
        request_id=header.id,
        outputs=_requested_outputs(header.outputs, header.parameters.binary_data_output),
    )


def check_input(name: str, datatype: str, shape: list[int], *, max_images: int) -> int:
    """The number of images an input of this name, datatype and shape holds, checked as every
    transport checks it: InvalidRequestError (400) for another name or datatype, or no image;
    PayloadTooLargeError (413) for more than `max_images` (in Python's ints: a client's 2**64 does
    not overflow)."""
    if name != INPUT_NAME:
        raise InvalidRequestError(f'this model\'s input is "{INPUT_NAME}", not {name!r:.60}')
    if datatype != "BYTES":
        raise InvalidRequestError(f'input "{name}" must have datatype BYTES (encoded image files)')
    if any(dimension < 0 for dimension in shape):  # gRPC's shape is any int64: [-2, -3] holds "6"
        raise InvalidRequestError(f"input shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    if count > max_images:
        raise PayloadTooLargeError.too_many_images(count, max_images)
    if count == 0:
        raise InvalidRequestError(f"input shape {list(shape)} holds no image")
    return count


def _first_problem(error: ValidationError) -> str:
    """pydantic's first error as one line naming the field: `inputs[0].shape[0]: …`."""
    problem = error.errors()[0]
    if problem["type"] == "json_invalid":
        return "the inference request header is not valid JSON"
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in problem["loc"]).lstrip(".")
    return f"{where or 'the request'}: {problem['msg']}" + (f" (got {problem['input']!r:.60})" if where else "")


def infer_response(
    model_name: str, request: InferRequest, results: list[list[Prediction]]
) -> tuple[bytes, dict[str, str]]:
    """The response body and headers for one result (top-k predictions) per image."""
    k = len(results[0])
    tensors = output_values(results)
    header: dict[str, Any] = {"model_name": model_name, "model_version": MODEL_VERSION, "outputs": []}
    if request.request_id is not None:
        header["id"] = request.request_id
    blobs = []
    for name, binary in request.outputs.items():
        output: dict[str, Any] = {"name": name, "datatype": OUTPUTS[name], "shape": [len(results), k]}
        if binary:
            blob = serialize(tensors[name])
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


def output_values(results: list[list[Prediction]]) -> dict[str, list[bytes] | np.ndarray]:
    """The outputs' elements for one result (top-k predictions) per image, row-major [n, k]:
    `label` as UTF-8 bytes, `probability` as float32."""
    return {
        "label": [p.label.encode() for row in results for p in row],
        "probability": np.asarray([[p.probability for p in row] for row in results], dtype=np.float32),
    }


def check_output(name: str) -> str:
    """A requested output's name, or InvalidRequestError naming the outputs there are."""
    if name not in OUTPUTS:
        raise InvalidRequestError(f"unknown output {name!r}; this model has {', '.join(OUTPUTS)}")
    return name


def error_body(error: RequestError | str) -> dict[str, str]:
    return {"error": error.detail if isinstance(error, RequestError) else error}


def is_oip_path(path: str) -> bool:
    """Whether a request path is the protocol's (`/v2…`), whose every non-200 is `{"error": …}`."""
    return path == "/v2" or path.startswith("/v2/")


def _json_size(header_length: str | None, body_size: int) -> int:
    if header_length is None:
        return body_size
    size = decimal_int(header_length)
    if size is None or size > body_size:
        raise InvalidRequestError(f"{HEADER_LENGTH} must be the JSON header's size, at most the body's")
    return size


def _input_elements(tensor: InputTensor, binary: bytes, count: int) -> list[bytes]:
    """The input's `count` elements, from the binary data or the JSON `data`; InvalidRequestError
    when there are not exactly `count` (found before decoding any)."""
    size = tensor.parameters.binary_data_size
    if size is not None:
        if size != len(binary):
            raise InvalidRequestError("binary_data_size does not match the binary data after the JSON header")
        elements = deserialize_bytes(binary, count + 1)
        if len(elements) != count:
            raise InvalidRequestError(f"input shape {tensor.shape} does not match its binary data's elements")
        return elements
    if tensor.data is None:
        raise InvalidRequestError(f'input "{tensor.name}" has no "data" (base64 strings) and no binary data')
    flat = _row_major(tensor.data, tensor.shape, count)
    if not all(isinstance(item, str) for item in flat):
        raise InvalidRequestError("BYTES data in JSON must be base64 strings of image files")
    return [decode_base64(item, f'element {index} of input "{INPUT_NAME}"') for index, item in enumerate(flat)]


def deserialize_bytes(blob: bytes, at_most: int) -> list[bytes]:
    """Triton's BYTES encoding: each element is a 4-byte little-endian length, then the bytes.
    Reads `at_most` elements."""
    items, offset = [], 0
    while offset < len(blob) and len(items) < at_most:
        if offset + 4 > len(blob):
            raise InvalidRequestError("truncated BYTES tensor in the binary data")
        (length,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + length > len(blob):
            raise InvalidRequestError("truncated BYTES tensor in the binary data")
        items.append(blob[offset : offset + length])
        offset += length
    return items


def serialize(tensor: list[bytes] | np.ndarray) -> bytes:
    """A tensor in the binary form both transports carry: FP32 little-endian, BYTES as
    `deserialize_bytes` reads them."""
    if isinstance(tensor, np.ndarray):
        return tensor.astype("<f4").tobytes()
    return b"".join(struct.pack("<I", len(item)) + item for item in tensor)


def _requested_outputs(outputs: list[RequestedOutput] | None, binary_default: bool) -> dict[str, bool]:
    if outputs is None:
        return dict.fromkeys(OUTPUTS, binary_default)
    requested = {}
    for output in outputs:
        binary = output.parameters.binary_data
        requested[check_output(output.name)] = binary_default if binary is None else binary
    return requested


def _row_major(data: list[Any], shape: list[int], count: int) -> list[Any]:
    """The JSON `data`'s `count` elements in row-major order: `data` flat, or nested exactly as the
    shape says (the protocol allows either). InvalidRequestError otherwise, found level by level at
    the first list of the wrong length, so a client's millions of nested lists are not walked."""
    if len(data) == count and not any(isinstance(item, list) for item in data):
        return data
    level: list[Any] = [data]
    for size in shape:
        if not all(isinstance(items, list) and len(items) == size for items in level):
            raise InvalidRequestError(f"input shape {shape} does not match its data's nesting")
        level = [item for items in level for item in items]
    return level
