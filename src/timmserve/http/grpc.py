"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, as Triton and KServe
serve it), for tritonclient.grpc and any client of that service definition.

Served beside the HTTP port when `--grpc-port` is set, by each API server process (they share the
port through SO_REUSEPORT, gRPC's default on Linux, and the kernel spreads connections over them).
It is the same data plane as REST: `routes.InferenceService` (its classify: admission, deadline,
batching; its limits; its readiness), the same request checks (oip.py: one BYTES input `image` of
shape [n], n at most --max-queue, checked before any element is read), a message at most
--max-body-bytes, the request id from the request's `id` (else a new one), the API key from the
call's metadata (`x-api-key`, or `authorization: Bearer`; the liveness and readiness RPCs are open,
as the HTTP probes are), each RPC counted in /metrics (endpoint: the RPC's full name; status: the
gRPC code's name) and logged, and the drain (on SIGTERM, once the HTTP drain is over, no new RPC
is taken and those in flight get the grace period).

Images come as Triton's BYTES encoding in `raw_input_contents` (4-byte little-endian lengths) or
as `contents.bytes_contents`; outputs `label` (BYTES) and `probability` (FP32), shape [n, k], go
back as `raw_output_contents`, which tritonclient's `as_numpy` reads.

Errors map once, here (`status_code`): a RequestError's HTTP status becomes its gRPC code (400 and
415 INVALID_ARGUMENT, 401 UNAUTHENTICATED, 404 NOT_FOUND, 408 and 504 DEADLINE_EXCEEDED, 413
RESOURCE_EXHAUSTED, 499 CANCELLED, 503 UNAVAILABLE) with its detail as the message; INTERNAL is a
bug. RPCs timmserve does not serve (model config, statistics, shared memory, …) answer UNIMPLEMENTED.

The message classes are tritonclient's own (`tritonclient.grpc.service_pb2`): generated with
protobuf 6.33, they import under protobuf 7's runtime, which accepts older generated code; the
`[grpc]` extra of tritonclient pins protobuf < 7 and cannot share an environment with ray[serve].
grpc is imported only in the API server processes (after LitServe forks them).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from timmserve import __version__
from timmserve.errors import InternalError, InvalidRequestError, RequestError, UnauthorizedError
from timmserve.http import metrics, oip
from timmserve.http.payload import check_top_k
from timmserve.http.routes import InferenceService, check_model
from timmserve.model.types import ImageRequest

logger = logging.getLogger(__name__)
access_log = logging.getLogger("timmserve.access")

SERVICE = "inference.GRPCInferenceService"
# HTTP status of a RequestError → the gRPC code that means the same (the gRPC status codes' own
# guidance; Triton answers the same conditions so).
STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(error: RequestError) -> grpc.StatusCode:
    """The gRPC code for a RequestError (INTERNAL for a 500 or any status not mapped: a bug)."""
    return STATUS_CODES.get(error.status_code, grpc.StatusCode.INTERNAL)


@dataclass
class GrpcCall:
    """One RPC as the engines' classify sees a request (routes.Call)."""

    request_id: str
    context: grpc.aio.ServicerContext

    async def disconnected(self) -> None:
        """Returns when the RPC ends before its answer: the client cancelled, or its deadline passed."""
        loop = asyncio.get_running_loop()
        ended = loop.create_future()
        self.context.add_done_callback(lambda _: loop.call_soon_threadsafe(_set_once, ended))
        await ended


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


Handler = Callable[["InferenceServicer", Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _rpc(*, open_to_all: bool = False) -> Callable[[Handler], Handler]:
    """An RPC's one error path, its API key check (unless `open_to_all`), its metrics and access log."""

    def wrap(method: Handler) -> Handler:
        endpoint = f"/{SERVICE}/{method.__name__}"

        @functools.wraps(method)
        async def handler(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if not open_to_all:
                    self.authorize(context)
                return await method(self, request, context)
            except RequestError as error:
                code = status_code(error)
                await context.abort(code, error.detail)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:  # a bug: logged with its traceback, answered INTERNAL without it
                logger.exception("%s failed", endpoint)
                code = grpc.StatusCode.INTERNAL
                await context.abort(code, InternalError("a bug in the server; see its log").detail)
            finally:
                elapsed = time.perf_counter() - started
                metrics.count_request(endpoint, code.name, elapsed)
                access_log.info(
                    "gRPC %s %s",
                    method.__name__,
                    code.name,
                    extra={"status": code.name, "duration_ms": round(elapsed * 1000, 2), "client": context.peer()},
                )

        return handler

    return wrap


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The protocol's RPCs over one InferenceService."""

    def __init__(self, service: InferenceService, api_key: str | None) -> None:
        self.service = service
        self.api_key = api_key.encode() if api_key is not None else None

    def authorize(self, context: grpc.aio.ServicerContext) -> None:
        """UnauthorizedError unless the call's metadata carries the key (when one is set)."""
        if self.api_key is None:
            return
        metadata = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        given = metadata.get("x-api-key")
        if given is None and metadata.get("authorization", "").startswith("Bearer "):
            given = metadata["authorization"].removeprefix("Bearer ")
        if given is None or not hmac.compare_digest(given.encode(), self.api_key):
            raise UnauthorizedError("missing or wrong API key: send it as x-api-key or authorization: Bearer metadata")

    @_rpc(open_to_all=True)
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802 (the RPC's name)
        return pb.ServerLiveResponse(live=True)

    @_rpc(open_to_all=True)
    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.service.ready())

    @_rpc()
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerMetadataResponse(name="timmserve", version=__version__, extensions=[])

    @_rpc()
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        _check_model(self.service, request.name, request.version)
        return pb.ModelReadyResponse(ready=self.service.ready())

    @_rpc()
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        _check_model(self.service, request.name, request.version)
        metadata = oip.model_metadata(self.service.model_name, self.service.limits.default_top_k)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=metadata["name"],
            versions=metadata["versions"],
            platform=metadata["platform"],
            inputs=[tensor(**spec) for spec in metadata["inputs"]],
            outputs=[tensor(**spec) for spec in metadata["outputs"]],
        )

    @_rpc()
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        """One inference request: each of its images goes through the batcher on its own."""
        service = self.service
        _check_model(service, request.model_name, request.model_version)
        images = _input_images(request, service.limits.max_images)
        top_k = check_top_k(_int_parameter(request.parameters, "top_k"), service.limits)
        outputs = [oip.check_output(output.name) for output in request.outputs] or list(oip.OUTPUTS)
        call = GrpcCall(request.id or uuid.uuid4().hex, context)
        results = await service.classify([ImageRequest(data, top_k) for data in images], call)
        for index, result in enumerate(results):
            if isinstance(result, RequestError):
                raise result.with_detail(f"image {index}: {result.detail}")
        values = oip.output_values(results)
        response = pb.ModelInferResponse(model_name=service.model_name, model_version=oip.MODEL_VERSION, id=request.id)
        for name in outputs:
            response.outputs.add(name=name, datatype=oip.OUTPUTS[name], shape=[len(results), len(results[0])])
            response.raw_output_contents.append(oip.serialize(values[name]))
        return response


def _check_model(service: InferenceService, name: str, version: str) -> None:
    # An empty version is the protocol's "the server chooses": the one it serves.
    check_model(service, name, version or oip.MODEL_VERSION)


def _input_images(request: Any, max_images: int) -> list[bytes]:
    """The request's encoded images: its one input checked as REST checks it (oip.check_input),
    its elements read from `raw_input_contents` or `contents.bytes_contents`."""
    if len(request.inputs) != 1:
        raise InvalidRequestError(oip.ONE_INPUT)
    tensor = request.inputs[0]
    count = oip.check_input(tensor.name, tensor.datatype, list(tensor.shape), max_images=max_images)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidRequestError("raw_input_contents must hold one entry per input: one here")
        elements = oip.deserialize_bytes(request.raw_input_contents[0], count + 1)
    else:
        elements = list(tensor.contents.bytes_contents[: count + 1])
    if len(elements) != count:
        raise InvalidRequestError(f"input shape {list(tensor.shape)} does not match its {len(elements)} elements")
    return elements


def _int_parameter(parameters: Any, name: str) -> int | None:
    if name not in parameters:
        return None
    parameter = parameters[name]
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidRequestError(f"parameter {name!r} must be an integer")
    return getattr(parameter, kind)


class GrpcServer:
    """The gRPC endpoint of one API server process: `start` in its event loop, `stop` at its end."""

    def __init__(self, service: InferenceService, *, api_key: str | None, host: str, port: int) -> None:
        self.servicer = InferenceServicer(service, api_key)
        self.address = f"{host}:{port}"
        self.max_message_bytes = service.limits.max_body_bytes
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        """Listen and serve (raises RuntimeError when the address cannot be bound)."""
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),  # larger: RESOURCE_EXHAUSTED
                ("grpc.so_reuseport", 1),  # every API server process on the one port
            ]
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        if server.add_insecure_port(self.address) == 0:
            raise RuntimeError(f"cannot listen for gRPC on {self.address}")
        await server.start()
        self._server = server

    async def stop(self, grace: float) -> None:
        """Take no new RPC; those in flight get `grace` seconds, then are cancelled."""
        if self._server is not None:
            await self._server.stop(grace)
