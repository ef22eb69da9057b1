"""The workers' batching policy (`batching.take_batch`), one claim of its docstring per test, on a
real `queue.Queue`. LitServe's stock `BatchedLoop` fails the idle, lone-image and first-arrival
claims: it polls, and times its window from when it was called."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from timmserve.engines.litserve.batching import take_batch

STOP = object()


class Stopped(Exception):
    pass


@dataclass
class Receive:
    """One call of `receive`: how long it might wait, when it ran, what it returned."""

    timeout: float | None
    called: float
    returned: float = float("nan")
    item: Any = None  # None: it came back empty


class RecordingReceive:
    """A worker's `receive(timeout)` on a real queue, recording every call; STOP raises Stopped."""

    def __init__(self, images: range = range(0)) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.calls: list[Receive] = []
        for n in images:
            self.queue.put(n)

    def __call__(self, timeout: float | None) -> Any:
        call = Receive(timeout, time.monotonic())
        self.calls.append(call)
        try:
            call.item = self.queue.get(block=timeout != 0, timeout=timeout or None)
        except queue.Empty:
            return None
        finally:
            call.returned = time.monotonic()
        if call.item is STOP:
            raise Stopped()
        return call.item


@pytest.fixture
def send_later() -> Iterator[Callable[[RecordingReceive, list[tuple[float, Any]]], None]]:
    """send_later(receive, [(seconds from now, item), …]): a thread queues each item at its time."""
    threads: list[threading.Thread] = []

    def start(receive: RecordingReceive, schedule: list[tuple[float, Any]]) -> None:
        started = time.monotonic()

        def run() -> None:
            for at, item in schedule:
                time.sleep(max(0.0, started + at - time.monotonic()))
                receive.queue.put(item)

        threads.append(threading.Thread(target=run, daemon=True))
        threads[-1].start()

    yield start
    for thread in threads:
        thread.join(timeout=10)


def test_an_idle_worker_waits_in_one_call_and_takes_the_first_image_when_it_arrives(send_later):
    # One blocking wait, not a poll every millisecond (stock, timeout > 0) nor a spin (stock, 0).
    receive = RecordingReceive()
    send_later(receive, [(0.3, 1)])
    assert take_batch(receive, max_batch_size=8, batch_timeout=0.0) == [1]
    first = receive.calls[0]
    assert first.timeout is None and first.item == 1, receive.calls
    assert first.returned - first.called >= 0.25  # it did wait, asleep in that one call


def test_without_a_timeout_a_lone_image_goes_at_once():
    receive = RecordingReceive(range(1, 2))
    assert take_batch(receive, max_batch_size=8, batch_timeout=0.0) == [1]
    # After the first image, one look at the queue that does not wait: the model never idles
    # while an image is ready.
    assert [(call.timeout, call.item) for call in receive.calls] == [(None, 1), (0.0, None)]


@pytest.mark.parametrize("batch_timeout", [0.0, 60.0])
def test_it_takes_what_is_queued_up_to_the_max_batch_size_in_order(batch_timeout):
    # A full batch goes at once, even with a long timeout: nothing is waited for.
    receive = RecordingReceive(range(1, 6))
    assert take_batch(receive, max_batch_size=3, batch_timeout=batch_timeout) == [1, 2, 3]
    assert len(receive.calls) == 3 and receive.queue.qsize() == 2  # the rest wait for the next batch


def test_with_a_timeout_it_waits_for_more_until_batch_timeout_after_the_first_image(send_later):
    # The wait is counted from the first image, not from when the worker began waiting: the second
    # image comes 0.4 T after the first (joins) but 1.2 T after the worker began (the stock loop
    # has closed its batch by then).
    timeout = 1.0
    receive = RecordingReceive()
    send_later(receive, [(0.8 * timeout, 1), (1.2 * timeout, 2)])
    assert take_batch(receive, max_batch_size=8, batch_timeout=timeout) == [1, 2]
    closed = time.monotonic()
    first_taken = receive.calls[0].returned
    assert closed >= first_taken + timeout  # the batch was not full: it waited the whole timeout
    # … and no longer: no call after the first image asked to wait past its deadline (a little
    # slack for the time between reading the clock and recording the call).
    waits_until = [call.called + (call.timeout or 0.0) for call in receive.calls[1:]]
    assert waits_until and max(waits_until) <= first_taken + timeout + 0.25


@pytest.mark.parametrize("images", [range(0), range(1, 2)], ids=["idle", "mid-batch"])
def test_the_stop_signal_stops_the_loop(images):
    receive = RecordingReceive(images)
    receive.queue.put(STOP)
    with pytest.raises(Stopped):
        take_batch(receive, max_batch_size=8, batch_timeout=0.0)
