"""Every private piece of LitServe that timmserve touches, in one place (pinned: litserve==0.2.19).

LitServe's public API cannot express what the serving path needs: requests parsed in the API
process, per-image answers from a batch, a deadline that covers inference, a drain that loses no
admitted request. So timmserve speaks LitServe's internal protocol directly, and only here:

- the request queue item: `(response_queue_id, uid, timestamp, payload)`, put by the API server
  (`enqueue`), taken by the worker's loop (`unpack`);
- the stop signal a worker's loop takes from that queue (`STOP`), and the exception that ends the
  loop (`StopLoop`);
- the START message a worker sends when it takes a request, which tells the API server's response
  buffer which worker holds it (`send_start`), and the answer tuple `(response, status)`;
- the key of a worker in `LitServer.workers_setup_status` (`worker_status_key`);
- the LitServer methods `server.TimmServer` overrides (`OVERRIDDEN_SERVER_METHODS`).

tests/unit/test_litserve_internals.py checks each of these against the installed LitServe, so a
version that moves one fails there, loudly, instead of somewhere in the request path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from queue import Queue
from typing import Any

from litserve.loops.base import _SENTINEL_VALUE, LitLoop, _StopLoopError
from litserve.transport.base import MessageTransport
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem, WorkerSetupStatus

STOP = _SENTINEL_VALUE
StopLoop = _StopLoopError

# LitServer methods that TimmServer overrides (checked against the installed LitServe by the tests).
OVERRIDDEN_SERVER_METHODS = (
    "_start_server",
    "_init_manager",
    "_perform_graceful_shutdown",
    "launch_single_inference_worker",
)


def enqueue(request_queue: Queue, response_queue_id: int, uid: str, payload: Any) -> None:
    """Put one request on a worker queue, as LitServe's own request handler does."""
    request_queue.put((response_queue_id, uid, time.monotonic(), payload))


def unpack(item: Any) -> tuple[int, str, Any]:
    """A queue item → (response_queue_id, uid, payload); raises StopLoop for the stop signal."""
    if item == STOP:
        raise StopLoop()
    response_queue_id, uid, _timestamp, payload = item
    return response_queue_id, uid, payload


def send_start(loop: LitLoop, transport: MessageTransport, response_queue_id: int, uid: str) -> None:
    """Tell the API server that this worker holds `uid` (so a worker's death fails only its own
    requests: the API server watches that worker's status)."""
    loop.put_response(
        transport=transport,
        response_queue_id=response_queue_id,
        uid=uid,
        response_data=(),
        status=LitAPIStatus.START,
        response_type=LoopResponseType.REGULAR,
    )


def new_answer_slot() -> ResponseBufferItem:
    """What an API server puts in `response_buffer[uid]`; LitServe fills it when the answer comes."""
    return ResponseBufferItem(event=asyncio.Event())


def answer_of(slot: ResponseBufferItem) -> tuple[Any, bool]:
    """(the worker's answer, True) once the slot's event is set; (None, False) when the batch
    raised in the worker (LitServe sends a pickled exception with status ERROR)."""
    response, status = slot.response
    return (response, True) if status == LitAPIStatus.OK else (None, False)


def holder_of(slot: ResponseBufferItem) -> int | None:
    """The id of the worker that took the request, once its START message arrived."""
    return slot.worker_id


def worker_status_key(api_path: str, worker_id: int) -> str:
    """The key of a worker in `LitServer.workers_setup_status` (`"predict_0"` for `/predict`)."""
    return f"{api_path.split('/')[-1]}_{worker_id}"


def worker_ready(statuses: Mapping[str, str], api_path: str, worker_id: int) -> bool:
    """Whether that worker is up (LitServe's monitor sets STARTING while it replaces a dead one)."""
    return statuses.get(worker_status_key(api_path, worker_id)) == WorkerSetupStatus.READY


def all_workers_ready(statuses: Mapping[str, str]) -> bool:
    """At least one worker, and every worker ready."""
    return bool(statuses) and all(value == WorkerSetupStatus.READY for value in statuses.values())
