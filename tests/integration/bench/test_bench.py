"""`timmserve bench`'s parts against real servers on 127.0.0.1, with a tiny model and short timings."""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import httpx
import psutil
import pytest
import torch
from PIL import Image

from tests.conftest import CAT_LABELS, DATA
from timmserve.bench.ceiling import measure_ceilings
from timmserve.bench.config import BenchConfig
from timmserve.bench.ladder import run_bench
from timmserve.bench.load import LoadSpec, measure_client_capacity, run_level
from timmserve.bench.monitor import Monitor
from timmserve.bench.process import REFERENCE_SERVER, ServerProcess, free_port
from timmserve.bench.report import PLOTS, to_markdown, write_results
from timmserve.bench.winner import write_winner
from timmserve.cli import _serve_config, serve
from timmserve.model.classifier import build_classifier
from timmserve.model.labels import load_labels
from timmserve.model.types import ImageRequest
from timmserve.settings.config import ServeConfig

TINY = ServeConfig(model="test_efficientnet", random_weights=True)


@pytest.fixture(scope="module")
def tiny_server(start_module_server):
    return start_module_server("--model", "test_efficientnet", "--random-weights", "--max-batch-size", "4")


@pytest.fixture
def one_torch_thread():
    """On a machine whose cores are busy, a multi-threaded forward pass waits for its slowest thread
    and slows down far more than a single-threaded decode does; with one thread each, both slow
    down alike and a comparison of the two measures their work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ceilings_are_positive_and_ordered(photos, one_torch_thread):
    # The pipeline does the model's work plus decoding and preprocessing: at each batch size it is
    # slower than the model, so its best rate is below the model's best. Decoding here is a full
    # decode of a 6-megapixel JPEG, many times this tiny model's forward pass. A busy machine only
    # ever slows a measurement down, so each kind's best over a few repeats is close to its
    # undisturbed rate.
    serve = TINY.replace(fast_decode=False, decode_threads=1)
    classifier, _ = build_classifier(serve, load_labels(1000), torch.device("cpu"))
    image = enlarged(photos["cat"], (3000, 2000))
    best = {"model": 0.0, "pipeline": 0.0}
    for _ in range(3):
        ceilings = measure_ceilings(classifier, [image], [1, 4], duration=0.3)
        for kind in best:
            assert [row["batch_size"] for row in ceilings[kind]] == [1, 4]
            assert all(row["img_per_s"] > 0 for row in ceilings[kind])
            best[kind] = max(best[kind], *(row["img_per_s"] for row in ceilings[kind]))
    assert best["pipeline"] < best["model"], best


def enlarged(jpeg: bytes, size: tuple[int, int]) -> bytes:
    """The photo resized to `size` (width, height), as a JPEG."""
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("RGB").resize(size).save(out, "JPEG", quality=90)
    return out.getvalue()


def test_open_loop_counts_add_up_with_a_known_share_of_errors(tiny_server, photos):
    spec = LoadSpec(
        url=f"{tiny_server.url}/predict", bodies=(photos["cat"], b"not an image"), duration=2.0, warmup=0.5, rate=15
    )
    stats = run_level(spec)
    assert stats.sent == stats.ok + sum(stats.errors.values()) + stats.timeouts
    assert stats.requests_total == stats.warmup_requests + stats.sent + stats.after_window_requests
    assert set(stats.errors) == {"400"}
    assert abs(stats.ok - stats.errors["400"]) <= 3  # bodies alternate good, bad
    assert len(stats.latencies_ms) == stats.ok
    summary = stats.summary()
    assert summary["req_per_s"] == pytest.approx(stats.ok / 2.0)
    assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"] <= summary["latency_ms"]["max"]


def test_closed_loop_in_two_client_processes(tiny_server, photos):
    spec = LoadSpec(url=f"{tiny_server.url}/predict", bodies=(photos["cat"],), duration=1.0, warmup=0.3, concurrency=3)
    stats = run_level(spec, processes=2)
    assert stats.ok > 0 and stats.sent == stats.ok and not stats.errors
    assert stats.requests_total == stats.warmup_requests + stats.sent + stats.after_window_requests
    assert stats.warmup_requests > 0  # the warm-up ran, in both processes
    assert stats.summary()["req_per_s"] == pytest.approx(stats.ok / 1.0)


def test_every_request_is_accounted_for_when_nothing_answers(photos):
    spec = LoadSpec(url=f"http://127.0.0.1:{free_port()}/predict", bodies=(photos["cat"],), duration=0.5, concurrency=2)
    stats = run_level(spec)
    assert stats.sent > 0 and stats.ok == 0
    assert stats.errors["connection"] + stats.timeouts == stats.sent
    assert stats.summary()["latency_ms"]["p50"] is None


def test_client_capacity_is_measured(photos):
    assert measure_client_capacity(photos["cat"], concurrency=4, duration=0.5) > 50


def test_monitor_samples_the_server_tree(tiny_server, photos):
    spec = LoadSpec(url=f"{tiny_server.url}/predict", bodies=(photos["cat"],), duration=1.0, concurrency=2)
    with Monitor(tiny_server.pid, interval=0.1) as monitor:
        run_level(spec)
    summary = monitor.summary()
    assert summary["samples"] >= 5
    assert 0 < summary["server_cpu_percent"] <= 100
    assert 0 < summary["cpu_percent"] <= 100
    assert summary["client_cpu_percent"] is not None
    assert summary["foreign_cpu_percent"] >= 0
    assert summary["gpu_percent"] is None  # no GPU here


@contextmanager
def foreign_busy_process(seconds: float = 180) -> Iterator[psutil.Process]:
    """A busy loop for at most `seconds`, outside this process's tree: a shell starts it in the
    background and exits, so the bench does not count it as its own load generator. Killed by its
    PID (psutil checks it is still the same process)."""
    loop = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"
    shell = f"{shlex.quote(sys.executable)} -c {shlex.quote(loop)} >/dev/null 2>&1 & echo $!"
    busy = psutil.Process(int(subprocess.run(["sh", "-c", shell], capture_output=True, text=True, check=True).stdout))
    try:
        yield busy
    finally:
        with suppress(psutil.NoSuchProcess):  # its own time limit may have ended it
            busy.kill()


def test_a_ladder_run_beside_a_busy_process_is_marked_foreign_load():
    # The busy loop wants a whole core, 50 % of this 2-core machine; even sharing the cores with the
    # server and the load generator, its share stays well over the 10 % line (a fifth of a core).
    with foreign_busy_process() as busy:
        assert busy.pid not in {p.pid for p in psutil.Process().children(recursive=True)}
        config = BenchConfig(
            serve=TINY,
            ladder=("baseline",),
            rounds=1,
            concurrency=(2,),
            duration=1.5,
            warmup=0.3,
            ceiling_duration=0.5,
            ceiling_batch_sizes=(1,),
        )
        results = run_bench(config, progress=False, log=lambda line: None)
    [run] = results["runs"]
    [level] = run["levels"]
    assert level["foreign_load"] is True and level["foreign_cpu_percent"] >= 10, level
    assert run["ceiling"]["foreign_load"] is True, run["ceiling"]
    markdown = to_markdown(results, [])
    assert f"(foreign load {level['foreign_cpu_percent']:.0f}%" in markdown
    assert "(foreign load) |" in markdown  # the ceiling's row


def test_a_rung_that_fails_is_reported_and_the_ladder_goes_on():
    # A rung that cannot start (here its model does not exist; on a GPU, a CUDA error) must not
    # lose the other rungs' measurements, nor be retried in the next round.
    config = BenchConfig(
        serve=TINY,
        ladder=("baseline", "broken"),
        rung_overrides={"broken": {"model": "no_such_model"}},
        rounds=2,
        concurrency=(1,),
        duration=0.5,
        warmup=0.1,
        ceiling_duration=0.1,
        ceiling_batch_sizes=(1,),
    )
    log: list[str] = []
    results = run_bench(config, progress=False, log=log.append)
    assert [run["name"] for run in results["runs"]] == ["baseline"]
    assert results["runs"][0]["rounds"] == 2 and results["runs"][0]["levels"][0]["ok"] > 0
    [reason] = results["bench"]["ladder_notes"]["failed"].values()
    assert "no_such_model" in reason and sum("rung broken failed" in line for line in log) == 1
    assert f"- Rung broken failed, not measured: {reason}" in to_markdown(results, [])


def test_the_reference_server_answers_as_the_served_rungs_do(photos):
    # The built-in model (real weights), so that the cat photo has a meaningful top-1; the served
    # rungs' workers answer with this same classifier (the contract suite checks that path), built
    # here in process to spare this busy machine a second server.
    config = ServeConfig(workers_per_device=2, log_level="warning")
    classifier, _ = build_classifier(config, load_labels(1000), torch.device("cpu"))
    [expected, rejected] = classifier.classify([ImageRequest(photos["cat"], config.top_k), ImageRequest(b"nope", 5)])
    with ServerProcess.from_config(config, program=REFERENCE_SERVER) as reference:
        assert len(psutil.Process(reference.pid).children(recursive=True)) >= 2  # uvicorn's workers
        answer = httpx.post(f"{reference.url}/predict", content=photos["cat"], headers={"Content-Type": "image/jpeg"})
        bad = httpx.post(f"{reference.url}/predict", content=b"nope", headers={"Content-Type": "image/jpeg"})
    assert answer.status_code == 200
    [top1, *_] = answer.json()["predictions"]
    assert top1["label"] == expected[0].label and top1["label"] in CAT_LABELS
    assert top1["probability"] == pytest.approx(expected[0].probability, abs=1e-4)
    assert (bad.status_code, bad.json()) == (rejected.status_code, {"detail": rejected.detail})  # the same 400


@pytest.fixture(scope="module")
def bench_results(tmp_path_factory):
    config = BenchConfig(
        serve=TINY.replace(cache_dir=tmp_path_factory.mktemp("artifacts")),  # `best` resolves --backend auto
        ladder=("reference", "baseline", "best"),
        rounds=2,
        concurrency=(1, 2),
        rates=(5.0,),
        duration=0.6,
        warmup=0.2,
        ceiling_duration=0.1,
        ceiling_batch_sizes=(1, 2),
        images=DATA,
    )
    out = tmp_path_factory.mktemp("bench")
    log: list[str] = []
    results = run_bench(config, progress=False, log=log.append)
    return results, write_results(results, out), log


def test_ladder_writes_the_design_fields(bench_results):
    results, path, log = bench_results
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(results))
    assert {"python", "torch", "timm", "litserve", "device", "cpus"} <= set(saved["env"])
    assert saved["model"]["name"] == "test_efficientnet" and saved["model"]["input_size"] == [3, 160, 160]
    assert saved["client_capacity_req_per_s"] > 0
    assert [run["name"] for run in saved["runs"]] == ["reference", "baseline", "best"]
    for run in saved["runs"]:
        assert run["rounds"] == 2
        assert run["config"]["model"] == "test_efficientnet"
        assert all(row["img_per_s"] > 0 for row in run["ceiling"]["model"] + run["ceiling"]["pipeline"])
        assert [(lvl["mode"], lvl["concurrency"], lvl["target_rate"]) for lvl in run["levels"]] == [
            ("closed", 1, None),
            ("closed", 2, None),
            ("open", None, 5.0),
        ]
        for level in run["levels"]:
            assert level["sent"] == level["ok"] + sum(level["errors"].values()) + level["timeouts"]
            assert level["requests_total"] == level["warmup_requests"] + level["sent"] + level["after_window_requests"]
            assert level["req_per_s_min"] <= level["req_per_s"] <= level["req_per_s_max"]
            assert {"p50", "p90", "p99"} <= set(level["latency_ms"])
            assert level["efficiency"] > 0 and level["efficiency_vs_best"] > 0
            assert level["client_bound"] is False
            assert level["gpu_percent"] is None and level["cpu_percent"] is not None
            # Measured, not asserted low: other programs on a shared machine may well be busy.
            assert level["foreign_cpu_percent"] >= 0 and isinstance(level["foreign_load"], bool)
            assert isinstance(level["too_few"], bool)
        assert run["ceiling"]["foreign_cpu_percent"] >= 0 and isinstance(run["ceiling"]["foreign_load"], bool)
    reference, baseline, best = saved["runs"]
    assert (reference["config"]["engine"], reference["config"]["max_batch_size"]) == ("reference", 1)
    # Round 1 in ladder order: the reference rung on its own server, the others on `timmserve serve`.
    servers = [line.split(" server: ")[1].split(" on ")[0] for line in log if " server: " in line]
    assert servers[:3] == ["python -m timmserve.bench.reference"] + ["python -m timmserve serve"] * 2
    assert "reference" not in saved["bench"]["ladder_notes"]["from"]
    assert baseline["config"]["max_batch_size"] == 1 and baseline["config"]["decode_threads"] == 1
    assert best["config"]["max_batch_size"] == 64  # best combines the rungs not measured to lose
    assert best["config"]["backend"] in ("eager", "onnxruntime", "openvino")  # auto, resolved once
    assert all(run["ceiling"]["accuracy"]["ok"] for run in saved["runs"])
    assert [row["batch_size"] for row in baseline["ceiling"]["model"]] == [1]  # capped by max batch size


def test_report_renders_from_a_saved_file(bench_results):
    _, path, _ = bench_results
    for name in ("results.md", *PLOTS):
        (path.parent / name).unlink(missing_ok=True)
    result = subprocess.run([sys.executable, "-m", "timmserve", "report", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    markdown = (path.parent / "results.md").read_text()
    assert "| baseline | c=1 |" in markdown and "| best | 5 req/s open |" in markdown
    assert "| reference | c=2 |" in markdown and "- best vs reference: c=1: " in markdown
    assert "## Accuracy guard" in markdown and "| baseline | eager | fp32 | 4/4 |" in markdown
    assert "best vs baseline" in markdown
    for name in PLOTS:
        assert (path.parent / name).read_bytes().startswith(b"\x89PNG")


def test_the_winner_is_written_as_the_config_serve_loads(bench_results, tmp_path):
    results, _, _ = bench_results
    path = tmp_path / "serve.toml"
    assert write_winner(results, path) == "best"
    ctx = serve.make_context("serve", ["--config", str(path)])
    loaded = _serve_config(ctx, path, {name: value for name, value in ctx.params.items() if name != "config_file"})
    assert loaded == ServeConfig.from_mapping(results["runs"][-1]["config"])
