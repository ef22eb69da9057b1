from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from timmserve.engines.litserve.admission import Admission
from timmserve.errors import InvalidImageError
from timmserve.http import metrics
from timmserve.model.types import Prediction


def test_one_process_scrape_has_its_own_metrics_and_the_admission_gauges(monkeypatch):
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    metrics.worker_metrics().images.labels("classified").inc(3)
    admission = Admission(4)
    admission.admit(1)
    body, content_type = metrics.render(admission)
    text = body.decode()
    assert content_type.startswith("text/plain")
    assert 'timmserve_images_total{outcome="classified"}' in text
    assert "timmserve_in_flight_images 1.0" in text and "timmserve_queue_limit_images 4.0" in text


@dataclass(frozen=True)
class Received:
    request_id: str
    admitted_at: float


def test_a_batch_is_recorded_and_ray_replicas_record_the_load_gauges_themselves(monkeypatch, caplog):
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    load = metrics.load_metrics()
    load.queue_limit.set(16)
    load.in_flight.inc(2)
    started = time.monotonic()
    batch = [Received("a", started - 0.5), Received("b", started)]
    answers = [[Prediction("tabby", 0.9)], InvalidImageError("not an image")]
    with caplog.at_level(logging.INFO, logger="timmserve.http.metrics"):
        metrics.record_batch(started, batch, answers, abandoned=1)
    text = metrics.render(None)[0].decode()
    for line in ('timmserve_images_total{outcome="rejected"} 1.0', 'timmserve_images_total{outcome="abandoned"} 1.0',
                 "timmserve_in_flight_images 2.0", "timmserve_queue_limit_images 16.0"):  # fmt: skip
        assert line in text
    assert [(r.getMessage(), r.request_id) for r in caplog.records] == [("image rejected: not an image", "b")]
