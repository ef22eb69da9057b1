"""worker.overlapped: the next batch is taken and decoded while the current one is on the model,
answers go out in order, a batch whose decode raised is answered failed, and the stop message
ends both threads. On fakes of the transport's end and of the LitAPI, with timestamps."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from timmserve.engines.litserve.transport import Answer, Delivery, Stopped
from timmserve.engines.litserve.worker import overlapped

DECODE_SECONDS = 0.05
MODEL_SECONDS = 0.1


class FakeEnd:
    """Hands out `batches` one at a time (each one what is queued when the worker looks), then
    the stop message; records what is answered."""

    def __init__(self, batches: list[list[str]]) -> None:
        self.batches = [[Delivery(0, uid, payload) for uid, payload in enumerate(batch)] for batch in batches]
        self.current: list[Delivery] = []
        self.answered: list[tuple[list[str], list[Answer]]] = []
        self.taken: list[float] = []  # when each batch was taken

    def receive(self, timeout: float | None) -> Delivery | None:
        if timeout is None:  # waiting for a batch's first image
            if not self.batches:
                raise Stopped()
            self.current = self.batches.pop(0)
            self.taken.append(time.monotonic())
        return self.current.pop(0) if self.current else None

    def answer(self, deliveries: list[Delivery], answers: list[Answer]) -> None:
        self.answered.append(([d.payload for d in deliveries], list(answers)))


@dataclass
class FakeAPI:
    max_batch_size: int = 8
    batch_timeout: float = 0.0
    config: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(overlap=True))
    decoded: list[tuple[float, float]] = field(default_factory=list)  # (start, end) per batch
    finished: list[tuple[float, float]] = field(default_factory=list)

    def decode(self, payloads: list[str]) -> list[str]:
        started = time.monotonic()
        time.sleep(DECODE_SECONDS)
        if "bad" in payloads:
            raise RuntimeError("a bug in stage 1")
        self.decoded.append((started, time.monotonic()))
        return payloads

    def finish(self, staged: list[str]) -> list[str]:
        started = time.monotonic()
        time.sleep(MODEL_SECONDS)
        self.finished.append((started, time.monotonic()))
        return [f"result of {payload}" for payload in staged]


def test_the_next_batch_is_decoded_while_the_current_one_is_on_the_model():
    end, api = FakeEnd([["a", "b"], ["c"], ["d", "e"]]), FakeAPI()
    overlapped(api, end)
    assert [payloads for payloads, _ in end.answered] == [["a", "b"], ["c"], ["d", "e"]]
    assert [answer.result for _, answers in end.answered for answer in answers] == [f"result of {p}" for p in "abcde"]
    # Batch 2's decode began before batch 1's model call ended, and batch 3's before batch 2's.
    for (decode_started, _), (_, finish_ended) in zip(api.decoded[1:], api.finished):
        assert decode_started < finish_ended
    assert "timmserve-decode-ahead" not in [thread.name for thread in threading.enumerate()]


def test_the_worker_runs_at_most_one_batch_ahead_of_the_model():
    # Taking a batch early locks the images that arrived so far into it: with one batch on the
    # model and one decoded and waiting, the next is taken only when the model starts on the
    # waiting one (so it gathers what arrives during a whole model call).
    end, api = FakeEnd([["a"], ["b"], ["c"], ["d"]]), FakeAPI()
    overlapped(api, end)
    assert len(end.answered) == 4
    for taken, (_, finish_ended) in zip(end.taken[2:], api.finished):
        assert taken >= finish_ended


def test_a_batch_whose_decode_raised_is_answered_failed_and_the_loop_goes_on():
    end = FakeEnd([["a"], ["bad", "b"], ["c"]])
    overlapped(FakeAPI(), end)
    assert [(payloads, [answer.ok for answer in answers]) for payloads, answers in end.answered] == [
        (["a"], [True]),
        (["bad", "b"], [False, False]),
        (["c"], [True]),
    ]
