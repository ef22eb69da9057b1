"""The workers' batching policy (`DrainingBatchLoop.get_batch_requests`), one claim of its docstring
per test, on a real `queue.Queue`. LitServe's stock `BatchedLoop` (what `loop="auto"` runs) fails
the idle, lone-image and first-arrival tests: it polls, and times its window from when it was called."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from litserve.utils import LitAPIStatus, LoopResponseType

from timmserve import litserve_internals
from timmserve.batching import IDLE_WAIT_SECONDS, DrainingBatchLoop

RESPONSE_QUEUE_ID = 0
WORKER_ID = 3


@dataclass
class Get:
    """One `get` on the request queue: how it was asked, when it ran, what it returned."""

    block: bool
    timeout: float | None
    called: float
    returned: float = float("nan")
    item: Any = None  # None: it came back empty


class RecordingQueue(queue.Queue):
    """A real queue that records every `get` (`get_nowait` included: it calls `get`)."""

    def __init__(self, images: range = range(0)) -> None:
        super().__init__()
        self.gets: list[Get] = []
        for n in images:
            enqueue(self, n)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        call = Get(block, timeout, time.monotonic())
        self.gets.append(call)
        try:
            call.item = super().get(block, timeout)
            return call.item
        finally:
            call.returned = time.monotonic()


def enqueue(requests: queue.Queue, n: int) -> None:
    """Image n, queued as an API server queues it."""
    litserve_internals.enqueue(requests, RESPONSE_QUEUE_ID, f"uid-{n}", f"image-{n}")


def payload(n: int) -> tuple[int, str, str]:
    """What the loop hands on for image n."""
    return RESPONSE_QUEUE_ID, f"uid-{n}", f"image-{n}"


def lit_api(*, max_batch_size: int = 8, batch_timeout: float = 0.0) -> SimpleNamespace:
    # What the loops read from a LitAPI (`request_timeout` and `stream` for the stock loop's sake).
    return SimpleNamespace(
        max_batch_size=max_batch_size, batch_timeout=batch_timeout, request_timeout=30.0, stream=False
    )


@pytest.fixture
def loop(monkeypatch: pytest.MonkeyPatch) -> DrainingBatchLoop:
    monkeypatch.setenv("LITSERVE_WORKER_ID", str(WORKER_ID))
    loop = DrainingBatchLoop()
    loop._restart_workers = True  # as LitServe sets it for timmserve's server: START messages are sent
    return loop


@pytest.fixture
def enqueue_later() -> Iterator[Callable[[queue.Queue, list[tuple[float, int]]], None]]:
    """enqueue_later(queue, [(seconds from now, n), …]): a thread queues image n at its time."""
    threads: list[threading.Thread] = []

    def start(requests: queue.Queue, schedule: list[tuple[float, int]]) -> None:
        started = time.monotonic()

        def run() -> None:
            for at, n in schedule:
                time.sleep(max(0.0, started + at - time.monotonic()))
                enqueue(requests, n)

        threads.append(threading.Thread(target=run, daemon=True))
        threads[-1].start()

    yield start
    for thread in threads:
        thread.join(timeout=10)


def next_batch(loop: DrainingBatchLoop, api: SimpleNamespace, requests: queue.Queue, transport) -> list:
    """The next non-empty batch, calling the loop again after an empty answer as LitServe's
    `run_batched_loop` does."""
    while True:
        payloads, timed_out = loop.get_batch_requests(api, requests, transport)
        assert timed_out == []  # deadlines belong to the API servers, never to the queue
        if payloads:
            return payloads


@pytest.mark.parametrize("batch_timeout", [0.0, 0.5])
def test_an_idle_worker_blocks_in_one_get_and_comes_back_empty(loop, transport, batch_timeout):
    # One blocking `get`, not a poll every millisecond (stock, timeout > 0) nor a spin (stock, 0).
    requests = RecordingQueue()
    assert loop.get_batch_requests(lit_api(batch_timeout=batch_timeout), requests, transport) == ([], [])
    assert len(requests.gets) == 1, f"{len(requests.gets)} gets on an empty queue"
    [only] = requests.gets
    assert (only.block, only.timeout) == (True, IDLE_WAIT_SECONDS)
    assert only.returned - only.called >= IDLE_WAIT_SECONDS  # it did wait, asleep in that one call
    assert transport.sent == []


def test_an_idle_worker_takes_the_first_image_as_soon_as_it_arrives(loop, transport, enqueue_later):
    requests = RecordingQueue()
    enqueue_later(requests, [(0.1, 1)])
    assert loop.get_batch_requests(lit_api(), requests, transport) == ([payload(1)], [])
    assert requests.gets[0].block and requests.gets[0].item is not None  # the get that was waiting


def test_without_a_timeout_a_lone_image_goes_at_once(loop, transport):
    requests = RecordingQueue(range(1, 2))
    assert next_batch(loop, lit_api(batch_timeout=0.0), requests, transport) == [payload(1)]
    # After the first image, one look at the queue that does not wait: the model never idles
    # while an image is ready.
    assert [(get.block, get.item is not None) for get in requests.gets] == [(True, True), (False, False)]


@pytest.mark.parametrize("batch_timeout", [0.0, 60.0])
def test_it_takes_what_is_queued_up_to_the_max_batch_size_in_order(loop, transport, batch_timeout):
    # A full batch goes at once, even with a long timeout: nothing is waited for.
    requests = RecordingQueue(range(1, 6))
    api = lit_api(max_batch_size=3, batch_timeout=batch_timeout)
    assert next_batch(loop, api, requests, transport) == [payload(1), payload(2), payload(3)]
    assert len(requests.gets) == 3 and requests.qsize() == 2  # the rest wait for the next batch


def test_with_a_timeout_it_waits_for_more_until_batch_timeout_after_the_first_image(loop, transport, enqueue_later):
    # The wait is counted from the first image, not from when the worker began waiting: the second
    # image comes 0.4 T after the first (joins) but 1.2 T after the worker began (the stock loop
    # has closed its batch by then).
    timeout = 1.0
    requests = RecordingQueue()
    enqueue_later(requests, [(0.8 * timeout, 1), (1.2 * timeout, 2)])
    assert next_batch(loop, lit_api(batch_timeout=timeout), requests, transport) == [payload(1), payload(2)]
    closed = time.monotonic()
    first_taken = next(get.returned for get in requests.gets if get.item is not None)
    assert closed >= first_taken + timeout  # the batch was not full: it waited the whole timeout
    # … and no longer: no `get` after the first image asked to wait past its deadline (a little
    # slack for the time between reading the clock and recording the call).
    waits_until = [get.called + (get.timeout or 0.0) for get in requests.gets if get.called > first_taken]
    assert waits_until and max(waits_until) <= first_taken + timeout + 0.25


def test_each_accepted_image_sends_one_start_message_naming_its_worker(loop, transport):
    # The API server learns which worker holds each image, so a dead worker fails only its own.
    next_batch(loop, lit_api(), RecordingQueue(range(1, 3)), transport)
    start = ((), LitAPIStatus.START, LoopResponseType.REGULAR, WORKER_ID)
    assert transport.sent == [(("uid-1", start), RESPONSE_QUEUE_ID), (("uid-2", start), RESPONSE_QUEUE_ID)]


@pytest.mark.parametrize("images", [range(0), range(1, 2)], ids=["idle", "mid-batch"])
def test_the_stop_signal_stops_the_loop(loop, transport, images):
    requests = RecordingQueue(images)
    requests.put(litserve_internals.STOP)
    with pytest.raises(litserve_internals.StopLoop):
        loop.get_batch_requests(lit_api(), requests, transport)
