"""A server whose worker decodes its next batch while the current one is on the model
(`--overlap`): every request answered as without it, a bad image still its own 400, batches still
formed, and the stop message ends both of the worker's threads (SIGTERM: exit 0, nothing left)."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import CAT_LABELS
from tests.integration.engines.test_production import predict, scrape, session_processes, wait_for


def test_an_overlapped_worker_answers_every_request_and_stops_cleanly(start_server, photos):
    server = start_server(
        "--overlap", "--workers-per-device", "1", "--max-batch-size", "4", "--no-inline", "--log-level", "info"
    )
    bodies = [photos["cat"], b"not an image", photos["espresso"], photos["rocket"]] * 6
    with httpx.Client(limits=httpx.Limits(max_connections=len(bodies))) as client, ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda body: predict(server.url, body, client=client), bodies))
    for body, response in zip(bodies, responses):
        if body == b"not an image":
            assert response.status_code == 400 and "not an image" in response.json()["detail"]
        else:
            assert response.status_code == 200, response.text
    assert responses[0].json()["predictions"][0]["label"] in CAT_LABELS
    assert "decode overlapped" in server.log()  # the start-up line says what the workers run
    metrics = scrape(server.url)
    assert metrics['timmserve_images_total{outcome="classified"}'] == 18
    assert metrics["timmserve_batch_size_count"] < len(bodies)  # batches of several images formed
    os.kill(server.pid, signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    assert wait_for(lambda: not session_processes(server.pid), timeout=10), session_processes(server.pid)
