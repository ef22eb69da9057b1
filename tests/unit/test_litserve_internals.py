"""Each private LitServe touch point, checked against the installed LitServe: a version that moves
one fails here, by name, instead of somewhere in the request path."""

from __future__ import annotations

import asyncio
import inspect
import queue

import litserve as ls
import pytest
from litserve.loops.base import LitLoop
from litserve.server import _mixed_response_to_buffer
from litserve.utils import LitAPIStatus, LoopResponseType, WorkerSetupStatus

from timmserve import litserve_internals


def test_the_pinned_version_is_installed():
    assert ls.__version__ == "0.2.19", "litserve_internals was written against 0.2.19: re-check each touch point"


def test_a_queue_item_round_trips_in_the_layout_litservers_own_handler_uses():
    request_queue: queue.Queue = queue.Queue()
    litserve_internals.enqueue(request_queue, 3, "uid-1", {"image": b"x"})
    item = request_queue.get_nowait()
    # LitServe's own handler (server.py, RegularRequestHandler) puts (response_queue_id, uid, time, payload).
    source = inspect.getsource(ls.server.BaseRequestHandler._submit_request)
    assert "request_queue.put((response_queue_id, uid, time.monotonic(), payload))" in source
    assert litserve_internals.unpack(item) == (3, "uid-1", {"image": b"x"})


def test_the_stop_signal_ends_the_loop():
    with pytest.raises(litserve_internals.StopLoop):
        litserve_internals.unpack(litserve_internals.STOP)
    # LitServe's own loops stop on the same sentinel, with the same exception.
    source = inspect.getsource(ls.loops.base)
    assert "_SENTINEL_VALUE" in source and "_StopLoopError" in source


def test_a_start_message_tells_the_api_server_which_worker_holds_the_request(transport):
    loop = LitLoop()
    loop._worker_id = 1  # set from LITSERVE_WORKER_ID in a real worker
    loop._restart_workers = True  # LitLoop sends START only when workers are restarted on death
    litserve_internals.send_start(loop, transport, response_queue_id=0, uid="uid-1")
    [(message, consumer)] = transport.sent
    assert consumer == 0

    class OneMessage:
        async def areceive(self, consumer_id: int) -> object:
            if transport.sent:
                return transport.sent.pop()[0]
            raise asyncio.CancelledError  # ends LitServe's consumer loop

    slot = litserve_internals.new_answer_slot()
    asyncio.run(_mixed_response_to_buffer(OneMessage(), {"uid-1": slot}))
    assert litserve_internals.holder_of(slot) == 1
    assert not slot.event.is_set()  # START is not the answer
    assert message[1][1] == LitAPIStatus.START


def test_an_answer_and_a_failed_batch_are_told_apart():
    ok = litserve_internals.new_answer_slot()
    ok.response = (["prediction"], LitAPIStatus.OK)
    assert litserve_internals.answer_of(ok) == (["prediction"], True)
    failed = litserve_internals.new_answer_slot()
    failed.response = (b"pickled exception", LitAPIStatus.ERROR)
    assert litserve_internals.answer_of(failed) == (None, False)
    assert LoopResponseType.REGULAR.value == "REGULAR"


def test_worker_status_keys_are_litservers_own():
    source = inspect.getsource(ls.LitServer.launch_inference_worker)
    assert 'self.workers_setup_status[f"{endpoint}_{worker_id}"]' in source
    assert 'endpoint = lit_api.api_path.split("/")[-1]' in source
    assert litserve_internals.worker_status_key("/predict", 2) == "predict_2"
    statuses = {"predict_0": WorkerSetupStatus.READY, "predict_1": WorkerSetupStatus.STARTING}
    assert litserve_internals.worker_ready(statuses, "/predict", 0)
    assert not litserve_internals.worker_ready(statuses, "/predict", 1)
    assert not litserve_internals.all_workers_ready(statuses)
    assert not litserve_internals.all_workers_ready({})


@pytest.mark.parametrize("name", litserve_internals.OVERRIDDEN_SERVER_METHODS)
def test_every_overridden_server_method_exists_with_the_signature_we_override(name):
    from timmserve.server import TimmServer

    theirs = inspect.signature(getattr(ls.LitServer, name))
    ours = inspect.signature(getattr(TimmServer, name))
    assert list(ours.parameters)[: len(theirs.parameters)] == list(theirs.parameters) or "kwargs" in ours.parameters
