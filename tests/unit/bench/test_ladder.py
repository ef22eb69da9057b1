from __future__ import annotations

import pytest

import timmserve.bench.rungs as rungs_module
from timmserve.bench.config import BenchConfig
from timmserve.bench.load import LoadSpec
from timmserve.bench.report import verdict
from timmserve.bench.rungs import Ladder
from timmserve.errors import ConfigError
from timmserve.settings.config import ServeConfig

BASE = ServeConfig(model="test_efficientnet", random_weights=True, top_k=3)


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(rungs_module, "cpu_features", lambda: ["avx2", "avx512_bf16"])


@pytest.fixture
def avx2_cpu(monkeypatch):
    monkeypatch.setattr(rungs_module, "cpu_features", lambda: ["avx2"])


def test_rungs_are_cumulative_on_top_of_the_shared_settings(bf16_cpu):
    ladder = Ladder(BenchConfig(serve=BASE), "cpu")
    baseline, batching, workers = (ladder.config(n) for n in ("baseline", "batching", "workers"))
    assert (baseline.max_batch_size, baseline.workers_per_device, baseline.decode_threads) == (1, 1, 1)
    assert (batching.max_batch_size, batching.workers_per_device) == (64, 1)
    assert (workers.max_batch_size, workers.workers_per_device) == (64, 2)
    assert ladder.config("precision").precision == "bf16"
    assert (baseline.backend, baseline.fast_decode) == ("eager", False)  # the original deployment
    assert (ladder.config("backend").backend, ladder.config("decode").fast_decode) == ("auto", True)
    assert all(
        ladder.config(n).top_k == 3 and ladder.config(n).model == "test_efficientnet"
        for n in ladder.names
        if n != "best"
    )


def test_best_is_the_fastest_rung_plus_what_was_not_measured(bf16_cpu):
    ladder = Ladder(BenchConfig(serve=BASE), "cpu")
    with pytest.raises(RuntimeError):
        ladder.config("best")
    # decode came after the fastest rung (backend): left out; whatever came before stays, batching
    # and precision included although each was slower than the rung before it.
    peaks = {"baseline": 10.0, "batching": 9.0, "workers": 20.5, "precision": 18.0, "backend": 60.0, "decode": 58.2}
    ladder.decide_best(peaks)
    assert ladder.best_from == ["batching", "workers", "precision", "backend"]
    assert ladder.best_left_out == ["decode"]
    best = ladder.config("best")
    assert (best.max_batch_size, best.workers_per_device, best.precision, best.decode_threads) == (64, 2, "bf16", 1)
    assert (best.backend, best.fast_decode) == ("auto", False)  # the run resolves auto before serving it
    only_baseline = Ladder(BenchConfig(serve=BASE, ladder=("baseline", "best")), "cpu")
    only_baseline.decide_best({"baseline": 10.0})  # nothing measured against: every rung's knobs
    assert only_baseline.best_from == ["batching", "workers", "precision", "backend", "decode"]


def test_precision_is_skipped_without_native_bf16(avx2_cpu):
    ladder = Ladder(BenchConfig(serve=BASE), "cpu")
    assert "precision" not in ladder.names and "precision" in ladder.skipped
    ladder.decide_best({})
    assert ladder.config("best").precision == "fp32"
    assert Ladder(BenchConfig(serve=BASE), "cuda").config("precision").precision == "fp16"


def test_config_file_rungs_override_and_extend(avx2_cpu):
    overrides = {"batching": {"max_batch_size": 16}, "tiny_batches": {"max_batch_size": 4}}
    config = BenchConfig(serve=BASE, ladder=("baseline", "batching", "tiny_batches"), rung_overrides=overrides)
    ladder = Ladder(config, "cpu")
    assert ladder.config("batching").max_batch_size == 16
    assert ladder.config("tiny_batches").max_batch_size == 4
    with pytest.raises(ConfigError, match="unknown rung 'nope'"):
        Ladder(BenchConfig(serve=BASE, ladder=("baseline", "nope")), "cpu")


def test_verdict_says_no_difference_inside_the_spread():
    a = {"req_per_s": 10.0, "req_per_s_min": 9.0, "req_per_s_max": 11.0}
    assert verdict(a, {"req_per_s": 10.8, "req_per_s_min": 10.5, "req_per_s_max": 12.0}) == "no difference"
    assert verdict(a, {"req_per_s": 15.0, "req_per_s_min": 14.0, "req_per_s_max": 16.0}) == "×1.50 (faster)"
    assert verdict(a, {"req_per_s": 5.0, "req_per_s_min": 4.0, "req_per_s_max": 6.0}) == "×0.50 (slower)"


def test_load_is_shared_between_client_processes():
    spec = LoadSpec(url="http://127.0.0.1:1/predict", bodies=(b"x",), duration=1, concurrency=7)
    assert [spec.share(i, 3).concurrency for i in range(3)] == [3, 2, 2]
    open_spec = LoadSpec(url="http://127.0.0.1:1/predict", bodies=(b"x",), duration=1, rate=9.0)
    assert open_spec.share(1, 3).rate == 3.0
    with pytest.raises(ValueError):
        LoadSpec(url="u", bodies=(b"x",), duration=1)


def test_the_ray_rung_serves_the_rungs_before_it_on_ray_and_is_never_in_best(avx2_cpu):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    ladder = Ladder(BenchConfig(serve=BASE, ladder=("batching", "workers", "ray", "best")), "cpu")
    ray = ladder.config("ray")
    assert (ray.engine, ray.max_batch_size, ray.workers_per_device) == ("ray", 64, 2)
    assert ladder.config("workers").engine == "litserve"
    ladder.decide_best({"batching": 10.0, "workers": 20.0, "ray": 40.0})
    assert "ray" not in ladder.best_from + ladder.best_left_out
    assert ladder.config("best").engine == "litserve"


def test_the_reference_rung_serves_the_rungs_before_it_without_batching_and_is_never_in_best(avx2_cpu):
    first = Ladder(BenchConfig(serve=BASE, ladder=("reference", "baseline", "batching", "workers", "best")), "cpu")
    assert first.config("reference") == first.config("baseline")  # first in the ladder: baseline's knobs
    later = Ladder(BenchConfig(serve=BASE, ladder=("baseline", "batching", "workers", "reference", "decode")), "cpu")
    reference = later.config("reference")
    assert (reference.max_batch_size, reference.workers_per_device, reference.top_k) == (1, 2, 3)
    assert later.config("decode").max_batch_size == 64  # its knob is its own: the rungs after it still batch
    first.decide_best({"reference": 100.0, "baseline": 10.0, "batching": 20.0, "workers": 15.0})
    assert "reference" not in first.best_from + first.best_left_out
    assert first.best_left_out == ["workers"] and first.config("best").max_batch_size == 64


def test_the_default_rung_is_serve_as_it_comes_never_part_of_best():
    ladder = Ladder(BenchConfig(serve=BASE, ladder=("baseline", "workers", "default", "best")), "cpu")
    assert ladder.config("default") == BASE  # no baseline knobs: the machine rule and auto decide
    ladder.decide_best({"baseline": 10.0, "workers": 20.0, "default": 99.0})
    assert "default" not in ladder.best_from and ladder.config("best").workers_per_device == 2


def test_right_after_default_the_reference_rung_serves_defaults_configuration():
    # `--ladder default,reference`: serve as it comes against the naive server on the same runtime.
    ladder = Ladder(BenchConfig(serve=BASE, ladder=("baseline", "default", "reference")), "cpu")
    assert ladder.config("reference") == BASE.replace(max_batch_size=1)
    before_default = Ladder(BenchConfig(serve=BASE, ladder=("baseline", "reference", "default")), "cpu")
    assert before_default.config("reference") == ladder.config("baseline").replace(max_batch_size=1)


def test_gpu_decode_is_a_rung_on_cuda_only_and_overlap_never_joins_best():
    on_cpu = Ladder(BenchConfig(serve=BASE), "cpu")
    assert "CUDA" in on_cpu.skipped["gpu-decode"]
    on_cpu.decide_best({})
    assert not on_cpu.config("best").gpu_decode
    on_gpu = Ladder(BenchConfig(serve=BASE), "cuda")
    # False, not None: None is on with CUDA and fast decode (machine.resolve_gpu_decode).
    assert on_gpu.config("decode").gpu_decode is False and on_gpu.config("gpu-decode").gpu_decode
    # --overlap lost on the H200, so `best` does not add it unmeasured.
    on_gpu.decide_best({})
    assert on_gpu.config("best").gpu_decode and not on_gpu.config("best").overlap
