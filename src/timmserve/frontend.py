"""The LitServe engine's data plane, in each API server process: admit, queue, await.

`QueueFrontend.classify` is the `Classify` callable the HTTP endpoints (routes.py) are given. For
each image it takes an admission slot (503 at once when the queue is full), puts the image on
LitServe's worker queue, and awaits that image's answer from whichever worker takes it, watching
one end-to-end deadline (504), the client (gone: 499 in the log) and the worker that holds the
image. A worker that dies holding an image loses nothing: classification is idempotent and the
bytes are still here, so the image goes back on the queue once, to a live worker (a second loss
is a 503). Whichever of answer, deadline or departure comes first frees the slot; the workers
skip images whose slot was freed (worker.py). The worker's answer is returned as is:
`list[Prediction] | RequestError`.

It is a LitSpec only because that is how LitServe hands an object its queues in every API server
process (`setup`); it registers no endpoints of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from litserve.specs.base import LitSpec
from starlette.requests import Request

from timmserve import litserve_internals
from timmserve.admission import Admission, Ticket
from timmserve.classifier import Result
from timmserve.errors import (
    AnswerTimeoutError,
    ClientGoneError,
    InternalError,
    PayloadTooLargeError,
    WorkerLostError,
)
from timmserve.middleware import request_id_of
from timmserve.payload import ImageRequest

logger = logging.getLogger(__name__)

# LitServe's name for the worker queue (and the workers' status keys); no HTTP route has it.
QUEUE_PATH = "/predict"
# How often a waiting request checks that its client is still there and its worker still alive.
WATCH_INTERVAL = 1.0


@dataclass(frozen=True)
class QueuedImage:
    """What goes on LitServe's queue: one image, the slot it holds and the request it belongs to."""

    image: ImageRequest
    ticket: Ticket
    request_id: str
    admitted_at: float  # time.monotonic(): one clock for every process on the machine


class QueueFrontend(LitSpec):
    """Admission, the worker queue and the answers, for every API server process (see module doc)."""

    def __init__(self, admission: Admission, *, timeout: float) -> None:
        """`admission` is shared by every API server and worker (shared memory); `timeout` is the
        end-to-end deadline in seconds, from admission to answer."""
        super().__init__()
        self.api_path = QUEUE_PATH
        self.admission = admission
        self.timeout = timeout

    async def classify(self, images: Sequence[ImageRequest], request: Request) -> list[Result]:
        """One result per image, in order. Raises OverloadedError (503) at once when they would not
        fit, AnswerTimeoutError (504) at the deadline, ClientGoneError when the client left,
        WorkerLostError (503) when the workers holding an image died twice, InternalError (500)
        when a worker's batch raised (a bug; the worker logged it), PayloadTooLargeError (413) when
        the request has more images than the server ever admits at once."""
        if len(images) > self.admission.limit:
            raise PayloadTooLargeError.too_many_images(len(images), self.admission.limit)
        tickets = self.admission.admit(len(images))
        deadline = time.monotonic() + self.timeout
        request_id = request_id_of(request.scope)
        queued = [QueuedImage(image, ticket, request_id, time.monotonic()) for image, ticket in zip(images, tickets)]
        tasks = [asyncio.ensure_future(self._submit(item, deadline, request)) for item in queued]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()  # the others, when one failed
            self.admission.release(tickets)

    def ready(self) -> bool:
        """Every inference worker is up (false while LitServe replaces a dead one)."""
        return self._server is not None and litserve_internals.all_workers_ready(self._server.workers_setup_status)

    async def _submit(self, queued: QueuedImage, deadline: float, request: Request) -> Result:
        try:
            return await self._submit_once(queued, deadline, request)
        except WorkerLostError:
            logger.warning(
                "an inference worker died holding an image; resubmitting it", extra={"request_id": queued.request_id}
            )
            return await self._submit_once(queued, deadline, request)

    async def _submit_once(self, queued: QueuedImage, deadline: float, request: Request) -> Result:
        uid = str(uuid.uuid4())
        slot = litserve_internals.new_answer_slot()
        self.response_buffer[uid] = slot
        try:
            litserve_internals.enqueue(self.request_queue, self.response_queue_id, uid, queued)
            while not slot.event.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AnswerTimeoutError.after(self.timeout)
                try:
                    await asyncio.wait_for(slot.event.wait(), min(remaining, WATCH_INTERVAL))
                except asyncio.TimeoutError:
                    await self._check_still_wanted(slot, request)
        finally:
            self.response_buffer.pop(uid, None)
        answer, ok = litserve_internals.answer_of(slot)
        if not ok:
            raise InternalError("the inference worker failed on this request's batch; see the server log")
        return answer

    async def _check_still_wanted(self, slot: Any, request: Request) -> None:
        if await request.is_disconnected():
            raise ClientGoneError("the client disconnected before its answer")
        worker_id = litserve_internals.holder_of(slot)
        statuses = self._server.workers_setup_status
        # LitServe's monitor restarts a dead worker (status STARTING until it is ready again).
        if worker_id is not None and not litserve_internals.worker_ready(statuses, QUEUE_PATH, worker_id):
            raise WorkerLostError(
                "the inference worker holding this image stopped; it is being replaced", retry_after=5
            )

    # LitSpec's abstract hooks: the worker (worker.ClassifierAPI) overrides decode/encode itself.
    def decode_request(self, request: Any, context_kwargs: Any = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: Any = None) -> Any:
        return output
