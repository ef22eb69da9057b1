"""The request transport (transport.py) on real ZeroMQ sockets in a private directory: API servers'
`Dispatcher`s in this process's event loop, workers' `WorkerEnd`s on threads."""

from __future__ import annotations

import asyncio
import os
import stat
import tempfile
import threading
from collections.abc import Iterator

import pytest

from timmserve.engines.litserve.transport import Answer, Dispatcher, Endpoints, Stopped, WorkerEnd, stop_workers
from timmserve.errors import ConfigError

RECEIVE_TIMEOUT = 10.0


@pytest.fixture
def endpoints() -> Iterator[Endpoints]:
    with Endpoints.private() as endpoints:
        yield endpoints


def echo_worker(endpoints: Endpoints, worker_id: int, served: list[tuple[int, object]]) -> threading.Thread:
    """A worker on a thread: answers each image with (its worker id, the image) until stopped."""

    def run() -> None:
        end = WorkerEnd(endpoints, worker_id)
        try:
            while True:
                delivery = end.receive(RECEIVE_TIMEOUT)
                assert delivery is not None, "nothing arrived"
                served.append((worker_id, delivery.payload))
                end.answer([delivery], [Answer((worker_id, delivery.payload), ok=True)])
        except Stopped:
            pass
        finally:
            end.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_directory_is_private_and_removed_afterwards():
    with Endpoints.private() as endpoints:
        assert stat.S_IMODE(os.stat(endpoints.directory).st_mode) == 0o700
        assert endpoints.worker(3).startswith("ipc://") and endpoints.worker(3) != endpoints.api_server(3)
    assert not os.path.exists(endpoints.directory)


def test_a_temporary_directory_too_long_for_socket_paths_is_one_clear_error(tmp_path, monkeypatch):
    long_tmp = tmp_path / ("d" * 100)
    long_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(long_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile caches the directory it chose
    with pytest.raises(ConfigError, match="set TMPDIR to a shorter one"):
        with Endpoints.private():
            pass
    assert list(long_tmp.iterdir()) == []  # nothing left behind


def test_each_image_is_answered_by_the_worker_it_was_sent_to_back_to_its_api_server(endpoints):
    served: list[tuple[int, object]] = []
    workers = [echo_worker(endpoints, worker_id, served) for worker_id in range(2)]

    async def two_api_servers() -> list[object]:
        dispatchers = [Dispatcher(endpoints, api_server_id, num_workers=2) for api_server_id in range(2)]
        sent = [
            dispatcher.submit(worker_id, f"image {api_server_id}/{worker_id}")
            for api_server_id, dispatcher in enumerate(dispatchers)
            for worker_id in range(2)
        ]
        answers = await asyncio.wait_for(asyncio.gather(*(answer for _, answer in sent)), RECEIVE_TIMEOUT)
        return [answer.result for answer in answers]

    assert asyncio.run(two_api_servers()) == [(0, "image 0/0"), (1, "image 0/1"), (0, "image 1/0"), (1, "image 1/1")]
    stop_workers(endpoints, 2)
    for worker in workers:
        worker.join(RECEIVE_TIMEOUT)
        assert not worker.is_alive()


def test_a_worker_takes_images_one_by_one_and_says_when_none_came(endpoints):
    end = WorkerEnd(endpoints, 0)
    try:
        assert end.receive(0) is None
        assert end.receive(0.05) is None

        async def send() -> None:
            dispatcher = Dispatcher(endpoints, 0, num_workers=1)
            for n in range(3):
                dispatcher.submit(0, n)
            await asyncio.sleep(0.2)  # the sends are queued by ZeroMQ's I/O thread before the loop closes

        asyncio.run(send())
        deliveries = [end.receive(RECEIVE_TIMEOUT) for _ in range(3)]
        assert [(d.api_server_id, d.payload) for d in deliveries] == [(0, 0), (0, 1), (0, 2)]
        assert len({d.uid for d in deliveries}) == 3
    finally:
        end.close()


def test_the_choice_prefers_ready_workers_with_fewest_outstanding_starting_from_its_own(endpoints):
    async def choices() -> dict[str, object]:
        first, second = Dispatcher(endpoints, 0, num_workers=3), Dispatcher(endpoints, 1, num_workers=3)
        every = lambda worker_id: True  # noqa: E731
        seen = {"idle, API server 0": first.choose(every), "idle, API server 1": second.choose(every)}
        first.submit(0, "busy")
        seen["worker 0 busy"] = first.choose(every)
        seen["worker 1 not ready"] = first.choose(lambda worker_id: worker_id != 1)
        seen["none ready"] = first.choose(lambda worker_id: False)
        return seen

    assert asyncio.run(choices()) == {
        "idle, API server 0": 0,  # at low load the same worker, caches warm
        "idle, API server 1": 1,  # another API server starts on another
        "worker 0 busy": 1,
        "worker 1 not ready": 2,
        "none ready": 1,  # then any worker, the least loaded: the image waits for it in ZeroMQ
    }


def test_an_answer_nobody_waits_for_is_dropped_and_frees_its_worker(endpoints):
    served: list[tuple[int, object]] = []
    worker = echo_worker(endpoints, 0, served)

    async def forget_then_ask() -> tuple[int, object]:
        dispatcher = Dispatcher(endpoints, 0, num_workers=2)  # worker 1 never comes
        uid, forgotten = dispatcher.submit(0, "forgotten")
        dispatcher.forget(uid)
        chosen = dispatcher.choose(lambda worker_id: True)  # worker 0 has nothing outstanding again
        _, answer = dispatcher.submit(chosen, "wanted")
        result = (await asyncio.wait_for(answer, RECEIVE_TIMEOUT)).result
        assert not forgotten.done()
        return chosen, result

    assert asyncio.run(forget_then_ask()) == (0, (0, "wanted"))
    assert [payload for _, payload in served] == ["forgotten", "wanted"]
    stop_workers(endpoints, 1)
    worker.join(RECEIVE_TIMEOUT)


def test_a_replacement_worker_on_the_same_path_gets_what_is_sent_after_it(endpoints):
    served: list[tuple[int, object]] = []

    async def across_a_replacement() -> list[object]:
        dispatcher = Dispatcher(endpoints, 0, num_workers=1)
        results = []
        for label in ("first worker", "replacement"):
            worker = echo_worker(endpoints, 0, served)
            _, answer = dispatcher.submit(0, label)
            results.append((await asyncio.wait_for(answer, RECEIVE_TIMEOUT)).result)
            await asyncio.to_thread(stop_workers, endpoints, 1)
            await asyncio.to_thread(worker.join, RECEIVE_TIMEOUT)
        return results

    assert asyncio.run(across_a_replacement()) == [(0, "first worker"), (0, "replacement")]
