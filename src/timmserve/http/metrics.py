"""Prometheus metrics, correct across LitServe's processes (prometheus-client multi-process mode).

The API-server processes count HTTP requests and their latency; the inference workers record
queue wait, batch sizes, batch time, images and model load time. Every process writes its own
files under one directory; `/metrics` merges them on each scrape and adds the admission gauges,
read straight from shared memory. On Ray Serve (one machine) the replicas are those processes:
they record all of it, the load gauges included, into one directory the deployment hands them.

prometheus-client chooses multi-process mode when it is first imported, from the environment, so
`metrics_directory()` must run before anything imports it: the imports here are inside functions.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from timmserve.errors import InternalError, RequestError

if TYPE_CHECKING:
    from timmserve.model.classifier import Result

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
IN_FLIGHT = ("timmserve_in_flight_images", "Images admitted and not yet answered.")
QUEUE_LIMIT = ("timmserve_queue_limit_images", "Images admitted at most; more get 503.")


@contextmanager
def metrics_directory() -> Iterator[Path]:
    """A fresh directory for this server's metric files, in the environment its processes inherit;
    removed afterwards (stale files from an earlier run would corrupt the counts)."""
    previous = os.environ.get(MULTIPROC_ENV)
    path = Path(tempfile.mkdtemp(prefix="timmserve-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class HttpMetrics:
    """Recorded in the API-server processes, for every HTTP request."""

    requests: Any  # Counter{endpoint, status}
    duration: Any  # Histogram{endpoint}


@dataclass(frozen=True)
class WorkerMetrics:
    """Recorded where images are classified: the inference workers and the API servers' inline lanes."""

    queue_wait: Any  # Histogram: admitted → taken into a batch
    batch_size: Any  # Histogram: images per model call
    batch_duration: Any  # Histogram: decode + model, per batch
    images: Any  # Counter{outcome}: classified | rejected (bad image) | abandoned (nobody waits)
    model_load: Any  # Gauge: seconds the worker took to load and warm up its model
    inline_images: Any  # Counter: images an API server classified itself (inline.py)


@dataclass(frozen=True)
class LoadMetrics:
    """The load gauges, recorded by Ray Serve replicas (the LitServe engine reads its admission slots)."""

    in_flight: Any  # Gauge: this replica's images received and not yet answered, summed over replicas
    queue_limit: Any  # Gauge: the queue bound the deployment was given


class Admitted(Protocol):
    """An image in a batch, as the engine received it."""

    request_id: str
    admitted_at: float  # time.monotonic()


class Slots(Protocol):
    """The admission slots of the LitServe engine, as the load gauges read them."""

    limit: int

    def in_flight(self) -> int: ...


@functools.cache
def _registry() -> Any:
    """Where this process's metrics live when not in multi-process mode (tests, in-process use)."""
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


def _multiprocess() -> bool:
    return MULTIPROC_ENV in os.environ


@functools.cache
def http_metrics() -> HttpMetrics:
    from prometheus_client import Counter, Histogram

    registry = None if _multiprocess() else _registry()
    return HttpMetrics(
        requests=Counter(
            "timmserve_requests", "HTTP requests answered, by endpoint and status code.", ["endpoint", "status"],
            registry=registry,
        ),
        duration=Histogram(
            "timmserve_request_duration_seconds", "Time from request received to response sent, in the server.",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry,
        ),
    )  # fmt: skip


def count_request(endpoint: str, status: str, seconds: float) -> None:
    """One answered request in the HTTP metrics, whatever its transport (a gRPC status is its code's
    name); `seconds` from received to answered."""
    http = http_metrics()
    http.requests.labels(endpoint, status).inc()
    http.duration.labels(endpoint).observe(seconds)


@functools.cache
def worker_metrics() -> WorkerMetrics:
    from prometheus_client import Counter, Gauge, Histogram

    registry = None if _multiprocess() else _registry()
    return WorkerMetrics(
        queue_wait=Histogram(
            "timmserve_queue_wait_seconds", "Time from admission to the start of the image's batch.",
            buckets=LATENCY_BUCKETS, registry=registry,
        ),
        batch_size=Histogram(
            "timmserve_batch_size", "Images per model call.", buckets=BATCH_SIZE_BUCKETS, registry=registry,
        ),
        batch_duration=Histogram(
            "timmserve_batch_duration_seconds", "Decode, preprocess and model time of one batch.",
            buckets=LATENCY_BUCKETS, registry=registry,
        ),
        images=Counter(
            "timmserve_images", "Images taken from the queue, by outcome: classified, rejected (not a valid "
            "image) or abandoned (its request had already timed out or its client had gone).", ["outcome"],
            registry=registry,
        ),
        model_load=Gauge(
            "timmserve_model_load_seconds", "Seconds the most recently started worker took to load and warm up "
            "its model.", multiprocess_mode="mostrecent", registry=registry,
        ),
        inline_images=Counter(
            "timmserve_inline_images", "Images an API server classified in its own process, with no hop to a "
            "worker (its inline lane: one-image JPEG requests while nothing else is in flight); counted in "
            "timmserve_images too.", registry=registry,
        ),
    )  # fmt: skip


@functools.cache
def load_metrics() -> LoadMetrics:
    from prometheus_client import Gauge

    registry = None if _multiprocess() else _registry()
    return LoadMetrics(
        in_flight=Gauge(*IN_FLIGHT, multiprocess_mode="livesum", registry=registry),
        queue_limit=Gauge(*QUEUE_LIMIT, multiprocess_mode="max", registry=registry),
    )


def record_batch(started: float, batch: Sequence[Admitted], answers: Sequence[Result], abandoned: int = 0) -> None:
    """The worker metrics of one batch that started at `started` (time.monotonic()), and one log
    line, with its request id, for each image the batch rejected; `abandoned`: images skipped
    because nobody waited for them any more."""
    worker = worker_metrics()
    rejected = 0
    for item, answer in zip(batch, answers):
        worker.queue_wait.observe(started - item.admitted_at)
        if isinstance(answer, RequestError):
            rejected += 1
            level = logging.ERROR if isinstance(answer, InternalError) else logging.INFO
            logger.log(level, "image rejected: %s", answer.detail, extra={"request_id": item.request_id})
    if batch:
        worker.batch_size.observe(len(batch))
        worker.batch_duration.observe(time.monotonic() - started)
    for outcome, count in (("classified", len(batch) - rejected), ("rejected", rejected), ("abandoned", abandoned)):
        if count:
            worker.images.labels(outcome).inc(count)


def render(admission: Slots | None) -> tuple[bytes, str]:
    """The exposition text for one scrape, and its content type. The load gauges come from
    `admission` (LitServe's slots), or else from what the processes recorded (Ray's replicas)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
    from prometheus_client.core import GaugeMetricFamily

    class AdmissionCollector:
        def collect(self) -> Iterator[GaugeMetricFamily]:
            yield GaugeMetricFamily(*IN_FLIGHT, value=admission.in_flight())
            yield GaugeMetricFamily(*QUEUE_LIMIT, value=admission.limit)

    registry = CollectorRegistry()
    if _multiprocess():
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_registry())  # a registry is itself a collector
    if admission is not None:
        registry.register(AdmissionCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
