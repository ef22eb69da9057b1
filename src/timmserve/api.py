"""The LitServe adapter: a LitAPI for the inference workers and a LitSpec for the HTTP endpoint.

Why a LitSpec: LitServe's stock /predict handler parses every non-form body as JSON (a raw image
body becomes a 500) and its batched loop fails the whole batch when one item raises (upstream
#340). The spec owns `POST /predict`: it parses the three body forms in the API process and
submits only the image bytes to the workers' queue. In the worker, the LitAPI hands each batch to
`Classifier.classify`, whose per-request failures come back as RequestError *values*; the spec
turns those into that request's own 4xx while the rest of the batch gets its 200s.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from fastapi import HTTPException
from litserve.server import RegularRequestHandler
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem, WorkerSetupStatus
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from timmserve import __version__, oip
from timmserve.classifier import Classifier, Result, build_classifier
from timmserve.config import ServeConfig
from timmserve.errors import OverloadedError, RequestError
from timmserve.model import ModelInfo
from timmserve.payload import ImageRequest, PayloadLimits, Prediction, check_top_k, parse_predict_request, read_body

logger = logging.getLogger(__name__)

PREDICT_PATH = "/predict"
RANDOM_WEIGHTS_HEADER = "X-Timmserve-Random-Weights"


class ClassifierSpec(LitSpec):
    """timmserve's inference endpoints, in the API server process: parse, queue, await, answer.
    `POST /predict` (three body forms) and the Open Inference Protocol under `/v2` share one queue,
    so both go through the same dynamic batcher."""

    def __init__(self, limits: PayloadLimits, *, model_name: str, random_weights: bool, queue_limit: int) -> None:
        super().__init__()
        self.api_path = PREDICT_PATH
        self.limits = limits
        self.model_name = model_name
        self.queue_limit = queue_limit
        # Shared by the forked API-server processes; created before the fork, in the main process.
        self._in_flight = multiprocessing.Value("i", 0)
        # Random weights serve meaningless answers: every response says so.
        self.headers = {RANDOM_WEIGHTS_HEADER: "true; throughput studies only"} if random_weights else {}
        self.add_endpoint(PREDICT_PATH, self.predict_endpoint, ["POST"])
        self.add_endpoint("/v2", self.v2_server_metadata, ["GET"])
        self.add_endpoint("/v2/health/live", self.v2_live, ["GET"])
        self.add_endpoint("/v2/health/ready", self.v2_ready, ["GET"])
        self.add_endpoint("/v2/models/{model_name}", self.v2_model_metadata, ["GET"])
        self.add_endpoint("/v2/models/{model_name}/ready", self.v2_model_ready, ["GET"])
        self.add_endpoint("/v2/models/{model_name}/infer", self.v2_infer, ["POST"])

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_in_flight"] = None  # inference workers do not admit requests
        return state

    async def predict_endpoint(self, request: Request) -> JSONResponse:
        try:
            image_request = await parse_predict_request(request, self.limits)
            [(response, status)] = await self._classify([image_request])
        except RequestError as error:
            return self.error_response(error)
        if status == LitAPIStatus.ERROR:
            # Queue timeouts (504) and worker failures, in LitServe's own encoding.
            RegularRequestHandler._handle_error_response(response)
        if isinstance(response, RequestError):
            return self.error_response(response)
        return JSONResponse(response, headers=self.headers)

    def error_response(self, error: RequestError) -> JSONResponse:
        headers = {**self.headers, **error.headers}
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=headers)

    async def _classify(self, requests: list[ImageRequest]) -> list[tuple[Any, LitAPIStatus]]:
        """Queue the images and await their answers, within the queue limit over all API servers;
        raises OverloadedError (503) at once when the images would not fit."""
        count = len(requests)
        with self._in_flight.get_lock():
            if self._in_flight.value + count > self.queue_limit:
                raise OverloadedError(
                    f"the server is at its limit of {self.queue_limit} queued images; retry later", retry_after=1
                )
            self._in_flight.value += count
        try:
            return await asyncio.gather(*(self._submit(request) for request in requests))
        finally:
            with self._in_flight.get_lock():
                self._in_flight.value -= count

    async def v2_server_metadata(self) -> JSONResponse:
        return JSONResponse({"name": "timmserve", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def v2_live(self) -> JSONResponse:
        return JSONResponse({"live": True})

    async def v2_ready(self) -> JSONResponse:
        ready = self._workers_ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def v2_model_metadata(self, model_name: str) -> JSONResponse:
        if model_name != self.model_name:
            return self._unknown_model(model_name)
        return JSONResponse(oip.model_metadata(self.model_name, self.limits.default_top_k))

    async def v2_model_ready(self, model_name: str) -> JSONResponse:
        if model_name != self.model_name:
            return self._unknown_model(model_name)
        ready = self._workers_ready()
        return JSONResponse({"name": model_name, "ready": ready}, status_code=200 if ready else 503)

    async def v2_infer(self, model_name: str, request: Request) -> Response:
        """One OIP inference request: each of its images goes through the batcher on its own."""
        if model_name != self.model_name:
            return self._unknown_model(model_name)
        try:
            body = await read_body(request, self.limits.max_body_bytes)
            infer_request = oip.parse_infer_request(body, request.headers.get(oip.HEADER_LENGTH))
            top_k = check_top_k(infer_request.top_k, self.limits)
            answers = await self._classify([ImageRequest(data, top_k) for data in infer_request.images])
        except RequestError as error:
            headers = {**self.headers, **error.headers}
            return JSONResponse(oip.error_body(error), status_code=error.status_code, headers=headers)
        results = []
        for index, (response, status) in enumerate(answers):
            if status == LitAPIStatus.ERROR:
                try:
                    RegularRequestHandler._handle_error_response(response)
                except HTTPException as error:
                    return JSONResponse(oip.error_body(str(error.detail)), status_code=error.status_code)
            if isinstance(response, RequestError):
                detail = f"image {index}: {response.detail}"
                return JSONResponse(oip.error_body(detail), status_code=response.status_code, headers=self.headers)
            results.append([Prediction(**row) for row in response["predictions"]])
        content, headers = oip.infer_response(self.model_name, infer_request, results)
        return Response(content, headers={**headers, **self.headers})

    def _unknown_model(self, model_name: str) -> JSONResponse:
        return JSONResponse(oip.error_body(f"unknown model {model_name!r}; this server has {self.model_name!r}"), 404)

    def _workers_ready(self) -> bool:
        status = self._server.workers_setup_status if self._server is not None else {}
        return bool(status) and all(value == WorkerSetupStatus.READY for value in status.values())

    async def _submit(self, image_request: ImageRequest) -> tuple[Any, LitAPIStatus]:
        """Put one request on the workers' queue and wait for its answer (as LitServe's own handler does)."""
        uid = str(uuid.uuid4())
        item = ResponseBufferItem(event=asyncio.Event())
        self.response_buffer[uid] = item
        try:
            self.request_queue.put((self.response_queue_id, uid, time.monotonic(), image_request))
            await item.event.wait()
        finally:
            self.response_buffer.pop(uid, None)
        return item.response

    # LitSpec's abstract hooks: ClassifierAPI overrides decode/encode, so these are never reached.
    def decode_request(self, request: Any, context_kwargs: Any = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: Any = None) -> Any:
        return output


class ClassifierAPI(ls.LitAPI):
    """Runs in each inference worker. `__init__` stores config only; `setup` loads the model."""

    def __init__(self, config: ServeConfig, model_info: ModelInfo, labels: Sequence[str]) -> None:
        limits = PayloadLimits(
            max_body_bytes=config.max_body_bytes, num_classes=model_info.num_classes, default_top_k=config.top_k
        )
        super().__init__(
            max_batch_size=config.max_batch_size,
            batch_timeout=config.batch_timeout,
            spec=ClassifierSpec(
                limits,
                model_name=oip_model_name(model_info),
                random_weights=model_info.random_weights,
                queue_limit=config.queue_limit(),
            ),
        )
        self.config = config
        self.labels = list(labels)
        self.classifier: Classifier | None = None

    def setup(self, device: str) -> None:
        config = self.config
        # CPU workers share the cores; GPU workers barely use intra-op threads, so one rule serves both.
        torch.set_num_threads(config.torch_threads_per_worker(config.workers_per_device))
        self.classifier, info = build_classifier(config, self.labels, torch.device(device))
        self.classifier.warm_up(sorted({1, config.max_batch_size}))
        logger.info("worker ready on %s: %s (%s)", device, info.name, info.weights)

    def decode_request(self, request: ImageRequest) -> ImageRequest:
        return request  # parsed in the API process; decoded per item inside `predict`

    def batch(self, inputs: list[ImageRequest]) -> list[ImageRequest]:
        return inputs

    def predict(self, x: list[ImageRequest] | ImageRequest) -> list[Result] | Result:
        if self.max_batch_size > 1:
            return self.classifier.classify(x)
        return self.classifier.classify([x])[0]

    def unbatch(self, output: list[Result]) -> list[Result]:
        return output

    def encode_response(self, output: Result) -> dict[str, Any] | RequestError:
        if isinstance(output, RequestError):
            return output  # ClassifierSpec answers it with its own status code
        return {"predictions": [{"label": p.label, "probability": p.probability} for p in output]}


def oip_model_name(info: ModelInfo) -> str:
    """The model's name in /v2 URLs: the timm name, or a model folder's own name."""
    return Path(info.name).name
