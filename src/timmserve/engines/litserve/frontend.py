"""The LitServe engine's data plane, in each API server process: admit, dispatch, await.

`QueueFrontend.classify` is the `Classify` callable the HTTP endpoints (routes.py) are given. For
each image it takes an admission slot (503 at once when the queue is full), then classifies a
one-image JPEG request itself when nothing else is in flight and the server has an inline lane
(inline.py), or else sends each image to the ready worker with the fewest images outstanding
(transport.py), and awaits that image's answer,
watching one end-to-end deadline (504), the client (gone: 499 in the log, noticed at once) and the
worker that holds the image. A worker that dies holding an image loses nothing: classification is
idempotent and the bytes are still here, so the image goes to a live worker once more (a second
loss is a 503). Whichever of answer, deadline or departure comes first frees the slot; the workers
skip images whose slot was freed (worker.py). The worker's answer is returned as is:
`list[Prediction] | RequestError`.

It is a LitSpec only because that is how LitServe hands an object to every API server process and
tells it which one it is (`response_queue_id`); it registers no endpoints of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from litserve.specs.base import LitSpec

from timmserve.engines.litserve import internals
from timmserve.engines.litserve.admission import Admission
from timmserve.engines.litserve.inference import AdmittedImage
from timmserve.engines.litserve.inline import InlineLane
from timmserve.engines.litserve.transport import Dispatcher, Endpoints
from timmserve.errors import (
    AnswerTimeoutError,
    ClientGoneError,
    InternalError,
    PayloadTooLargeError,
    WorkerLostError,
)
from timmserve.http.routes import Call
from timmserve.model.classifier import Result
from timmserve.model.types import ImageRequest

logger = logging.getLogger(__name__)

# The LitAPI's path: LitServe names the workers' status keys after it; no HTTP route has it.
QUEUE_PATH = "/predict"
# How often a waiting image checks that its worker is still alive.
WATCH_INTERVAL = 1.0
# How long a look at the workers' statuses (a call to LitServe's manager process) is reused.
STATUS_MAX_AGE = 0.1


class QueueFrontend(LitSpec):
    """Admission, dispatch to the workers and the answers, for every API server process (see module doc)."""

    def __init__(
        self, admission: Admission, endpoints: Endpoints, *, timeout: float, inline: InlineLane | None = None
    ) -> None:
        """`admission` is shared by every API server and worker (shared memory); `endpoints` is
        where the transport's sockets live; `timeout` is the end-to-end deadline in seconds, from
        admission to answer; `inline`: the API servers' inline lane, if the config has one."""
        super().__init__()
        self.api_path = QUEUE_PATH
        self.admission = admission
        self.transport_endpoints = endpoints
        self.timeout = timeout
        self.inline = inline
        self._dispatcher: Dispatcher | None = None  # made in the API server's event loop
        self._statuses: dict[str, str] = {}
        self._statuses_read = float("-inf")

    async def classify(self, images: Sequence[ImageRequest], call: Call) -> list[Result]:
        """One result per image, in order. Raises OverloadedError (503) at once when they would not
        fit, AnswerTimeoutError (504) at the deadline, ClientGoneError when the client left,
        WorkerLostError (503) when the workers holding an image died twice, InternalError (500)
        when a worker's batch raised (a bug; the worker logged it), PayloadTooLargeError (413) when
        the request has more images than the server ever admits at once."""
        if len(images) > self.admission.limit:
            raise PayloadTooLargeError.too_many_images(len(images), self.admission.limit)
        tickets = self.admission.admit(len(images))
        deadline = time.monotonic() + self.timeout
        request_id = call.request_id
        now = time.monotonic()
        admitted = [AdmittedImage(image, ticket, request_id, now) for image, ticket in zip(images, tickets)]
        if self._inline_now(admitted):
            tasks = [asyncio.ensure_future(self._classify_inline(admitted[0], deadline))]
        else:
            tasks = [asyncio.ensure_future(self._submit(item, deadline)) for item in admitted]
        client_gone = asyncio.ensure_future(call.disconnected())
        try:
            pending = set(tasks)
            while pending:
                done, _ = await asyncio.wait([*pending, client_gone], return_when=asyncio.FIRST_COMPLETED)
                if client_gone in done:
                    raise ClientGoneError("the client disconnected before its answer")
                failures = [task.exception() for task in done if task.exception() is not None]
                if failures:
                    raise failures[0]  # the request fails with its first failed image
                pending -= done
            return [task.result() for task in tasks]
        finally:
            for task in [*tasks, client_gone]:
                task.cancel()  # the other images, when one failed or the client left
            self.admission.release(tickets)

    def ready(self) -> bool:
        """Every inference worker is up (false while LitServe replaces a dead one)."""
        return self._server is not None and internals.all_workers_ready(self._server.workers_setup_status)

    def _inline_now(self, admitted: list[AdmittedImage]) -> bool:
        # Nothing to batch it with: one JPEG (InlineLane.takes), no other image admitted anywhere.
        return (
            self.inline is not None
            and len(admitted) == 1
            and self.inline.takes(admitted[0].image)
            and self.admission.in_flight() == 1
            and self.inline.claim()
        )

    async def _classify_inline(self, item: AdmittedImage, deadline: float) -> Result:
        try:
            return await asyncio.wait_for(self.inline.classify(item), deadline - time.monotonic())
        except asyncio.TimeoutError:
            raise AnswerTimeoutError.after(self.timeout) from None

    async def _submit(self, item: AdmittedImage, deadline: float) -> Result:
        try:
            return await self._submit_once(item, deadline)
        except WorkerLostError:
            logger.warning(
                "an inference worker died holding an image; resubmitting it", extra={"request_id": item.request_id}
            )
            return await self._submit_once(item, deadline)

    async def _submit_once(self, item: AdmittedImage, deadline: float) -> Result:
        if self._dispatcher is None:
            self._dispatcher = Dispatcher(
                self.transport_endpoints, self.response_queue_id, len(self._server.inference_workers)
            )
        worker_id = self._dispatcher.choose(self._worker_ready)
        uid, answer = self._dispatcher.submit(worker_id, item)
        try:
            while not answer.done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AnswerTimeoutError.after(self.timeout)
                await asyncio.wait([answer], timeout=min(remaining, WATCH_INTERVAL))
                # LitServe's monitor restarts a dead worker (status STARTING until it is ready again).
                if not answer.done() and not self._worker_ready(worker_id):
                    raise WorkerLostError(
                        "the inference worker holding this image stopped; it is being replaced", retry_after=5
                    )
        finally:
            self._dispatcher.forget(uid)
        if not answer.result().ok:
            raise InternalError("the inference worker failed on this request's batch; see the server log")
        return answer.result().result

    def _worker_ready(self, worker_id: int) -> bool:
        now = time.monotonic()
        if now - self._statuses_read > STATUS_MAX_AGE:
            self._statuses = self._server.workers_setup_status.copy()
            self._statuses_read = now
        return internals.worker_ready(self._statuses, QUEUE_PATH, worker_id)

    # LitSpec's abstract hooks: the HTTP endpoints (routes.py) and the worker do this work.
    def decode_request(self, request: Any, context_kwargs: Any = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: Any = None) -> Any:
        return output
