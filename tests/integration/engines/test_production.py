"""Production behaviour of a real server on 127.0.0.1: graceful shutdown under load, a worker that
dies, the request timeout, clients that go away, the API key, metrics, request ids and logs."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from PIL import Image

from tests.conftest import DATA, ONE_SLOW_WORKER
from timmserve.bench.process import ServerProcess
from timmserve.engines.litserve.frontend import WATCH_INTERVAL

RAW = {"Content-Type": "application/octet-stream"}
SMALL_MODEL = ("--model", "test_efficientnet", "--random-weights")
JSON_ACCESS_LOG = ("--log-format", "json", "--log-level", "info")
OUTCOMES = ("classified", "rejected", "abandoned")  # of each image a worker takes from the queue
API_KEY_ENV = "TIMMSERVE_TEST_KEY"
API_KEY = "s3cret-key"
WITH_KEY = {"X-API-Key": API_KEY}
QUEUE_LIMIT = 4
# A small model that asks for the API key, logs JSON at info level, and admits QUEUE_LIMIT images.
KEYED = (*SMALL_MODEL, "--api-key-env", API_KEY_ENV, *JSON_ACCESS_LOG, "--max-queue", str(QUEUE_LIMIT))


@pytest.fixture
def keyed_server(start_server, monkeypatch):
    """A server started with KEYED (test_ray_production.py runs the tests that take it on Ray Serve,
    with its own)."""
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    return start_server(*KEYED)


def predict(url: str, data: bytes, client: httpx.Client | None = None, **kwargs) -> httpx.Response:
    return (client or httpx).post(
        f"{url}/predict", content=data, headers={**RAW, **kwargs.pop("headers", {})}, timeout=60, **kwargs
    )


def scrape(url: str, **kwargs) -> dict[str, float]:
    """`/metrics` as {'name{labels}': value}."""
    response = httpx.get(f"{url}/metrics", timeout=10, **kwargs)
    assert response.status_code == 200, response.text
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def logged(server: ServerProcess) -> list[dict]:
    """The server's log entries so far (started with JSON_ACCESS_LOG); on Ray, Ray's own JSON lines
    too (without a "logger")."""
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def predict_access(server: ServerProcess) -> list[dict]:
    """Access-log entries of `POST /predict`, one per request answered."""
    access = [e for e in logged(server) if e.get("logger") == "timmserve.access"]
    return [e for e in access if e["message"].startswith("POST /predict")]


def wait_for(condition, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def session_processes(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.process_iter() if _session(p) == pid]


def _session(process: psutil.Process) -> int | None:
    try:
        return os.getsid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None


def _connection_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def all_admitted(server: ServerProcess, sent: int) -> bool:
    """Each of the `sent` /predict requests is in flight or answered 200: none still connecting or
    in a socket backlog, where a SIGTERM would (rightly) refuse it."""
    metrics = scrape(server.url)
    answered = metrics.get('timmserve_requests_total{endpoint="/predict",status="200"}', 0)
    return metrics["timmserve_in_flight_images"] + answered >= sent


def inference_workers(server: ServerProcess) -> list[psutil.Process]:
    """The server's inference worker processes (spawned by multiprocessing; not its resource tracker)."""
    commands = {p: " ".join(p.cmdline()) for p in psutil.Process(server.pid).children()}
    return [p for p, command in commands.items() if "spawn_main" in command and "resource_tracker" not in command]


@pytest.mark.parametrize("to_group", [False, True], ids=["SIGTERM to the main process", "SIGTERM to the group"])
def test_sigterm_under_load_finishes_in_flight_requests_and_exits_0(start_server, photos, to_group):
    server = start_server("--max-batch-size", "1", "--grace-period", "20", "--log-level", "info", *ONE_SLOW_WORKER)
    sent = 32
    with ThreadPoolExecutor(sent) as pool:
        futures = [pool.submit(_finished_at, predict, server.url, photos["cat"]) for _ in range(sent)]
        assert wait_for(lambda: all_admitted(server, sent), timeout=30), "the requests never queued up"
        signalled = time.monotonic()
        if to_group:  # what Ctrl-C in a terminal or systemd's stop does
            os.killpg(server.pid, signal.SIGTERM)
        else:  # what `docker stop` and Kubernetes do
            os.kill(server.pid, signal.SIGTERM)
        assert wait_for(lambda: _connection_refused(server.port), timeout=20)
        refused_at = time.monotonic()
        responses, finished = zip(*(future.result() for future in futures))
    assert [r.status_code for r in responses] == [200] * sent
    assert refused_at < max(finished)  # new connections were refused while admitted requests still ran
    assert all(r.json()["predictions"][0]["label"] for r in responses)
    assert server.process.wait(timeout=30) == 0
    stopped_in = time.monotonic() - signalled
    assert stopped_in < 20
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=2)
    assert wait_for(lambda: not session_processes(server.pid), timeout=10), session_processes(server.pid)
    log = server.log()
    assert "draining in-flight requests" in log and "stopped" in log


# (signal, to the whole group?, backend): `auto` times its trials (about a minute here), a pinned
# exported backend only exports; both start a runtime's threads before the workers.
FIRST_STOPS = [
    (signal.SIGTERM, False, "auto"), (signal.SIGINT, True, "auto"),
    (signal.SIGTERM, True, "onnxruntime"), (signal.SIGINT, False, "onnxruntime"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("signum", "to_group", "backend"),
    FIRST_STOPS,
    ids=[f"{s.name} to the {'group' if g else 'main process'}, {b}" for s, g, b in FIRST_STOPS],
)
def test_a_first_start_stops_cleanly(start_server, photos, tmp_path, signum, to_group, backend):
    """A first start (empty cache: the backend exported, `auto`'s trials timed) drains and exits 0
    like a second one. Those runtimes' threads in the main process made it die of SIGSEGV on every
    stop signal (Zen 4) and orphaned its children: they now run in a child process, so the main
    process never even maps a runtime's library."""
    server = start_server(*SMALL_MODEL, "--cache-dir", str(tmp_path), "--backend", backend, "--log-level", "info")
    assert list(tmp_path.glob("onnxruntime-*.onnx"))  # this start exported (and `auto` chose from trials)
    runtimes = {m.path for m in psutil.Process(server.pid).memory_maps() if re.search("onnxruntime|openvino", m.path)}
    assert not runtimes, runtimes
    assert predict(server.url, photos["cat"]).status_code == 200
    (os.killpg if to_group else os.kill)(server.pid, signum)
    assert server.process.wait(timeout=30) == 0
    assert wait_for(lambda: not session_processes(server.pid), timeout=10), session_processes(server.pid)
    assert _connection_refused(server.port)


def test_no_process_outlives_a_main_process_that_dies(start_server, photos):
    """Killed without its drain (SIGKILL, a crash), the main process leaves no child behind: the
    manager, the API servers and the workers each notice and exit, and the port is free."""
    server = start_server(*SMALL_MODEL)
    assert predict(server.url, photos["cat"]).status_code == 200
    assert len(session_processes(server.pid)) >= 5  # main, manager, 2 API servers, 2 workers, resource tracker
    os.kill(server.pid, signal.SIGKILL)
    server.process.wait(timeout=10)
    assert wait_for(lambda: not session_processes(server.pid), timeout=10), session_processes(server.pid)
    assert _connection_refused(server.port)


def test_sigterm_answers_or_refuses_every_request(keyed_server, photos):
    answered_or_refused_while_draining(keyed_server, photos, WITH_KEY)


def answered_or_refused_while_draining(server, photos: dict[str, bytes], headers: dict[str, str]) -> None:
    """SIGTERM, what a supervisor sends, under steady load: every request is answered, or refused
    (503 with Retry-After while the port is still open, or the connection refused once it is
    closed), none is cut off; requests in flight at the signal are answered; exit 0, no process
    left. The clients stop at their first refusal, as a client behind a load balancer moves on."""
    outcomes: list[tuple[str, float]] = []  # (outcome, when it completed)
    stopping = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60, headers={**headers, "Content-Type": "image/jpeg"}) as http:
            while not stopping.is_set():
                try:
                    response = http.post(f"{server.url}/predict", content=photos["cat"])
                    outcome = str(response.status_code)
                    if outcome == "503" and not response.headers.get("Retry-After"):
                        outcome = "503 without Retry-After"
                except httpx.ConnectError:
                    outcome = "refused"  # the port was closed: never admitted
                except httpx.TransportError as error:
                    outcome = type(error).__name__  # cut off mid-flight
                outcomes.append((outcome, time.monotonic()))
                if outcome != "200":
                    return

    threads = [threading.Thread(target=client) for _ in range(QUEUE_LIMIT)]  # never over the queue limit
    for thread in threads:
        thread.start()
    assert wait_for(lambda: len(outcomes) >= 16, timeout=60), outcomes  # load flowing
    signalled = time.monotonic()
    assert server.stop(signum=signal.SIGTERM) == 0
    stopping.set()
    for thread in threads:
        thread.join(timeout=60)
    # A connection the kernel completed just before the listening socket closed, which uvicorn never
    # accepted, is reset (ReadError; seen here about once in five runs): never admitted, like a
    # refused one — allowed during the drain only. Requests admitted before the signal must be 200s.
    resets = {"ReadError", "RemoteProtocolError"}
    expected = {"200", "503", "refused"}
    unexpected = [(o, when) for o, when in outcomes if o not in expected and not (o in resets and when >= signalled)]
    assert not unexpected, outcomes
    assert any(outcome == "200" and when > signalled for outcome, when in outcomes), "nothing in flight was answered"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=2)
    # Every process of the server's session, Ray's own (raylet, GCS, replicas) included.
    assert wait_for(lambda: not session_processes(server.pid), timeout=30), session_processes(server.pid)


def test_a_dead_worker_loses_no_request_and_is_reported_at_once(start_server, photos):
    server = start_server("--workers-per-device", "2", "--max-batch-size", "4")
    workers = inference_workers(server)
    assert len(workers) == 2
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                statuses.append(client.post(f"{server.url}/predict", content=photos["cat"], headers=RAW).status_code)

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        assert wait_for(lambda: len(statuses) >= 8, timeout=60)
        workers[0].kill()
        killed_at = time.monotonic()
        health: list[tuple[float, int]] = []

        def recovered() -> bool:
            health.append((time.monotonic() - killed_at, httpx.get(f"{server.url}/health", timeout=10).status_code))
            return 503 in [status for _, status in health] and health[-1][1] == 200

        assert wait_for(recovered, timeout=180, interval=0.1), health  # 503 while replacing, then 200
        first_503 = min(at for at, status in health if status == 503)
        assert first_503 < 1.0, health  # from the moment the death is known (LitServe's monitor: 2 s)
        served_before = statuses.count(200)
        assert wait_for(lambda: statuses.count(200) >= served_before + 8, timeout=60)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert set(statuses) == {200}, statuses  # images on the dead worker went to the live one
    replacement = [p for p in psutil.Process(server.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    assert workers[0].pid not in {p.pid for p in replacement}
    assert re.search(r"inference worker 0 \(pid \d+\) died with exit code -9; starting a replacement", server.log())


def test_a_worker_that_dies_during_the_drain_loses_no_request(start_server, photos):
    # Two slow workers (eager, a full decode of a 12-megapixel photo: a few hundred ms per image),
    # so both still hold images when one is killed after the drain began; every image on a worker.
    server = start_server(
        "--workers-per-device", "2", "--max-batch-size", "1", "--no-fast-decode", "--grace-period", "20",
        "--backend", "eager", "--precision", "fp32", "--log-level", "info", "--no-inline",
    )  # fmt: skip
    large = io.BytesIO()
    Image.open(io.BytesIO(photos["cat"])).resize((4000, 3000)).save(large, "JPEG", quality=90)
    workers = inference_workers(server)
    assert len(workers) == 2
    sent = 16
    with ThreadPoolExecutor(sent) as pool:
        futures = [pool.submit(predict, server.url, large.getvalue()) for _ in range(sent)]
        # All of them admitted before the signal (CI once refused one still connecting, rightly).
        assert wait_for(lambda: all_admitted(server, sent), timeout=30), "the requests never queued up"
        os.kill(server.pid, signal.SIGTERM)
        assert wait_for(lambda: "draining in-flight requests" in server.log(), timeout=10)
        workers[0].kill()
        responses = [future.result() for future in futures]
    assert [r.status_code for r in responses] == [200] * sent  # its images went to the live worker
    assert server.process.wait(timeout=30) == 0
    assert "resubmitting it" in server.log()
    assert wait_for(lambda: not session_processes(server.pid), timeout=10), session_processes(server.pid)


def test_the_request_timeout_answers_504_and_frees_the_slot(start_server, photos):
    timeout = 0.25
    server = start_server("--max-batch-size", "1", "--timeout", str(timeout), *JSON_ACCESS_LOG, *ONE_SLOW_WORKER)
    # More images than the worker classifies in 0.25 s on an idle machine, sent at once (one client:
    # a client per request spends the CPU on its own TLS context first, spreading the burst out).
    sent = 48
    with httpx.Client(limits=httpx.Limits(max_connections=sent)) as client, ThreadPoolExecutor(sent) as pool:
        responses = list(pool.map(lambda _: predict(server.url, photos["cat"], client=client), range(sent)))
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 504} and 504 in statuses, statuses
    assert all("request timeout of 0.25 s" in r.json()["detail"] for r in responses if r.status_code == 504)
    # Timed by the server (its access log), from the request's arrival: what the client measures
    # adds its own threads and the accept queue on a busy machine. A waiting request looks at its
    # deadline at least once per watch interval, so every answer, 200 or 504, comes by then; the
    # second on top is slack for a busy 2-core machine (the worker holds both cores).
    late = timeout + WATCH_INTERVAL + 1.0
    assert wait_for(lambda: len(predict_access(server)) == len(responses), timeout=10)
    for entry in predict_access(server):
        assert entry["duration_ms"] < late * 1000, entry
        if entry["status"] == 504:
            assert entry["duration_ms"] >= timeout * 1000, entry  # never before the deadline
    assert scrape(server.url)["timmserve_in_flight_images"] == 0

    def taken() -> dict[str, float]:
        images = scrape(server.url)
        return {outcome: images.get(f'timmserve_images_total{{outcome="{outcome}"}}', 0) for outcome in OUTCOMES}

    # The worker gets through the backlog, skipping the images whose request was answered 504
    # (not a 200 for a new request: on a busy machine one image may take longer than 0.25 s).
    assert wait_for(lambda: sum(taken().values()) == len(responses), timeout=30), taken()
    assert taken()["abandoned"] > 0 and taken()["rejected"] == 0


def _finished_at(fn, *args) -> tuple[httpx.Response, float]:
    response = fn(*args)
    return response, time.monotonic()


def test_clients_that_disconnect_give_their_slots_back(start_server, photos):
    server = start_server("--max-batch-size", "1", *ONE_SLOW_WORKER)
    request = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(photos['cat'])}\r\n\r\n"
    ).encode()
    # Some hang up halfway through their body, the rest once they are queued: about 2 s of work for
    # this CPU, so many are still waiting when the server notices (at once).
    halfway = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]
    for sock in halfway:
        sock.sendall(request + photos["cat"][:1000])
    queued = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(64)]
    for sock in queued:
        sock.sendall(request + photos["cat"])
    # Hang up once the server holds most of them (reading 72 requests takes a loaded CI box a while).
    assert wait_for(lambda: scrape(server.url)["timmserve_in_flight_images"] >= 32, timeout=20)
    for sock in halfway + queued:
        sock.close()
    assert wait_for(lambda: scrape(server.url)["timmserve_in_flight_images"] == 0, timeout=30)
    # The worker skips the images it takes after their clients left, without classifying them.
    abandoned_total = 'timmserve_images_total{outcome="abandoned"}'
    assert wait_for(lambda: scrape(server.url).get(abandoned_total, 0) > 0, timeout=30)
    metrics = scrape(server.url)
    abandoned = metrics[abandoned_total]
    assert abandoned + metrics.get('timmserve_images_total{outcome="classified"}', 0) <= len(queued)
    answered = {
        name: value
        for name, value in metrics.items()
        if name.startswith('timmserve_requests_total{endpoint="/predict"')
    }
    assert set(answered) <= {f'timmserve_requests_total{{endpoint="/predict",status="{s}"}}' for s in (200, 499)}
    assert sum(answered.values()) == len(halfway) + len(queued)  # 499: logged and counted, never a 500
    assert answered['timmserve_requests_total{endpoint="/predict",status="499"}'] >= len(halfway) + abandoned
    assert predict(server.url, photos["cat"]).status_code == 200


def test_a_client_that_pipelines_and_leaves_frees_every_slot_at_once(start_server, photos):
    # uvicorn tells only a connection's newest request that its client left; the one before it,
    # waiting for its answer, must be told too.
    server = start_server("--max-batch-size", "1", "--timeout", "30", *ONE_SLOW_WORKER)
    [worker] = inference_workers(server)
    request = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(photos['cat'])}\r\n\r\n"
    ).encode() + photos["cat"]
    worker.suspend()  # the first request waits for its answer for as long as this lasts
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(request + request)  # the second pipelined behind the first
            assert wait_for(lambda: scrape(server.url)["timmserve_in_flight_images"] == 1, timeout=10)
        assert wait_for(lambda: scrape(server.url)["timmserve_in_flight_images"] == 0, timeout=5)
    finally:
        worker.resume()
    abandoned = 'timmserve_images_total{outcome="abandoned"}'
    assert wait_for(lambda: scrape(server.url).get(abandoned, 0) == 1, timeout=30)  # skipped, not classified
    assert predict(server.url, photos["cat"]).status_code == 200


def test_api_key_guards_everything_but_the_probes(keyed_server, photos):
    url = keyed_server.url
    missing = predict(url, photos["cat"])
    assert missing.status_code == 401 and "API key" in missing.json()["detail"]
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert predict(url, photos["cat"], headers={"X-API-Key": "s3cret-kex"}).status_code == 401
    assert predict(url, photos["cat"], headers=WITH_KEY).status_code == 200
    assert predict(url, photos["cat"], headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    for path in ("/metrics", "/info", "/v2/models/test_efficientnet"):
        assert httpx.get(f"{url}{path}").status_code == 401, path
    assert scrape(url, headers=WITH_KEY)["timmserve_queue_limit_images"] > 0
    for path in ("/health", "/v2/health/live", "/v2/health/ready", "/"):
        assert httpx.get(f"{url}{path}").status_code == 200, path
    cli = [sys.executable, "-m", "timmserve", "classify", "--url", url, str(DATA / "cat.jpg")]
    denied = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert denied.returncode == 1 and "401" in denied.stderr
    allowed = subprocess.run([*cli, "--api-key-env", API_KEY_ENV], capture_output=True, text=True, timeout=120)
    assert allowed.returncode == 0, allowed.stderr


def test_an_unset_api_key_variable_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("TIMMSERVE_NO_SUCH_KEY", raising=False)
    result = subprocess.run(
        [sys.executable, "-m", "timmserve", "serve", "--api-key-env", "TIMMSERVE_NO_SUCH_KEY"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: --api-key-env TIMMSERVE_NO_SUCH_KEY: that environment variable is unset or empty"
    ]


def test_metrics_move_by_exactly_the_requests_sent(keyed_server, photos):
    url = keyed_server.url
    before = scrape(url, headers=WITH_KEY)
    with ThreadPoolExecutor(4) as pool:
        good = list(pool.map(lambda _: predict(url, photos["cat"], headers=WITH_KEY), range(6)))
    bad = [predict(url, b"not an image", headers=WITH_KEY), predict(url, b"", headers=WITH_KEY)]
    assert [r.status_code for r in good] == [200] * 6 and [r.status_code for r in bad] == [400, 400]
    after = scrape(url, headers=WITH_KEY)

    def moved(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert moved('timmserve_requests_total{endpoint="/predict",status="200"}') == 6
    assert moved('timmserve_requests_total{endpoint="/predict",status="400"}') == 2
    assert moved('timmserve_request_duration_seconds_count{endpoint="/predict"}') == 8
    assert moved('timmserve_images_total{outcome="classified"}') == 6
    assert moved('timmserve_images_total{outcome="rejected"}') == 1  # the empty body never reached a worker
    assert moved("timmserve_queue_wait_seconds_count") == 7
    assert moved("timmserve_batch_size_sum") == 7
    assert 2 <= moved("timmserve_batch_size_count") <= 7
    assert after["timmserve_in_flight_images"] == 0
    assert after["timmserve_queue_limit_images"] == QUEUE_LIMIT
    assert after["timmserve_model_load_seconds"] > 0


def test_request_ids_are_returned_and_logged_as_json(keyed_server, photos):
    server = keyed_server
    given = predict(server.url, photos["cat"], headers={**WITH_KEY, "X-Request-ID": "trace-42.a"})
    assert given.headers.get_list("X-Request-ID") == ["trace-42.a"]
    # Not a sane token: the LitServe engine answers a new id of its own, Ray Serve's proxy this one.
    other = predict(server.url, b"garbage", headers={**WITH_KEY, "X-Request-ID": "no spaces or\tcontrol"})
    [other_id] = other.headers.get_list("X-Request-ID")
    assert other.status_code == 400

    def access_lines() -> dict[str, dict]:
        return {e["request_id"]: e for e in predict_access(server)}

    assert wait_for(lambda: other_id in access_lines(), timeout=10)
    entries, access = logged(server), access_lines()
    assert access["trace-42.a"]["status"] == 200 and access["trace-42.a"]["message"] == "POST /predict 200"
    assert access[other_id]["status"] == 400 and access[other_id]["duration_ms"] > 0
    rejected = [e for e in entries if e.get("request_id") == other_id and e.get("logger") != "timmserve.access"]
    assert rejected and "not an image" in rejected[0]["message"]  # the batch's log line carries the id too


def test_the_batcher_waits_batch_timeout_for_more_images_and_no_longer(start_server, photos):
    # 1 s: a bucket boundary of the queue-wait histogram (metrics.LATENCY_BUCKETS).
    server = start_server("--max-batch-size", "8", "--batch-timeout", "1", *ONE_SLOW_WORKER)
    before = scrape(server.url)

    def send_after(delay: float) -> httpx.Response:
        time.sleep(delay)
        return predict(server.url, photos["cat"])

    # Three images 0.2 s apart: one batch, because the first waits up to 1 s for company.
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(send_after, (0.0, 0.2, 0.4)))
    assert [r.status_code for r in responses] == [200] * 3
    after = scrape(server.url)

    def moved(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert moved("timmserve_batch_size_count") == 1 and moved("timmserve_batch_size_sum") == 3
    # The batch did not fill, so it closed 1 s after the first image was taken: that image waited
    # more than 1 s in the queue. LitServe's stock loop counts the second from when the idle worker
    # last began waiting, so there every image waits 1 s or less.
    waited_over_timeout = moved("timmserve_queue_wait_seconds_count") - moved(
        'timmserve_queue_wait_seconds_bucket{le="1.0"}'
    )
    assert waited_over_timeout >= 1


def test_without_a_timeout_batches_still_form_under_load(start_server, photos):
    server = start_server("--max-batch-size", "16", "--batch-timeout", "0", *ONE_SLOW_WORKER)
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda _: predict(server.url, photos["cat"]), range(48)))
    assert [r.status_code for r in responses] == [200] * 48
    metrics = scrape(server.url)
    # Images queue up while the model runs a batch, so the next batch takes them all at once.
    assert metrics["timmserve_batch_size_sum"] >= 48
    assert metrics["timmserve_batch_size_count"] <= 24
