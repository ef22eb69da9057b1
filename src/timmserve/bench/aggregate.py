"""Aggregation: one rung's rounds become its run in results.json (level medians with min–max,
ceiling means with min–max, the accuracy guard's worst round, the flags that make a level or a
ceiling not comparable); then each level gets its efficiency, efficiency vs best and client-bound
flag. Plain dicts in, plain dicts out.

A flagged level's rate is not the server's number on a machine of its own: the report shows it
marked and draws no comparison from it. The flags:
- client_bound: served at ≥ CLIENT_BOUND_SHARE of what the load generator alone can send;
- foreign_load (levels and ceilings): processes that are neither the server, nor the load
  generator, nor the bench used ≥ FOREIGN_LOAD_SHARE % of the machine in some round;
- too_few: in some round, fewer than MIN_COMPLETIONS completed requests, or a window shorter than
  MIN_WINDOW_LATENCIES × the p50 latency.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from typing import Any

CLIENT_BOUND_SHARE = 0.7  # a level served at ≥ 70% of the client's capacity is client-bound
# % of the machine. The runs in docs/ leave 0–2 % unexplained at all but one of their 58 levels, so
# 10 % is clear of sampling noise; on 2 cores it is a fifth of a core taken from a saturated server.
FOREIGN_LOAD_SHARE = 10.0
# A closed-loop sender completes about window ÷ latency requests and the one in flight at each end
# of the window falls in or out of it, so a round's rate is uncertain by about latency ÷ window; a
# batching server answers in bursts of a batch, whose time is about the p50 latency. 5 latencies
# bound that at about 20 %; under 20 completions, each one more or less moves the rate by over 5 %.
MIN_WINDOW_LATENCIES = 5
MIN_COMPLETIONS = 20


def aggregate_rung(name: str, config: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One rung over its rounds (at least one), as results.json's run: `config` as given, each
    level the median of its rounds, the ceiling (None when none was measured) the mean per batch
    size. A round is {"ceiling_before", "ceiling_after", "levels"}: ceilings as `measure_ceilings`
    returns them (img/s) plus "accuracy", levels as the load and monitor summarise them (req/s,
    ms, %), in the same order in every round."""
    levels = [_aggregate_level([r["levels"][i] for r in rounds]) for i in range(len(rounds[0]["levels"]))]
    ceiling = _aggregate_ceiling(rounds) if rounds[0]["ceiling_before"] is not None else None
    return {"name": name, "config": config, "rounds": len(rounds), "ceiling": ceiling, "levels": levels}


def add_efficiency(results: dict[str, Any]) -> None:
    """Adds to every level of every run, in place (one image per request: req/s over img/s):
    - efficiency: served req/s ÷ the run's best model ceiling in img/s (batch sizes up to its max
      batch size); None for a run without a ceiling;
    - efficiency_vs_best: served req/s ÷ the best pipeline ceiling in img/s of any run; None when
      no run has one;
    - client_bound: served at ≥ CLIENT_BOUND_SHARE × client_capacity_req_per_s, what the load
      generator alone can send."""
    source = best_pipeline_run(results["runs"])
    best_pipeline = _best_rate(source["ceiling"]["pipeline"]) if source else None
    capacity = results["client_capacity_req_per_s"]
    for run in results["runs"]:
        model_ceiling = _best_rate(run["ceiling"]["model"]) if run["ceiling"] else None
        for level in run["levels"]:
            served = level["req_per_s"]
            level["efficiency"] = round(served / model_ceiling, 3) if model_ceiling else None
            level["efficiency_vs_best"] = round(served / best_pipeline, 3) if best_pipeline else None
            level["client_bound"] = bool(capacity and served >= CLIENT_BOUND_SHARE * capacity)


def best_pipeline_run(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run with the best pipeline ceiling, which efficiency vs best divides by; None when no
    run has a ceiling."""
    measured = [run for run in runs if run["ceiling"]]
    return max(measured, key=lambda run: _best_rate(run["ceiling"]["pipeline"]), default=None)


def flags(level: dict[str, Any]) -> list[str]:
    """Why a level's req/s is not comparable, in words for the report; empty when it is. (A
    results.json written before a flag existed lacks it: not flagged.)"""
    reasons = ["client-bound"] if level.get("client_bound") else []
    if level.get("foreign_load"):
        reasons.append(f"foreign load {level['foreign_cpu_percent']:.0f}%")
    if level.get("too_few"):
        reasons.append("too few completions")
    return reasons


def _best_rate(rows: list[dict[str, Any]]) -> float:
    """The most img/s over a ceiling's batch sizes."""
    return max(row["img_per_s"] for row in rows)


def _aggregate_ceiling(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kind and batch size, the mean of every measurement (before each round; after it, at the
    best batch sizes) with min–max; the accuracy guard's worst round."""
    ceiling: dict[str, Any] = {}
    for kind in ("model", "pipeline"):
        by_size: dict[int, list[float]] = {}
        for r in rounds:
            for row in r["ceiling_before"][kind] + r["ceiling_after"][kind]:
                by_size.setdefault(row["batch_size"], []).append(row["img_per_s"])
        ceiling[kind] = [
            {**_spread({"batch_size": size}, values, "img_per_s", statistics.fmean), "measurements": len(values)}
            for size, values in sorted(by_size.items())
        ]
    # The guard's worst round: every measurement of the rung must agree.
    guards = [r[when]["accuracy"] for r in rounds for when in ("ceiling_before", "ceiling_after")]
    ceiling["accuracy"] = min(guards, key=lambda g: (g["ok"], g["top1_agree"], -g["max_prob_diff"]))
    # A ceiling is the mean of its measurements: one taken under foreign load moves it.
    foreign = _worst([r[when]["foreign_cpu_percent"] for r in rounds for when in ("ceiling_before", "ceiling_after")])
    ceiling.update(foreign_cpu_percent=foreign, foreign_load=_foreign_load(foreign))
    return ceiling


def _aggregate_level(per_round: list[dict[str, Any]]) -> dict[str, Any]:
    """One level over the rounds: counts summed, rate, latencies and resources the median."""
    first = per_round[0]
    errors: Counter = Counter()
    for level in per_round:
        errors.update(level["errors"])
    merged = {
        "mode": first["mode"],
        "concurrency": first["concurrency"],
        "target_rate": first["target_rate"],
        "duration_s": round(sum(level["duration_s"] for level in per_round), 3),
        "sent": sum(level["sent"] for level in per_round),
        "ok": sum(level["ok"] for level in per_round),
        "errors": dict(sorted(errors.items())),
        "timeouts": sum(level["timeouts"] for level in per_round),
        **{
            key: sum(level[key] for level in per_round)
            for key in ("warmup_requests", "after_window_requests", "requests_total")
        },
        "latency_ms": {
            key: _median([level["latency_ms"][key] for level in per_round]) for key in ("p50", "p90", "p99", "max")
        },
    }
    merged = _spread(merged, [level["req_per_s"] for level in per_round], "req_per_s", statistics.median)
    for key in ("cpu_percent", "server_cpu_percent", "client_cpu_percent", "gpu_percent", "gpu_memory_mb"):
        merged[key] = _median([level[key] for level in per_round])
    # The median rate takes every round into account: one round measured badly flags the level.
    merged["foreign_cpu_percent"] = _worst([level["foreign_cpu_percent"] for level in per_round])
    merged["foreign_load"] = _foreign_load(merged["foreign_cpu_percent"])
    merged["too_few"] = any(_too_few(level) for level in per_round)
    return merged


def _too_few(level: dict[str, Any]) -> bool:
    """One round's level: fewer than MIN_COMPLETIONS answers, or a window (s) shorter than
    MIN_WINDOW_LATENCIES × its p50 latency (ms)."""
    p50 = level["latency_ms"]["p50"]
    short = p50 is not None and level["duration_s"] * 1000 < MIN_WINDOW_LATENCIES * p50
    return level["ok"] < MIN_COMPLETIONS or short


def _foreign_load(percent: float | None) -> bool:
    return percent is not None and percent >= FOREIGN_LOAD_SHARE


def _spread(
    row: dict[str, Any], values: list[float], key: str, center: Callable[[list[float]], float]
) -> dict[str, Any]:
    """row + key (its `center` over the values: the median of rounds of load, the mean of a
    ceiling's measurements) + key_min and key_max."""
    return {
        **row,
        key: round(center(values), 2),
        f"{key}_min": round(min(values), 2),
        f"{key}_max": round(max(values), 2),
    }


def _worst(values: list[float | None]) -> float | None:
    """The largest of the values present, None if none is (a `--url` run knows no foreign CPU)."""
    return max((v for v in values if v is not None), default=None)


def _median(values: list[float | None]) -> float | None:
    """The median of the values present (a round without a GPU has None), None if none is."""
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None
