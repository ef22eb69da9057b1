"""Prometheus metrics, correct across LitServe's processes (prometheus-client multi-process mode).

The API-server processes count HTTP requests and their latency; the inference workers record
queue wait, batch sizes, batch time, images and model load time. Every process writes its own
files under one directory; `/metrics` merges them on each scrape and adds the admission gauges,
read straight from shared memory.

prometheus-client chooses multi-process mode when it is first imported, from the environment, so
`metrics_directory()` must run before anything imports it: the imports here are inside functions.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timmserve.admission import Admission

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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
    """Recorded in the inference workers."""

    queue_wait: Any  # Histogram: admitted → taken into a batch
    batch_size: Any  # Histogram: images per model call
    batch_duration: Any  # Histogram: decode + model, per batch
    images: Any  # Counter{outcome}: classified | rejected (bad image) | abandoned (nobody waits)
    model_load: Any  # Gauge: seconds the worker took to load and warm up its model


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
    )  # fmt: skip


def render(admission: Admission) -> tuple[bytes, str]:
    """The exposition text for one scrape, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
    from prometheus_client.core import GaugeMetricFamily

    class AdmissionCollector:
        def collect(self) -> Iterator[GaugeMetricFamily]:
            yield GaugeMetricFamily(
                "timmserve_in_flight_images", "Images admitted and not yet answered.", value=admission.in_flight()
            )
            yield GaugeMetricFamily(
                "timmserve_queue_limit_images", "Images admitted at most; more get 503.", value=admission.limit
            )

    registry = CollectorRegistry()
    if _multiprocess():
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_registry())  # a registry is itself a collector
    registry.register(AdmissionCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
