"""The load generator: asyncio + aiohttp with keep-alive connections.

- Closed loop: C senders post back-to-back for a fixed duration (after a warm-up of the same load).
- Open loop: requests at a target rate with Poisson arrivals; each latency counts from the
  *scheduled* send time, so a server that stalls is charged for the queue it causes (no
  coordinated omission).

A level is warm-up then measurement as one continuous load. Requests count in the phase in which
they *complete*: req/s is the responses completed inside the measured window ÷ its length; those
completing during the warm-up, or after the window (the drain, which the level still waits for),
are counted apart. Every request is accounted for: sent = ok + sum(errors) + timeouts within the
window, and requests_total = warmup_requests + sent + after_window_requests. Several client
processes can share a level when one process cannot drive the server; their counts are merged.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
import numpy as np

from timmserve.bench.process import free_port
from timmserve.errors import TimmServeError


@dataclass(frozen=True)
class LoadSpec:
    """One level: closed loop (`concurrency`) or open loop (`rate`)."""

    url: str  # full URL of the endpoint, e.g. http://127.0.0.1:8000/predict
    bodies: tuple[bytes, ...]  # cycled
    duration: float
    warmup: float = 0.0
    concurrency: int | None = None
    rate: float | None = None
    content_type: str = "application/octet-stream"
    timeout: float = 120.0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("a level is either closed loop (concurrency) or open loop (rate)")

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency is not None else "open"

    def share(self, index: int, processes: int) -> LoadSpec:
        """This process's part of the level when `processes` clients share it."""
        if self.concurrency is not None:
            part = self.concurrency // processes + (1 if index < self.concurrency % processes else 0)
            return LoadSpec(**{**self.__dict__, "concurrency": part, "seed": self.seed + index})
        return LoadSpec(**{**self.__dict__, "rate": self.rate / processes, "seed": self.seed + index})


@dataclass
class LevelStats:
    duration_s: float = 0.0
    sent: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)  # by HTTP status, or "connection"
    timeouts: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # successful requests only
    window: tuple[float, float] = (0.0, 0.0)  # wall-clock start and end of the measured part
    warmup_requests: int = 0  # completed before the window
    after_window_requests: int = 0  # completed after it (in flight at its end)
    requests_total: int = 0  # every request the level sent

    def merge(self, other: LevelStats) -> LevelStats:
        return LevelStats(
            duration_s=max(self.duration_s, other.duration_s),
            sent=self.sent + other.sent,
            ok=self.ok + other.ok,
            errors=self.errors + other.errors,
            timeouts=self.timeouts + other.timeouts,
            latencies_ms=self.latencies_ms + other.latencies_ms,
            window=(min(self.window[0], other.window[0]), max(self.window[1], other.window[1]))
            if self.requests_total
            else other.window,
            warmup_requests=self.warmup_requests + other.warmup_requests,
            after_window_requests=self.after_window_requests + other.after_window_requests,
            requests_total=self.requests_total + other.requests_total,
        )

    def summary(self) -> dict[str, Any]:
        latencies = np.asarray(self.latencies_ms) if self.latencies_ms else np.asarray([np.nan])
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
        return {
            "duration_s": round(self.duration_s, 3),
            "sent": self.sent,
            "ok": self.ok,
            "errors": dict(sorted(self.errors.items())),
            "timeouts": self.timeouts,
            "warmup_requests": self.warmup_requests,
            "after_window_requests": self.after_window_requests,
            "requests_total": self.requests_total,
            "req_per_s": self.ok / self.duration_s if self.duration_s else 0.0,
            "latency_ms": {"p50": _num(p50), "p90": _num(p90), "p99": _num(p99), "max": _num(np.max(latencies))},
        }


def run_level(spec: LoadSpec, processes: int = 1) -> LevelStats:
    """Warm up, then measure one level, in this process or shared across `processes`."""
    if processes == 1:
        return asyncio.run(_run(spec))
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        parts = pool.map(_run_in_process, [spec.share(i, processes) for i in range(processes)])
    merged = LevelStats()
    for part in parts:
        merged = merged.merge(part)
    return merged


def _run_in_process(spec: LoadSpec) -> LevelStats:
    return asyncio.run(_run(spec))


async def _run(spec: LoadSpec) -> LevelStats:
    limit = spec.concurrency or 0  # open loop: no cap, a stalled server must not throttle arrivals
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit)  # keep-alive
    timeout = aiohttp.ClientTimeout(total=spec.timeout)
    headers = {"Content-Type": spec.content_type}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        return await _measure(session, spec)


async def _measure(session: aiohttp.ClientSession, spec: LoadSpec) -> LevelStats:
    loop = asyncio.get_running_loop()
    start = loop.time()
    window_start, window_end = start + spec.warmup, start + spec.warmup + spec.duration
    measured = LevelStats()

    def record(completed_at: float) -> LevelStats | None:
        """The stats a request completing now counts in; None for the warm-up and the drain,
        which are only counted."""
        if completed_at < window_start:
            measured.warmup_requests += 1
        elif completed_at > window_end:
            measured.after_window_requests += 1
        else:
            measured.sent += 1
            return measured
        return None

    def on_send() -> None:
        measured.requests_total += 1

    if spec.concurrency is not None:
        await asyncio.gather(*(_sender(session, spec, record, on_send, i, window_end) for i in range(spec.concurrency)))
    else:
        await _open_loop(session, spec, record, on_send, start, window_end)
    measured.duration_s = spec.duration
    wall_now, loop_now = time.time(), loop.time()
    measured.window = (wall_now - (loop_now - window_start), wall_now - (loop_now - window_end))
    return measured


async def _sender(
    session: aiohttp.ClientSession, spec: LoadSpec, record: Any, on_send: Any, index: int, deadline: float
) -> None:
    loop = asyncio.get_running_loop()
    position = index
    while (now := loop.time()) < deadline:
        body = spec.bodies[position % len(spec.bodies)]
        position += spec.concurrency or 1
        await _send(session, spec.url, body, record, on_send, now)


async def _open_loop(
    session: aiohttp.ClientSession, spec: LoadSpec, record: Any, on_send: Any, start: float, deadline: float
) -> None:
    loop = asyncio.get_running_loop()
    arrivals = random.Random(spec.seed)
    scheduled, position, in_flight = start, 0, set()
    while True:
        scheduled += arrivals.expovariate(spec.rate)
        if scheduled >= deadline:
            break
        await asyncio.sleep(max(0.0, scheduled - loop.time()))
        body = spec.bodies[position % len(spec.bodies)]
        position += 1
        task = asyncio.create_task(_send(session, spec.url, body, record, on_send, scheduled))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)


async def _send(
    session: aiohttp.ClientSession, url: str, body: bytes, record: Any, on_send: Any, started: float
) -> None:
    """One request; it counts in the phase it completes in (`record`), its latency from `started`
    (the send time, or in open loop the scheduled time)."""
    on_send()
    status: int | str
    try:
        async with session.post(url, data=body) as response:
            await response.read()
            status = response.status
    except asyncio.TimeoutError:
        status = "timeout"
    except aiohttp.ClientError:
        status = "connection"
    completed = asyncio.get_running_loop().time()
    stats = record(completed)
    if stats is None:
        return
    if status == 200:
        stats.ok += 1
        stats.latencies_ms.append((completed - started) * 1000)
    elif status == "timeout":
        stats.timeouts += 1
    else:
        stats.errors[str(status)] += 1


async def echo_app(scope: dict, receive: Any, send: Any) -> None:
    """A trivial ASGI endpoint: reads the body, answers a small JSON. The client-capacity target."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"predictions": []}'})


def measure_client_capacity(body: bytes, *, concurrency: int, duration: float, processes: int = 1) -> float:
    """The load generator's own rate against a trivial endpoint on this machine (req/s).

    The echo server shares the machine, so this is a lower bound on what the client can send."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "timmserve.bench.load:echo_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--lifespan",
        "off",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(f"http://127.0.0.1:{port}/", server)
        spec = LoadSpec(
            url=f"http://127.0.0.1:{port}/",
            bodies=(body,),
            duration=duration,
            warmup=min(1.0, duration),
            concurrency=concurrency,
        )
        stats = run_level(spec, processes)
        return stats.ok / stats.duration_s
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_listening(url: str, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise TimmServeError("the echo server for the client-capacity measurement exited")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimmServeError("the echo server for the client-capacity measurement did not start")


def _num(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 3)
