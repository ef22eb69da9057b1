"""Aggregation over made-up rounds; every expected number is worked out by hand in a comment."""

from __future__ import annotations

from typing import Any

from timmserve.bench.aggregate import add_efficiency, aggregate_rung, flags


def level(
    req_per_s: float,
    p50: float,
    cpu: float,
    gpu: float | None,
    errors: dict[str, int],
    foreign: float | None = 1.0,
) -> dict[str, Any]:
    """One closed-loop level at c=8 as one round measures it: 2 s, sent = ok + errors."""
    ok = round(req_per_s * 2)
    return {
        "mode": "closed",
        "concurrency": 8,
        "target_rate": None,
        "duration_s": 2.0,
        "sent": ok + sum(errors.values()),
        "ok": ok,
        "errors": errors,
        "timeouts": 0,
        "warmup_requests": 5,
        "after_window_requests": 1,
        "requests_total": 6 + ok + sum(errors.values()),
        "req_per_s": req_per_s,
        "latency_ms": {"p50": p50, "p90": 2 * p50, "p99": 3 * p50, "max": 4 * p50},
        "cpu_percent": cpu,
        "server_cpu_percent": cpu / 2,
        "client_cpu_percent": None,
        "foreign_cpu_percent": foreign,
        "gpu_percent": gpu,
        "gpu_memory_mb": None,
    }


def rows(img_per_s: dict[int, float]) -> list[dict[str, Any]]:
    return [{"batch_size": size, "img_per_s": rate} for size, rate in img_per_s.items()]


def ceiling(
    model: dict[int, float], pipeline: dict[int, float], top1: int, ok: bool = True, foreign: float | None = 1.0
) -> dict[str, Any]:
    accuracy = {"top1_agree": top1, "images": 4, "max_prob_diff": 0.0005, "tolerance": 0.001, "ok": ok}
    return {"model": rows(model), "pipeline": rows(pipeline), "accuracy": accuracy, "foreign_cpu_percent": foreign}


def test_a_level_is_the_median_of_its_rounds_and_counts_are_summed():
    rounds = [
        {"ceiling_before": None, "ceiling_after": None, "levels": [level(10.0, 100.0, 50.0, None, {"503": 1})]},
        {"ceiling_before": None, "ceiling_after": None, "levels": [level(14.0, 80.0, 70.0, 30.0, {"400": 1})]},
        {"ceiling_before": None, "ceiling_after": None, "levels": [level(11.0, 96.0, 56.0, 50.0, {"503": 2})]},
    ]
    run = aggregate_rung("batching", {"max_batch_size": 64}, rounds)
    assert (run["name"], run["config"], run["rounds"], run["ceiling"]) == ("batching", {"max_batch_size": 64}, 3, None)
    [merged] = run["levels"]
    # req/s: median(10, 14, 11) = 11 (the mean would be 11.67), spread 10–14.
    assert (merged["req_per_s"], merged["req_per_s_min"], merged["req_per_s_max"]) == (11.0, 10.0, 14.0)
    # p50: median(100, 80, 96) = 96 ms (mean 92); p99 = 3 × p50: median(300, 240, 288) = 288.
    assert (merged["latency_ms"]["p50"], merged["latency_ms"]["p99"]) == (96.0, 288.0)
    # CPU: median(50, 70, 56) = 56 %, server half of it; GPU: the rounds that have it,
    # median(30, 50) = 40; none has GPU memory: None.
    assert (merged["cpu_percent"], merged["server_cpu_percent"]) == (56.0, 28.0)
    assert (merged["gpu_percent"], merged["gpu_memory_mb"]) == (40.0, None)
    # Counts add up over the rounds: ok = 20 + 28 + 22, errors by status, 3 × 2 s.
    assert (merged["ok"], merged["sent"], merged["duration_s"]) == (70, 74, 6.0)
    assert merged["errors"] == {"400": 1, "503": 3}
    assert (merged["warmup_requests"], merged["requests_total"]) == (15, 92)
    assert (merged["mode"], merged["concurrency"], merged["target_rate"]) == ("closed", 8, None)


def test_a_ceiling_is_the_mean_of_every_measurement_and_the_guard_its_worst_round():
    # Before each round: batch sizes 1 and 8; after it: the best batch size (8) only.
    rounds = [
        {
            "ceiling_before": ceiling({1: 100.0, 8: 300.0}, {1: 50.0, 8: 90.0}, top1=4),
            "ceiling_after": ceiling({8: 330.0}, {8: 100.0}, top1=3),
            "levels": [level(10.0, 100.0, 50.0, None, {})],
        },
        {
            "ceiling_before": ceiling({1: 110.0, 8: 280.0}, {1: 60.0, 8: 80.0}, top1=4, ok=False),
            "ceiling_after": ceiling({8: 290.0}, {8: 96.0}, top1=4),
            "levels": [level(12.0, 100.0, 50.0, None, {})],
        },
    ]
    result = aggregate_rung("baseline", {}, rounds)["ceiling"]
    # model: batch 1 mean(100, 110) = 105; batch 8 mean(300, 330, 280, 290) = 300 (median: 295).
    assert result["model"] == [
        {"batch_size": 1, "img_per_s": 105.0, "img_per_s_min": 100.0, "img_per_s_max": 110.0, "measurements": 2},
        {"batch_size": 8, "img_per_s": 300.0, "img_per_s_min": 280.0, "img_per_s_max": 330.0, "measurements": 4},
    ]
    # pipeline: batch 1 mean(50, 60) = 55; batch 8 mean(90, 100, 80, 96) = 91.5 (median: 93).
    assert result["pipeline"] == [
        {"batch_size": 1, "img_per_s": 55.0, "img_per_s_min": 50.0, "img_per_s_max": 60.0, "measurements": 2},
        {"batch_size": 8, "img_per_s": 91.5, "img_per_s_min": 80.0, "img_per_s_max": 100.0, "measurements": 4},
    ]
    # A failed guard is worse than one that agrees on fewer images (3/4 but ok).
    assert (result["accuracy"]["ok"], result["accuracy"]["top1_agree"]) == (False, 4)
    # Foreign CPU 1 % in every measurement: under the 10 % line.
    assert (result["foreign_cpu_percent"], result["foreign_load"]) == (1.0, False)


def aggregated(*per_round: dict[str, Any]) -> dict[str, Any]:
    """One level over rounds without ceilings, as results.json has it."""
    rounds = [{"ceiling_before": None, "ceiling_after": None, "levels": [lvl]} for lvl in per_round]
    [merged] = aggregate_rung("rung", {}, rounds)["levels"]
    return merged


def test_foreign_load_is_the_worst_round_and_flags_from_10_percent():
    quiet, busy = level(10.0, 100.0, 50.0, None, {}, foreign=2.0), level(12.0, 100.0, 90.0, None, {}, foreign=37.0)
    flagged = aggregated(quiet, busy)
    # The median rate (11) takes the busy round in: the level is flagged with its 37 %.
    assert (flagged["foreign_cpu_percent"], flagged["foreign_load"]) == (37.0, True)
    assert flags(flagged) == ["foreign load 37%"]
    under, at_line = (level(10.0, 100.0, 50.0, None, {}, foreign=share) for share in (9.9, 10.0))
    assert (aggregated(under)["foreign_load"], aggregated(at_line)["foreign_load"]) == (False, True)
    # A --url run cannot tell the server's CPU from foreign CPU: unknown, not flagged.
    unknown = aggregated(level(10.0, 100.0, 50.0, None, {}, foreign=None))
    assert (unknown["foreign_cpu_percent"], unknown["foreign_load"], flags(unknown)) == (None, False, [])


def test_a_ceiling_measured_under_foreign_load_is_flagged():
    rounds = [
        {
            "ceiling_before": ceiling({1: 100.0}, {1: 50.0}, top1=4, foreign=3.0),
            "ceiling_after": ceiling({1: 60.0}, {1: 30.0}, top1=4, foreign=45.5),
            "levels": [level(10.0, 100.0, 50.0, None, {})],
        }
    ]
    result = aggregate_rung("baseline", {}, rounds)["ceiling"]
    assert (result["foreign_cpu_percent"], result["foreign_load"]) == (45.5, True)


def test_too_few_completions_or_a_window_under_5_latencies_in_any_round():
    # level(): a 2 s window with ok = 2 × req/s. 10 req/s → 20 ok, p50 400 ms → 2 s = 5 × p50: enough.
    enough = level(10.0, 400.0, 50.0, None, {})
    few = level(9.5, 100.0, 50.0, None, {})  # 19 ok
    slow = level(40.0, 401.0, 50.0, None, {})  # 80 ok, but 2 s < 5 × 401 ms
    nothing = level(0.0, 0.0, 50.0, None, {"503": 3}) | {
        "latency_ms": {"p50": None, "p90": None, "p99": None, "max": None}
    }
    verdicts = [aggregated(*rounds)["too_few"] for rounds in ([enough], [few], [slow], [nothing], [enough, few])]
    assert verdicts == [False, True, True, True, True]
    assert flags(aggregated(enough, slow)) == ["too few completions"]


def run(model: list[float], pipeline: list[float], served: list[float]) -> dict[str, Any]:
    with_ceiling = {"model": [{"img_per_s": m} for m in model], "pipeline": [{"img_per_s": p} for p in pipeline]}
    return {"ceiling": with_ceiling if model else None, "levels": [{"req_per_s": s} for s in served]}


def test_efficiency_divides_by_the_rungs_best_model_ceiling_and_the_runs_best_pipeline():
    results = {
        "client_capacity_req_per_s": 100.0,
        "runs": [
            run(model=[40.0, 50.0], pipeline=[20.0, 25.0], served=[20.0, 45.0]),
            run(model=[80.0], pipeline=[60.0], served=[75.0]),
            run(model=[], pipeline=[], served=[30.0]),  # a --url run without the model: no ceiling
        ],
    }
    add_efficiency(results)
    first, second, url = ([(lv["efficiency"], lv["efficiency_vs_best"]) for lv in r["levels"]] for r in results["runs"])
    # efficiency: ÷ the rung's own best model ceiling (50, then 80); vs best: ÷ 60, the best
    # pipeline of any rung; rounded to 3 places: 20/60 = 0.333, 75/80 = 0.9375 → 0.938.
    assert first == [(0.4, 0.333), (0.9, 0.75)]
    assert second == [(0.938, 1.25)]
    assert url == [(None, 0.5)]


def test_efficiency_is_none_without_any_ceiling():
    results = {"client_capacity_req_per_s": 100.0, "runs": [run(model=[], pipeline=[], served=[30.0])]}
    add_efficiency(results)
    [only] = results["runs"][0]["levels"]
    assert (only["efficiency"], only["efficiency_vs_best"]) == (None, None)


def test_client_bound_from_70_percent_of_the_clients_capacity():
    served = [69.9, 70.0, 90.0]  # capacity 100 req/s: the line is at 70
    results = {"client_capacity_req_per_s": 100.0, "runs": [run(model=[80.0], pipeline=[60.0], served=served)]}
    add_efficiency(results)
    assert [lvl["client_bound"] for lvl in results["runs"][0]["levels"]] == [False, True, True]
    unmeasured = {"client_capacity_req_per_s": 0.0, "runs": [run(model=[80.0], pipeline=[60.0], served=[70.0])]}
    add_efficiency(unmeasured)
    assert unmeasured["runs"][0]["levels"][0]["client_bound"] is False
