"""The LitServe adapter: a LitAPI for the inference workers and a LitSpec for the HTTP endpoint.

Why a LitSpec: LitServe's stock /predict handler parses every non-form body as JSON (a raw image
body becomes a 500) and its batched loop fails the whole batch when one item raises (upstream
#340). The spec owns `POST /predict`: it parses the three body forms in the API process and
submits only the image bytes to the workers' queue. In the worker, the LitAPI hands each batch to
`Classifier.classify`, whose per-request failures come back as RequestError *values*; the spec
turns those into that request's own 4xx while the rest of the batch gets its 200s.

The spec also owns each request's life in the queue (LitServe bounds only the queue wait, and
never notices a client that left): admission (503 when full), one end-to-end deadline (504), and
a watch for a disconnected client or a dead worker; whichever comes first frees the slot, and the
workers skip images whose slot was freed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
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

from timmserve import __version__, metrics, oip
from timmserve.admission import Admission, Ticket
from timmserve.batching import DrainingBatchLoop
from timmserve.classifier import Classifier, Result, start_worker_classifier
from timmserve.config import ServeConfig
from timmserve.errors import AnswerTimeoutError, ClientGoneError, RequestError, WorkerLostError
from timmserve.logs import configure_logging
from timmserve.middleware import request_id_of
from timmserve.model import ModelInfo
from timmserve.payload import (
    ImageRequest,
    PayloadLimits,
    Prediction,
    check_top_k,
    parse_predict_request,
    predictions_body,
    read_body,
)

logger = logging.getLogger(__name__)

PREDICT_PATH = "/predict"
METRICS_PATH = "/metrics"
RANDOM_WEIGHTS_HEADER = "X-Timmserve-Random-Weights"
# How often a waiting request checks that its client is still there and its worker still alive.
WATCH_INTERVAL = 1.0


@dataclass(frozen=True)
class QueuedImage:
    """What goes on LitServe's queue: one image, the slot it holds and the request it belongs to."""

    image: ImageRequest
    ticket: Ticket
    request_id: str
    admitted_at: float  # time.monotonic(): one clock for every process on the machine


class ClassifierSpec(LitSpec):
    """timmserve's inference endpoints, in the API server process: parse, queue, await, answer.
    `POST /predict` (three body forms) and the Open Inference Protocol under `/v2` share one queue,
    so both go through the same dynamic batcher."""

    def __init__(
        self,
        limits: PayloadLimits,
        *,
        model_name: str,
        random_weights: bool,
        admission: Admission,
        timeout: float,
    ) -> None:
        super().__init__()
        self.api_path = PREDICT_PATH
        self.limits = limits
        self.model_name = model_name
        self.admission = admission
        self.timeout = timeout
        self._statuses: dict[int, str] = {}
        self._statuses_read_at = float("-inf")
        # Random weights serve meaningless answers: every response says so.
        self.headers = {RANDOM_WEIGHTS_HEADER: "true; throughput studies only"} if random_weights else {}
        self.add_endpoint(PREDICT_PATH, self.predict_endpoint, ["POST"])
        self.add_endpoint(METRICS_PATH, self.metrics_endpoint, ["GET"])
        self.add_endpoint("/v2", self.v2_server_metadata, ["GET"])
        self.add_endpoint("/v2/health/live", self.v2_live, ["GET"])
        self.add_endpoint("/v2/health/ready", self.v2_ready, ["GET"])
        self.add_endpoint("/v2/models/{model_name}", self.v2_model_metadata, ["GET"])
        self.add_endpoint("/v2/models/{model_name}/ready", self.v2_model_ready, ["GET"])
        self.add_endpoint("/v2/models/{model_name}/infer", self.v2_infer, ["POST"])

    async def predict_endpoint(self, request: Request) -> JSONResponse:
        try:
            image_request = await parse_predict_request(request, self.limits)
            [(response, status)] = await self._classify([image_request], request)
        except RequestError as error:
            return self.error_response(error)
        if status == LitAPIStatus.ERROR:
            # A batch that raised (a bug, logged by the worker): LitServe's own encoding, a 500.
            RegularRequestHandler._handle_error_response(response)
        if isinstance(response, RequestError):
            return self.error_response(response)
        return JSONResponse(response, headers=self.headers)

    def error_response(self, error: RequestError) -> JSONResponse:
        headers = {**self.headers, **error.headers}
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=headers)

    async def _classify(self, images: list[ImageRequest], request: Request) -> list[tuple[Any, LitAPIStatus]]:
        """Queue the images and await their answers. Raises OverloadedError (503) at once when
        they would not fit, AnswerTimeoutError (504) at the deadline, ClientGoneError when the
        client left, WorkerLostError (503) when the worker holding an image died."""
        tickets = self.admission.admit(len(images))
        deadline = time.monotonic() + self.timeout
        request_id = request_id_of(request.scope)
        tasks = [
            asyncio.ensure_future(
                self._submit(QueuedImage(image, ticket, request_id, time.monotonic()), deadline, request)
            )
            for image, ticket in zip(images, tickets)
        ]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()  # the others, when one failed
            self.admission.release(tickets)

    async def metrics_endpoint(self) -> Response:
        body, content_type = metrics.render(self.admission)
        return Response(body, media_type=content_type)

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
            answers = await self._classify([ImageRequest(data, top_k) for data in infer_request.images], request)
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

    async def _submit(self, queued: QueuedImage, deadline: float, request: Request) -> tuple[Any, LitAPIStatus]:
        """Put one image on the workers' queue and wait for its answer (as LitServe's own handler
        does), watching the deadline, the client and the worker."""
        uid = str(uuid.uuid4())
        item = ResponseBufferItem(event=asyncio.Event())
        self.response_buffer[uid] = item
        try:
            self.request_queue.put((self.response_queue_id, uid, queued.admitted_at, queued))
            while not item.event.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AnswerTimeoutError(f"no answer within the server's request timeout of {self.timeout:g} s")
                try:
                    await asyncio.wait_for(item.event.wait(), min(remaining, WATCH_INTERVAL))
                except asyncio.TimeoutError:
                    await self._check_still_wanted(item, request)
        finally:
            self.response_buffer.pop(uid, None)
        return item.response

    async def _check_still_wanted(self, item: ResponseBufferItem, request: Request) -> None:
        if await request.is_disconnected():
            raise ClientGoneError("the client disconnected before its answer")
        # LitServe's monitor restarts a dead worker (status STARTING until it is ready again).
        if item.worker_id is not None and self._worker_status(item.worker_id) != WorkerSetupStatus.READY:
            raise WorkerLostError(
                "the inference worker holding this image stopped; it is being replaced", retry_after=5
            )

    def _worker_status(self, worker_id: int) -> str | None:
        return self._server.workers_setup_status.get(f"{PREDICT_PATH.strip('/')}_{worker_id}")

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
        # Created here, in the main process: LitServe forks the API servers and hands this object
        # to the spawned workers, so all of them share its memory.
        self.admission = Admission(config.queue_limit())
        super().__init__(
            max_batch_size=config.max_batch_size,
            batch_timeout=config.batch_timeout,
            loop=DrainingBatchLoop() if config.max_batch_size > 1 else "auto",
            spec=ClassifierSpec(
                limits,
                model_name=oip_model_name(model_info),
                random_weights=model_info.random_weights,
                admission=self.admission,
                timeout=config.timeout,
            ),
        )
        self.config = config
        self.labels = list(labels)
        self.classifier: Classifier | None = None

    def setup(self, device: str) -> None:
        started = time.monotonic()
        config = self.config
        configure_logging(config.log_level, config.log_format)
        # Ctrl-C (or systemd's SIGTERM) reaches the whole process group: the main process drains
        # the API servers first and stops the workers after, so a worker must not die of it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.classifier, info = start_worker_classifier(
            config, self.labels, torch.device(device), config.workers_per_device
        )
        load_seconds = time.monotonic() - started
        metrics.worker_metrics().model_load.set(load_seconds)
        logger.info(
            "worker ready on %s: %s (%s)",
            device,
            info.name,
            info.weights,
            extra={"load_seconds": round(load_seconds, 2)},
        )

    def decode_request(self, request: QueuedImage) -> QueuedImage:
        return request  # parsed in the API process; decoded per item inside `predict`

    def batch(self, inputs: list[QueuedImage]) -> list[QueuedImage]:
        return inputs

    def predict(self, x: list[QueuedImage] | QueuedImage) -> list[Result] | Result:
        if self.max_batch_size > 1:
            return self.classify(x)
        return self.classify([x])[0]

    def classify(self, queued: list[QueuedImage]) -> list[Result]:
        """One result per queued image; images that nobody waits for any more are skipped."""
        started = time.monotonic()
        wanted = [self.admission.is_live(item.ticket) for item in queued]
        live = [item for item, keep in zip(queued, wanted) if keep]
        try:
            answers = self.classifier.classify([item.image for item in live]) if live else []
        except Exception:
            logger.exception("a batch failed", extra={"request_ids": [item.request_id for item in live]})
            raise
        self._record(started, live, answers, abandoned=len(queued) - len(live))
        remaining = iter(answers)
        return [next(remaining) if keep else _ABANDONED for keep in wanted]

    def _record(self, started: float, live: list[QueuedImage], answers: list[Result], abandoned: int) -> None:
        worker = metrics.worker_metrics()
        rejected = 0
        for item, answer in zip(live, answers):
            worker.queue_wait.observe(started - item.admitted_at)
            if isinstance(answer, RequestError):
                rejected += 1
                logger.info("image rejected: %s", answer.detail, extra={"request_id": item.request_id})
        if live:
            worker.batch_size.observe(len(live))
            worker.batch_duration.observe(time.monotonic() - started)
        for outcome, count in (("classified", len(live) - rejected), ("rejected", rejected), ("abandoned", abandoned)):
            if count:
                worker.images.labels(outcome).inc(count)

    def unbatch(self, output: list[Result]) -> list[Result]:
        return output

    def encode_response(self, output: Result) -> dict[str, Any] | RequestError:
        if isinstance(output, RequestError):
            return output  # ClassifierSpec answers it with its own status code
        return predictions_body(output)


# The answer for an image whose request has gone: no one receives it.
_ABANDONED = ClientGoneError("the request had already been answered or abandoned")


def oip_model_name(info: ModelInfo) -> str:
    """The model's name in /v2 URLs: the timm name, or a model folder's own name."""
    return Path(info.name).name
