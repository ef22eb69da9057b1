"""Aggregation: one rung's rounds become its run in results.json (level medians with min–max,
ceiling means with min–max, the accuracy guard's worst round); then each level gets its
efficiency, efficiency vs best and client-bound flag. Plain dicts in, plain dicts out.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from typing import Any

CLIENT_BOUND_SHARE = 0.7  # a level served at ≥ 70% of the client's capacity is client-bound


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
    pipeline = [row["img_per_s"] for run in results["runs"] if run["ceiling"] for row in run["ceiling"]["pipeline"]]
    best_pipeline = max(pipeline, default=None)
    capacity = results["client_capacity_req_per_s"]
    for run in results["runs"]:
        model_ceiling = (
            max((row["img_per_s"] for row in run["ceiling"]["model"]), default=None) if run["ceiling"] else None
        )
        for level in run["levels"]:
            served = level["req_per_s"]
            level["efficiency"] = round(served / model_ceiling, 3) if model_ceiling else None
            level["efficiency_vs_best"] = round(served / best_pipeline, 3) if best_pipeline else None
            level["client_bound"] = bool(capacity and served >= CLIENT_BOUND_SHARE * capacity)


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
    return merged


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


def _median(values: list[float | None]) -> float | None:
    """The median of the values present (a round without a GPU has None), None if none is."""
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None
