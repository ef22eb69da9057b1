"""The shared HTTP contract suite (imported from test_server.py) run against the Ray Serve engine,
plus what only Ray has: replicas. Skipped, with the reason, when the ray extra is not installed."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'timmserve[ray]'")

from tests.integration.test_server import (  # noqa: E402, F401  (collected again here, on Ray)
    BATCHED,
    predict_raw,
    test_bad_input_gets_the_same_4xx_on_every_engine,
    test_built_in_model_classifies_real_photos,
    test_json_body_is_the_litserve_contract,
    test_multipart_body,
    test_one_garbage_image_in_a_batch_fails_only_itself,
    test_predictions_alone_equal_predictions_in_a_batch,
    test_raw_image_body_with_top_k,
)


@pytest.fixture(scope="module")
def ray_server(start_module_server):
    """The same model code on Ray Serve: two replicas, batching as in test_server.py."""
    return start_module_server("--engine", "ray", "--workers-per-device", "2", *BATCHED)


@pytest.fixture(scope="module")
def server(ray_server):
    return ray_server


@pytest.fixture(scope="module")
def batched_server(ray_server):
    return ray_server


def test_two_ray_replicas_both_serve(ray_server, photos):
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: predict_raw(ray_server.url, photos["cat"]), range(48)))
    assert {r.status_code for r in responses} == {200}
    assert len({r.headers["X-Timmserve-Replica"] for r in responses}) == 2
    assert httpx.get(f"{ray_server.url}/info").json()["model"]["config"]["engine"] == "ray"


def test_ray_engine_shuts_down_cleanly(ray_server, photos):
    """Last in this module: it stops the shared Ray server. SIGTERM, what a supervisor sends (Ray's
    own handler for it aborted the process until ours was installed after ray.init), under steady
    load: every request is answered or refused, none is cut off (serve.shutdown() alone cut them
    off), and requests in flight at the signal are answered."""
    outcomes: list[tuple[str, float]] = []  # (outcome, when it completed)
    jpeg = {"Content-Type": "image/jpeg"}
    stopping = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stopping.is_set():
                try:
                    response = http.post(f"{ray_server.url}/predict", content=photos["cat"], headers=jpeg)
                    outcome = str(response.status_code)
                except httpx.ConnectError:
                    outcome = "refused"  # the port was closed: never admitted
                except httpx.TransportError as error:
                    outcome = type(error).__name__  # cut off mid-flight
                outcomes.append((outcome, time.monotonic()))
                if outcome != "200":
                    return

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(outcomes) < 16 and time.monotonic() < deadline:  # load flowing through both replicas
        time.sleep(0.05)
    signalled = time.monotonic()
    assert ray_server.stop(signum=signal.SIGTERM) == 0
    stopping.set()
    for thread in threads:
        thread.join(timeout=60)
    # Requests that reach the proxy after the application is deleted get Ray's 404.
    assert {outcome for outcome, _ in outcomes} <= {"200", "404", "refused"}, outcomes
    assert any(outcome == "200" and when > signalled for outcome, when in outcomes), "nothing in flight was answered"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{ray_server.url}/health", timeout=2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # Ray's own processes (raylet, GCS, replicas) included
        try:
            os.killpg(ray_server.process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    pytest.fail("a process of the stopped Ray server is still alive")
