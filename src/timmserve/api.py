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
import time
import uuid
from collections.abc import Sequence
from typing import Any

import litserve as ls
import torch
from litserve.server import RegularRequestHandler
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from starlette.requests import Request
from starlette.responses import JSONResponse

from timmserve.classifier import Classifier, Result, build_classifier
from timmserve.config import ServeConfig
from timmserve.errors import RequestError
from timmserve.model import ModelInfo
from timmserve.payload import ImageRequest, PayloadLimits, parse_predict_request

logger = logging.getLogger(__name__)

PREDICT_PATH = "/predict"
RANDOM_WEIGHTS_HEADER = "X-Timmserve-Random-Weights"


class PredictSpec(LitSpec):
    """`POST /predict` in the API server process: parse, queue, await, answer."""

    def __init__(self, limits: PayloadLimits, *, random_weights: bool) -> None:
        super().__init__()
        self.api_path = PREDICT_PATH
        self.limits = limits
        # Random weights serve meaningless answers: every response says so.
        self.headers = {RANDOM_WEIGHTS_HEADER: "true; throughput studies only"} if random_weights else {}
        self.add_endpoint(PREDICT_PATH, self.predict_endpoint, ["POST"])

    async def predict_endpoint(self, request: Request) -> JSONResponse:
        try:
            image_request = await parse_predict_request(request, self.limits)
        except RequestError as error:
            return self.error_response(error)
        response, status = await self._submit(image_request)
        if status == LitAPIStatus.ERROR:
            # Queue timeouts (504) and worker failures, in LitServe's own encoding.
            RegularRequestHandler._handle_error_response(response)
        if isinstance(response, RequestError):
            return self.error_response(response)
        return JSONResponse(response, headers=self.headers)

    def error_response(self, error: RequestError) -> JSONResponse:
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=self.headers)

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
            spec=PredictSpec(limits, random_weights=model_info.random_weights),
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
            return output  # PredictSpec answers it with its own status code
        return {"predictions": [{"label": p.label, "probability": p.probability} for p in output]}
