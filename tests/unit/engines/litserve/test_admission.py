from __future__ import annotations

import multiprocessing

import pytest

from timmserve.engines.litserve.admission import Admission
from timmserve.errors import OverloadedError


def test_admits_up_to_the_limit_then_refuses_with_retry_after():
    admission = Admission(3)
    first = admission.admit(2)
    assert admission.in_flight() == 2
    with pytest.raises(OverloadedError) as refused:
        admission.admit(2)  # all or none: one slot is free, two are asked for
    assert refused.value.status_code == 503 and refused.value.headers == {"Retry-After": "1"}
    assert "limit of 3 queued images" in refused.value.detail
    assert admission.in_flight() == 2
    admission.admit(1)
    admission.release(first)
    assert admission.in_flight() == 1


def test_a_released_ticket_is_no_longer_live_even_when_its_slot_is_taken_again():
    admission = Admission(1)
    [old] = admission.admit(1)
    assert admission.is_live(old)
    admission.release([old])
    [new] = admission.admit(1)
    assert new.slot == old.slot and new.serial != old.serial
    assert not admission.is_live(old) and admission.is_live(new)
    admission.release([old])  # releasing a stale ticket must not free the new request's slot
    assert admission.is_live(new) and admission.in_flight() == 1


def _admit_in_child(admission: Admission, queue: multiprocessing.Queue) -> None:
    queue.put(admission.admit(2))


def test_slots_are_shared_with_spawned_processes():
    admission = Admission(4)
    queue = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(target=_admit_in_child, args=(admission, queue))
    child.start()
    tickets = queue.get(timeout=60)
    child.join(timeout=60)
    assert admission.in_flight() == 2 and all(admission.is_live(t) for t in tickets)
    # The child took two of the four slots and two serials: here, only the other two are free, and
    # new serials follow the child's (a reused serial would make a stale image look live).
    mine = admission.admit(2)
    assert {t.slot for t in mine}.isdisjoint(t.slot for t in tickets)
    assert min(t.serial for t in mine) > max(t.serial for t in tickets)
    with pytest.raises(OverloadedError):
        admission.admit(1)
    admission.release(tickets + mine)
    assert admission.in_flight() == 0
