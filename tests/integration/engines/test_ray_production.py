"""Production behaviour on the Ray Serve engine: the shared tests of test_production.py (API key,
request ids and JSON logs, metrics, drain) on one Ray server, and what differs on Ray: settings it
refuses, its request timeout and its queue bound. Skipped when the ray extra is not installed."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'timmserve[ray]'")

from tests.conftest import slow_image  # noqa: E402
from tests.integration.engines.test_production import (  # noqa: E402, F401  (collected again here, on Ray)
    API_KEY,
    API_KEY_ENV,
    KEYED,
    QUEUE_LIMIT,
    WITH_KEY,
    answered_or_refused_while_draining,
    predict,
    scrape,
    test_api_key_guards_everything_but_the_probes,
    test_metrics_move_by_exactly_the_requests_sent,
    test_request_ids_are_returned_and_logged_as_json,
    wait_for,
)

TIMEOUT = 1.0


@pytest.fixture(scope="module")
def keyed_server(start_module_server):
    """KEYED on Ray Serve: one replica taking one image at a time, and a request timeout."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv(API_KEY_ENV, API_KEY)  # for the server, and for the CLI's --api-key-env
        yield start_module_server(
            "--engine", "ray", *KEYED, "--workers-per-device", "1", "--max-batch-size", "1", "--timeout", str(TIMEOUT)
        )


@pytest.mark.parametrize(
    ("option", "reason"),
    [
        (["--api-servers", "2"], "Ray Serve runs one HTTP proxy per node"),
        (["--inline"], "a replica is its own process behind Ray's proxy, so every request makes that hop"),
        (
            ["--grpc-port", "8001"],
            "Ray Serve's gRPC proxy serves its own service definitions, not the inference protocol's",
        ),
    ],
)
def test_a_setting_ray_cannot_honour_is_refused_in_one_line_before_ray_starts(option, reason):
    serve = [sys.executable, "-m", "timmserve", "serve", "--engine", "ray", *option]
    result = subprocess.run(serve, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"Error: {option[0]} is not supported by --engine ray: {reason}"]


def test_the_request_timeout_answers_504_from_the_replica(keyed_server, photos):
    """Slow images on a replica that takes one at a time: the later ones wait past the timeout, and
    their requests get the 504 with the LitServe engine's detail."""
    huge = slow_image(8000)
    with ThreadPoolExecutor(4) as pool:
        slow = list(pool.map(lambda _: predict(keyed_server.url, huge, headers=WITH_KEY), range(4)))
    assert {r.status_code for r in slow} <= {200, 504} and 504 in {r.status_code for r in slow}, slow
    for response in slow:
        if response.status_code == 504:
            assert response.json()["detail"] == f"no answer within the server's request timeout of {TIMEOUT:g} s"
    # Once the replica is through the image it was decoding, it answers again; nothing is left counted.
    assert wait_for(lambda: predict(keyed_server.url, photos["cat"], headers=WITH_KEY).status_code == 200, timeout=30)
    assert scrape(keyed_server.url, headers=WITH_KEY)["timmserve_in_flight_images"] == 0


def test_beyond_the_queue_bound_ray_answers_503_with_retry_after(keyed_server, photos):
    """Ray's own bound (`max_queued_requests` = --max-queue, at the proxy): its 503 carries the
    LitServe engine's Retry-After, with Ray's plain-text body."""
    clients = 6 * QUEUE_LIMIT  # far more than the replica's two requests and the queue hold
    image = slow_image(1000)  # some tens of ms each: the clients outpace the replica

    def send(http: httpx.Client) -> tuple[int, str | None]:
        response = predict(keyed_server.url, image, client=http, headers=WITH_KEY)
        return response.status_code, response.headers.get("Retry-After")

    # One client: a client per request spends the CPU on its own set-up first, spreading the burst out.
    with httpx.Client(limits=httpx.Limits(max_connections=clients)) as http, ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(send, [http] * (2 * clients)))
    assert {status for status, _ in answers} == {200, 503}, answers
    assert {retry_after for status, retry_after in answers if status == 503} == {"1"}
    assert predict(keyed_server.url, photos["cat"], headers=WITH_KEY).status_code == 200


def test_sigterm_answers_or_refuses_every_request(keyed_server, photos):
    """Last in this module: it stops the server. Ray's proxy keeps the port until Serve stops, so
    requests arriving during the drain get 503 with Retry-After (never Ray's 404)."""
    answered_or_refused_while_draining(keyed_server, photos, WITH_KEY)
