from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from timmserve.bench.config import BenchConfig
from timmserve.bench.report import to_markdown, write_results
from timmserve.bench.winner import winning_run, write_winner
from timmserve.cli import _bench_config, _serve_config, bench, serve
from timmserve.errors import ConfigError, TimmServeError
from timmserve.settings.config import ServeConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def test_write_results_writes_the_json_only_so_the_report_is_rendered_once(tmp_path):
    path = write_results({"runs": []}, tmp_path / "out")
    assert path == tmp_path / "out" / "results.json" and json.loads(path.read_text()) == {"runs": []}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # `render` writes the rest


def level(concurrency: int, req_per_s: float, **marks: Any) -> dict[str, Any]:
    """A closed-loop level as results.json has it: ±1 req/s over the rounds, unmarked unless `marks` say so."""
    return {
        "mode": "closed",
        "concurrency": concurrency,
        "target_rate": None,
        "req_per_s": req_per_s,
        "req_per_s_min": req_per_s - 1,
        "req_per_s_max": req_per_s + 1,
        "latency_ms": {"p50": 10.0, "p90": 15.0, "p99": 20.0, "max": 25.0},
        "errors": {},
        "timeouts": 0,
        "server_cpu_percent": 50.0,
        "cpu_percent": 60.0,
        "foreign_cpu_percent": 1.0,
        "gpu_percent": None,
        "efficiency": 0.5,
        "efficiency_vs_best": 0.25,
        "client_bound": False,
        "foreign_load": False,
        "too_few": False,
        **marks,
    }


def run(name: str, levels: list[dict[str, Any]], pipeline: float, ceiling_foreign: float = 1.0) -> dict[str, Any]:
    """A run with a one-batch-size ceiling whose pipeline makes `pipeline` img/s."""
    row = {"batch_size": 1, "img_per_s_min": pipeline - 1, "img_per_s_max": pipeline + 1, "measurements": 2}
    accuracy = {"top1_agree": 4, "images": 4, "max_prob_diff": 0.0, "tolerance": 0.001, "ok": True}
    ceiling = {
        "model": [{**row, "img_per_s": pipeline}],
        "pipeline": [{**row, "img_per_s": pipeline}],
        "accuracy": accuracy,
        "foreign_cpu_percent": ceiling_foreign,
        "foreign_load": ceiling_foreign >= 10,
    }
    return {
        "name": name,
        "config": {"backend": "eager", "precision": "fp32"},
        "rounds": 2,
        "ceiling": ceiling,
        "levels": levels,
    }


def results(runs: list[dict[str, Any]]) -> dict[str, Any]:
    env = {
        "cpu": "a CPU", "cpus": 2, "cpu_features": ["avx2"], "memory_gb": 8.0, "device": "a CPU", "python": "3.11",
        "torch": "2", "timm": "1", "litserve": "0.2", "command": "timmserve bench", "started": "today",
    }  # fmt: skip
    model = {"name": "m", "weights": "w", "params": 1_000_000, "input_size": [3, 224, 224]}
    bench = {"rounds": 2, "duration": 4.0, "warmup": 1.0, "ladder_notes": {}}
    return {"env": env, "model": model, "bench": bench, "client_capacity_req_per_s": 1000.0, "runs": runs}


def test_a_marked_level_or_ceiling_is_shown_but_never_compared():
    busy = level(1, 30.0, foreign_load=True, foreign_cpu_percent=37.0)
    runs = [
        run("reference", [level(1, 10.0), level(8, 10.0)], pipeline=50.0),
        run("baseline", [level(1, 12.0), level(8, 10.0, too_few=True)], pipeline=40.0, ceiling_foreign=45.0),
        run("best", [busy, level(8, 40.0)], pipeline=80.0),
    ]
    markdown = to_markdown(results(runs), [])
    differences = markdown.split("## Differences")[1].split("\n## ")[0].splitlines()
    assert differences[-3:] == [
        "- baseline vs reference: c=1: no difference; c=8: not comparable: too few completions during baseline c=8",
        "- best vs baseline: c=1: not comparable: foreign load 37% during best c=1; "
        "c=8: not comparable: too few completions during baseline c=8",
        # best against the naive server too, though not its neighbour in the ladder
        "- best vs reference: c=1: not comparable: foreign load 37% during best c=1; c=8: ×4.00 (faster)",
    ]
    # A marked level keeps its numbers, says why, and gives no efficiency; nor does a rung whose
    # ceiling was measured under foreign load (its efficiency divides by that ceiling).
    marked_row = (
        "| best | c=1 | 30.0 (29.0–31.0) (foreign load 37%) | 10.0 | 20.0 | 50.0 | 60.0 | 37.0 | – | n/c | n/c | 0 |"
    )
    assert _row(markdown, "| best | c=1 |") == marked_row
    assert _row(markdown, "| best | c=8 |").endswith("| 1.0 | – | 50% | 25% | 0 |")
    assert _row(markdown, "| baseline | c=1 |").endswith("| 1.0 | – | n/c | 25% | 0 |")
    assert _row(markdown, "| baseline | 1 |").endswith("| 40.0 (39.0–41.0) | 45.0 (foreign load) |")


def test_vs_best_is_not_comparable_when_the_best_pipeline_ceiling_is_marked():
    markdown = to_markdown(results([run("baseline", [level(1, 10.0)], pipeline=80.0, ceiling_foreign=12.0)]), [])
    assert "| 1.0 | – | n/c | n/c | 0 |" in _row(markdown, "| baseline | c=1 |")


def _row(markdown: str, start: str) -> str:
    [row] = [line for line in markdown.splitlines() if line.startswith(start)]
    return row


def served(name: str, config: ServeConfig, levels: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "config": config.as_dict(), "rounds": 1, "ceiling": None, "levels": levels}


SERVED = ServeConfig(model="test_efficientnet", random_weights=True)


def test_the_winner_is_best_else_the_fastest_unmarked_rung_at_the_highest_concurrency():
    baseline = served("baseline", SERVED.replace(max_batch_size=1), [level(1, 10.0), level(8, 12.0)])
    batching = served("batching", SERVED.replace(max_batch_size=64), [level(1, 9.0), level(8, 30.0)])
    workers = served("workers", SERVED, [level(1, 8.0), level(8, 45.0, client_bound=True)])
    reference = served("reference", SERVED, [level(1, 50.0), level(8, 60.0)])  # not a `timmserve serve` config
    best = served("best", SERVED, [level(1, 5.0, too_few=True), level(8, 6.0, foreign_load=True)])
    assert winning_run(results([baseline, batching, workers, reference, best]))["name"] == "best"
    assert winning_run(results([baseline, batching, workers, reference]))["name"] == "batching"
    batching["levels"][1]["too_few"] = True
    baseline["levels"][1]["foreign_load"] = True
    assert winning_run(results([baseline, batching, workers]))["name"] == "baseline"  # at c=1, all else marked
    for lvl in (baseline, batching, workers):
        lvl["levels"][0]["client_bound"] = True
    with pytest.raises(TimmServeError, match="no winner to write"):
        winning_run(results([baseline, batching, workers, reference]))


@pytest.mark.parametrize(
    ("config", "written"),
    [
        (
            SERVED.replace(max_batch_size=64, workers_per_device=2, backend="onnxruntime", fast_decode=False),
            {"model", "random_weights", "max_batch_size", "workers_per_device", "backend", "fast_decode"},
        ),
        (  # the built-in model: no `model` to write
            ServeConfig(timeout=2.5, cache_dir=Path("/tmp/artifacts"), labels=Path("labels.txt")),
            {"random_weights", "labels", "timeout", "cache_dir"},
        ),
    ],
)
def test_the_written_config_is_what_serve_loads(tmp_path, config, written):
    path = tmp_path / "serve.toml"
    assert write_winner(results([served("decode", config, [level(8, 10.0)])]), path) == "decode"
    ctx = serve.make_context("serve", ["--config", str(path)])
    loaded = _serve_config(ctx, path, {name: value for name, value in ctx.params.items() if name != "config_file"})
    assert loaded == config
    assert set(tomllib.loads(path.read_text())) == written  # model settings always; other defaults never


def test_write_config_is_a_bench_option_and_needs_a_ladder(tmp_path):
    path = tmp_path / "serve.toml"
    assert bench_config("--write-config", str(path)).write_config == path
    with pytest.raises(ConfigError, match="--write-config needs a ladder"):
        bench_config("--write-config", str(path), "--url", "http://127.0.0.1:8000")


def bench_config(*args: str) -> BenchConfig:
    """What `timmserve bench ARGS` would run."""
    ctx = bench.make_context("bench", list(args))
    settings = {k: v for k, v in ctx.params.items() if k not in ("config_file", "knobs", "quick", "no_progress")}
    return _bench_config(ctx, None, (), False, settings)
