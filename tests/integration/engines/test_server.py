"""A real `timmserve serve` on 127.0.0.1, spoken to over real HTTP, with real photos."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.conftest import CAT_LABELS, DATA, ONE_SLOW_WORKER
from tests.integration.http.test_faults import BAD_INPUTS, MAX_BODY, send_case

# The fault table's body limit on every shared server, so all its cases hold.
LIMITS = ("--max-body-bytes", str(MAX_BODY))
# Batching on with a long wait, so concurrent requests share one batch.
BATCHED = ("--max-batch-size", "8", "--batch-timeout", "0.25", "--decode-threads", "2", *LIMITS)
UNBATCHED = ("--max-batch-size", "1", *LIMITS)


@pytest.fixture(scope="module")
def batched_server(start_module_server):
    return start_module_server(*BATCHED)


@pytest.fixture(scope="module", params=["batched", "unbatched"])
def server(request, start_module_server, batched_server):
    """The HTTP contract holds with batching on and off (and on Ray: test_ray.py runs these tests
    again with its own `server`)."""
    return batched_server if request.param == "batched" else start_module_server(*UNBATCHED)


def predict_raw(url: str, data: bytes, **params) -> httpx.Response:
    return httpx.post(
        f"{url}/predict", content=data, params=params, headers={"Content-Type": "application/octet-stream"}, timeout=60
    )


def top1(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]["label"]


def test_built_in_model_classifies_real_photos(server, photos):
    assert top1(predict_raw(server.url, photos["cat"])) in CAT_LABELS
    assert top1(predict_raw(server.url, photos["espresso"])) == "espresso"
    rocket = [p["label"] for p in predict_raw(server.url, photos["rocket"]).json()["predictions"][:2]]
    assert {"missile", "projectile, missile"} & set(rocket)


def test_json_body_is_the_litserve_contract(server, photos):
    body = {"image": base64.b64encode(photos["espresso"]).decode()}
    response = httpx.post(f"{server.url}/predict", json=body, timeout=60)
    predictions = response.json()["predictions"]
    assert response.status_code == 200
    assert predictions[0]["label"] == "espresso"
    assert len(predictions) == 5  # the server's default top-k
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    assert 0 < sum(probabilities) <= 1.0 + 1e-6


def test_multipart_body(server, photos):
    files = {"image": ("cat.jpg", photos["cat"], "image/jpeg")}
    response = httpx.post(f"{server.url}/predict", files=files, data={"top_k": "3"}, timeout=60)
    assert len(response.json()["predictions"]) == 3
    assert top1(response) in CAT_LABELS


def test_raw_image_body_with_top_k(server, photos):
    response = httpx.post(
        f"{server.url}/predict?top_k=2", content=photos["espresso"], headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    assert [p["label"] for p in response.json()["predictions"]][0] == "espresso"
    assert len(response.json()["predictions"]) == 2


@pytest.mark.parametrize(("case", "kwargs", "status", "words"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_the_same_4xx_on_every_engine(server, photos, case, kwargs, status, words):
    """The fault table, its body and pixel limits included."""
    response = send_case(server.url, photos, kwargs)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_one_garbage_image_in_a_batch_fails_only_itself(batched_server, photos):
    bodies = [photos["cat"], photos["espresso"], photos["rocket"], photos["grace_hopper"]] * 2
    bodies[5] = b"\x89PNG\r\n\x1a\n but not really"
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: predict_raw(batched_server.url, body), bodies))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 7 and statuses[5] == 400, statuses
    assert top1(responses[0]) in CAT_LABELS and top1(responses[1]) == "espresso"


def test_predictions_alone_equal_predictions_in_a_batch(batched_server, photos):
    names = ["cat", "espresso", "rocket", "grace_hopper"]
    alone = {name: predict_raw(batched_server.url, photos[name]).json()["predictions"] for name in names}
    with ThreadPoolExecutor(len(names)) as pool:
        together = dict(zip(names, pool.map(lambda n: predict_raw(batched_server.url, photos[n]).json(), names)))
    # On CUDA each batch size has its own kernels (and TF32 convolutions): equal to 1e-3 there.
    tolerance = 1e-3 if "cuda" in str(httpx.get(f"{batched_server.url}/info").json()["server"]["devices"]) else 1e-5
    for name in names:
        batched = together[name]["predictions"]
        assert [p["label"] for p in batched] == [p["label"] for p in alone[name]]
        for a, b in zip(alone[name], batched):
            assert b["probability"] == pytest.approx(a["probability"], abs=tolerance)


def test_health_and_info(batched_server):
    assert httpx.get(f"{batched_server.url}/health").status_code == 200
    info = httpx.get(f"{batched_server.url}/info").json()["model"]
    assert info["architecture"] == "tf_efficientnet_lite0"
    assert info["weights"].startswith("builtin:")
    assert info["random_weights"] is False
    assert info["labels"] == info["num_classes"] == 1000
    assert info["data_config"]["mean"] == [0.5, 0.5, 0.5]
    assert info["config"]["max_batch_size"] == 8


def test_classify_cli_end_to_end(batched_server):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "timmserve",
            "classify",
            str(DATA / "cat.jpg"),
            str(DATA / "espresso.jpg"),
            "--url",
            batched_server.url,
            "--top-k",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith("cat.jpg")
    assert lines[1].split("%", 1)[1].strip() in CAT_LABELS
    assert lines[3].endswith("espresso.jpg") and lines[4].endswith("espresso")
    assert len(lines) == 6


def test_random_weights_are_flagged_everywhere(start_server, photos):
    server = start_server("--model", "test_efficientnet", "--random-weights", "--max-batch-size", "4")
    response = predict_raw(server.url, photos["cat"])
    assert response.status_code == 200
    assert "throughput studies only" in response.headers["X-Timmserve-Random-Weights"]
    info = httpx.get(f"{server.url}/info").json()["model"]
    assert info["random_weights"] is True and info["weights"] == "random"
    assert info["input_size"] == [3, 160, 160]  # the test model's own data config, not a constant
    bad = predict_raw(server.url, b"garbage")
    assert bad.status_code == 400 and "throughput studies only" in bad.headers["X-Timmserve-Random-Weights"]


def test_sigint_stops_every_process_and_frees_the_port(start_server):
    server = start_server("--model", "test_efficientnet", "--random-weights", "--max-batch-size", "1")
    assert server.stop() == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the resource tracker may take a moment
        try:
            os.killpg(server.process.pid, 0)  # any process left in the server's own session?
        except ProcessLookupError:
            return
        time.sleep(0.2)
    pytest.fail("a process of the stopped server is still alive")


def test_overload_is_refused_at_once_with_503_and_accepted_requests_succeed(start_server, photos):
    # One slow worker (eager, full decode of a 12-megapixel photo: a few hundred ms per image), so
    # that served requests take long and queue: refusals must come far faster than them.
    server = start_server("--max-batch-size", "1", "--max-queue", "2", "--no-fast-decode", *ONE_SLOW_WORKER)
    large = io.BytesIO()
    Image.open(io.BytesIO(photos["cat"])).resize((4000, 3000)).save(large, "JPEG", quality=90)
    photo = large.getvalue()

    clients = threading.local()

    def send(_: int) -> tuple[httpx.Response, float]:
        if not hasattr(clients, "http"):  # one per thread: the client's own start-up is not timed
            clients.http = httpx.Client(timeout=60, headers={"Content-Type": "application/octet-stream"})
        started = time.perf_counter()
        response = clients.http.post(f"{server.url}/predict", content=photo)
        return response, time.perf_counter() - started

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(send, range(36)))
    served = sorted(elapsed for response, elapsed in results if response.status_code == 200)
    refused = sorted(elapsed for response, elapsed in results if response.status_code == 503)
    assert len(served) + len(refused) == len(results)  # nothing but 200 and 503
    assert served and refused
    for response, _ in results:
        if response.status_code == 503:
            assert response.headers["Retry-After"] == "1" and "limit of 2 queued" in response.json()["detail"]
        else:
            assert top1(response) in CAT_LABELS
    assert refused[int(len(refused) * 0.99) - 1] < served[len(served) // 2]  # refusals come fast
    assert top1(predict_raw(server.url, photos["cat"])) in CAT_LABELS  # every slot was given back
    assert httpx.get(f"{server.url}/info").json()["model"]["config"]["max_queue"] == 2


def test_auto_is_decided_before_the_workers_start_reused_on_the_next_start_and_answers_as_eager_does(
    start_server, photos, tmp_path
):
    common = ("--model", "test_efficientnet", "--random-weights", "--max-batch-size", "4", "--cache-dir", str(tmp_path))
    auto = start_server(*common, "--log-level", "info")  # backend and precision: auto by default
    config = httpx.get(f"{auto.url}/info").json()["model"]["config"]
    chosen = (config["backend"], config["precision"])
    assert chosen[0] in ("eager", "onnxruntime", "openvino") and chosen[1] in ("fp32", "bf16")  # resolved
    assert f"auto chose --backend {chosen[0]} --precision {chosen[1]}" in auto.log()
    assert "agrees with eager fp32" in auto.log()  # measured: the trials are in the line
    answers = {name: predict_raw(auto.url, data).json()["predictions"] for name, data in photos.items()}
    auto.stop()
    again = start_server(*common, "--log-level", "info")
    assert f"auto chose --backend {chosen[0]} --precision {chosen[1]}" in again.log()
    assert f"cached in {tmp_path / 'decisions'}" in again.log() and "agrees with" not in again.log()
    again.stop()
    eager = start_server(*common, "--backend", "eager", "--precision", "fp32")
    for name, data in photos.items():
        expected = predict_raw(eager.url, data).json()["predictions"]
        assert answers[name][0]["label"] == expected[0]["label"]
        assert answers[name][0]["probability"] == pytest.approx(expected[0]["probability"], rel=1e-3)
