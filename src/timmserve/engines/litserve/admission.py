"""Admission control over every API-server process: a fixed number of slots in shared memory.

Each admitted image holds one slot until its request is answered, times out or its client goes
away. No free slot: the request is refused at once (503) instead of joining a queue that grows
without bound. A slot holds the serial number of the request that took it, and the inference
workers check it before spending CPU on an image: once a request has let go of its slot (answered
504, or its client disconnected), a copy still waiting for a worker is skipped.

Slots and serials live in one `multiprocessing.Array`, created before LitServe forks its API
servers and handed to the spawned workers with the LitAPI, so every process sees the same memory.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

import numpy as np

from timmserve.errors import OverloadedError


@dataclass(frozen=True)
class Ticket:
    """A request's claim on one slot."""

    slot: int
    serial: int


class Admission:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        # Slot i holds 0 when free, else the serial of the request holding it. The last element
        # is the serial counter, so one lock covers both. A spawn-context lock, because LitServe
        # spawns its workers (forked API servers inherit it all the same).
        self._shared = multiprocessing.get_context("spawn").Array("q", limit + 1)

    def _slots(self) -> np.ndarray:
        return np.frombuffer(self._shared.get_obj(), dtype=np.int64)

    def admit(self, count: int) -> list[Ticket]:
        """`count` slots for one request, all or none; raises OverloadedError when they are not free."""
        with self._shared.get_lock():
            memory = self._slots()
            free = np.flatnonzero(memory[:-1] == 0)[:count]
            if len(free) < count:
                raise OverloadedError(
                    f"the server is at its limit of {self.limit} queued images; retry later", retry_after=1
                )
            first = int(memory[-1]) + 1
            serials = np.arange(first, first + count, dtype=np.int64)
            memory[free] = serials
            memory[-1] = serials[-1]
        return [Ticket(int(slot), int(serial)) for slot, serial in zip(free, serials)]

    def release(self, tickets: list[Ticket]) -> None:
        with self._shared.get_lock():
            memory = self._slots()
            for ticket in tickets:
                if memory[ticket.slot] == ticket.serial:
                    memory[ticket.slot] = 0

    def is_live(self, ticket: Ticket) -> bool:
        """Whether the request still waits for this image. Read without the lock: the slot was
        written before the image was sent to a worker, so a stale read can only make a worker
        classify an image that nobody waits for any more."""
        return bool(self._slots()[ticket.slot] == ticket.serial)

    def in_flight(self) -> int:
        """Images admitted and not yet answered, over all API servers."""
        return int(np.count_nonzero(self._slots()[:-1]))
