"""The request transport between the LitServe engine's API servers and its inference workers.

LitServe carries a request through a multiprocessing manager, a third process: the API server puts
it on a manager queue, a worker takes it (and looks once more at the queue for a batch), sends a
START message back through another manager queue, then its answer the same way: seven round trips
through a third process, ~1 ms of that process's CPU per request on 2 cores (issue 15). Here an
image makes two one-way trips, each one `send` and one `recv`, over ZeroMQ sockets on Unix-domain
sockets (`ipc://`) in a private directory:

- each inference worker binds `worker-<id>` (PULL) and takes images from every API server
  (ZeroMQ interleaves them fairly);
- each API server binds `api-<id>` (PULL) for its answers and connects one PUSH socket per worker:
  it chooses the worker itself (`Dispatcher.choose`), so it knows which worker holds each image
  without being told;
- ZeroMQ connects in the background and delivers a message whole or not at all: a replacement
  worker binds the same path and receives what is sent after it; images that were on a dead worker
  are lost with it, and the API server resubmits them (frontend.py).

Messages are pickles, exchanged only by the processes of one server, as multiprocessing's own
queues exchange them; the directory is created with mode 0700, so no other user can connect.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import zmq

from timmserve.errors import ConfigError

# The message that stops a worker's loop (a real message is never empty).
STOP = b""
# ZeroMQ's default high-water marks (1000 messages) would make a send fail or block under load;
# admission control (admission.py) bounds what is in flight instead.
UNLIMITED = 0
# Seconds the shutdown waits for its stop messages to reach the workers.
STOP_LINGER_SECONDS = 2.0
# A Unix socket's path holds at most 107 bytes on Linux (`sun_path`, 108 with its NUL).
MAX_SOCKET_PATH = 107


class Stopped(Exception):
    """The worker was told to stop (the server is shutting down)."""


@dataclass(frozen=True)
class Endpoints:
    """Where one server's sockets live: a private directory (`private`)."""

    directory: str

    @classmethod
    @contextmanager
    def private(cls) -> Iterator[Endpoints]:
        """A new directory, mode 0700, for one server's sockets; removed afterwards. Raises
        ConfigError when the temporary directory's path leaves no room for a socket's name."""
        directory = tempfile.mkdtemp(prefix="timmserve-ipc-")
        try:
            longest = os.path.join(directory, "worker-9999")
            if len(longest.encode()) > MAX_SOCKET_PATH:
                raise ConfigError(
                    f"the temporary directory {os.path.dirname(directory)} is too long for Unix socket paths "
                    f"(at most {MAX_SOCKET_PATH} bytes with the socket's name); set TMPDIR to a shorter one"
                )
            yield cls(directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def worker(self, worker_id: int) -> str:
        return f"ipc://{os.path.join(self.directory, f'worker-{worker_id}')}"

    def api_server(self, api_server_id: int) -> str:
        return f"ipc://{os.path.join(self.directory, f'api-{api_server_id}')}"


@dataclass(frozen=True)
class Delivery:
    """One image as a worker receives it: where its answer goes, and the image itself."""

    api_server_id: int
    uid: int
    payload: Any


@dataclass(frozen=True)
class Answer:
    """A worker's answer for one image: its result, or `ok=False` when the image's batch raised."""

    result: Any
    ok: bool


def _socket(context: zmq.Context, kind: int) -> zmq.Socket:
    sock = context.socket(kind)
    sock.setsockopt(zmq.SNDHWM, UNLIMITED)
    sock.setsockopt(zmq.RCVHWM, UNLIMITED)
    sock.setsockopt(zmq.LINGER, 0)  # a process that closes its sockets does not wait for anyone
    return sock


class Dispatcher:
    """An API server's end (created inside its event loop): sends images to the workers and
    resolves one future per image with the worker's `Answer`."""

    def __init__(self, endpoints: Endpoints, api_server_id: int, num_workers: int) -> None:
        self.api_server_id = api_server_id
        self._context = zmq.Context()
        self._answers = _socket(self._context, zmq.PULL)
        self._answers.bind(endpoints.api_server(api_server_id))
        self._workers = [_socket(self._context, zmq.PUSH) for _ in range(num_workers)]
        for worker_id, sock in enumerate(self._workers):
            sock.connect(endpoints.worker(worker_id))
        self._outstanding = [0] * num_workers  # images sent to each worker and not answered yet
        self._pending: dict[int, tuple[int, asyncio.Future[Answer]]] = {}
        self._uids = itertools.count()
        self._preference = [(api_server_id + offset) % num_workers for offset in range(num_workers)]
        asyncio.get_running_loop().add_reader(self._answers.FD, self._read_answers)

    def choose(self, ready: Callable[[int], bool]) -> int:
        """The ready worker with the fewest images outstanding from this API server; among equals,
        the first in this API server's order (worker `api_server_id` first), so that at low load
        one worker does the work with its caches warm (alternating costs ~15% more CPU per image
        on a 2-core machine) while another API server starts on another worker. Any worker when
        none is ready (the image waits in ZeroMQ until one binds)."""
        candidates = [worker_id for worker_id in self._preference if ready(worker_id)] or self._preference
        return min(candidates, key=lambda worker_id: self._outstanding[worker_id])

    def submit(self, worker_id: int, payload: Any) -> tuple[int, asyncio.Future[Answer]]:
        """Send one image to a worker: (its uid, the future of its answer). Call `forget(uid)` once
        done with it, answered or not."""
        uid = next(self._uids)
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[uid] = (worker_id, answer)
        self._outstanding[worker_id] += 1
        message = pickle.dumps(Delivery(self.api_server_id, uid, payload), protocol=pickle.HIGHEST_PROTOCOL)
        self._workers[worker_id].send(message, copy=len(message) < 65536)
        return uid, answer

    def forget(self, uid: int) -> None:
        """Stop waiting for an image (answered, timed out, its client gone or its worker dead)."""
        entry = self._pending.pop(uid, None)
        if entry is not None:
            self._outstanding[entry[0]] -= 1

    def _read_answers(self) -> None:
        # ZeroMQ's descriptor signals a change, not a level: take every answer that is there.
        while self._answers.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            uid, answer = pickle.loads(self._answers.recv(zmq.NOBLOCK))
            entry = self._pending.get(uid)
            if entry is not None and not entry[1].done():  # else: nobody waits for it any more
                entry[1].set_result(answer)


class WorkerEnd:
    """An inference worker's end: takes images sent to it, sends each answer to its API server."""

    def __init__(self, endpoints: Endpoints, worker_id: int) -> None:
        self._endpoints = endpoints
        self._context = zmq.Context()
        self._requests = _socket(self._context, zmq.PULL)
        self._requests.bind(endpoints.worker(worker_id))
        self._answers: dict[int, zmq.Socket] = {}

    def receive(self, timeout: float | None) -> Delivery | None:
        """The next image, waiting up to `timeout` seconds for it (None: for ever; 0: not at all);
        None when none came. Raises Stopped for the stop message."""
        if not self._requests.poll(None if timeout is None else max(0, round(timeout * 1000))):
            return None
        message = self._requests.recv(copy=False)
        if message.bytes == STOP:
            raise Stopped()
        return pickle.loads(message.buffer)

    def answer(self, deliveries: Sequence[Delivery], answers: Sequence[Answer]) -> None:
        """Send each image's answer to the API server that sent it."""
        for delivery, answer in zip(deliveries, answers, strict=True):
            sock = self._answers.get(delivery.api_server_id)
            if sock is None:
                sock = self._answers[delivery.api_server_id] = _socket(self._context, zmq.PUSH)
                sock.connect(self._endpoints.api_server(delivery.api_server_id))
            sock.send(pickle.dumps((delivery.uid, answer), protocol=pickle.HIGHEST_PROTOCOL))

    def close(self) -> None:
        # Answers still queued can only be for API servers that have stopped (the shutdown stops
        # the workers after the API servers).
        self._context.destroy(linger=0)


def stop_workers(endpoints: Endpoints, num_workers: int) -> None:
    """Send each worker its stop message (the shutdown, once no API server is left); returns once
    they are delivered, or after STOP_LINGER_SECONDS for a worker that is not there."""
    context = zmq.Context()
    for worker_id in range(num_workers):
        sock = context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, round(STOP_LINGER_SECONDS * 1000))
        sock.connect(endpoints.worker(worker_id))
        sock.send(STOP)
        sock.close()
    context.term()
