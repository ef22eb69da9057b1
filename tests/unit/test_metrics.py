from __future__ import annotations

from timmserve import metrics
from timmserve.admission import Admission


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
