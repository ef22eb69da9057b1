"""results.json → results.md and PNG plots (throughput, latency, resources, baseline vs best)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

from timmserve.bench.aggregate import (
    FOREIGN_LOAD_SHARE,
    MIN_COMPLETIONS,
    MIN_WINDOW_LATENCIES,
    best_pipeline_run,
    flags,
)

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

PLOTS = ("throughput.png", "latency.png", "resources.png", "baseline_vs_best.png")


def write_results(results: dict[str, Any], out: Path) -> Path:
    """Write out/results.json (the folder made if needed) and return its path; `render` makes the
    Markdown and plots from it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def render(results_path: Path) -> list[Path]:
    """Write results.md and the plots next to a results.json; returns what was written."""
    try:
        results = json.loads(results_path.read_text())
    except (OSError, ValueError) as exc:
        from timmserve.errors import ConfigError

        raise ConfigError(f"cannot read {results_path}: {exc}") from None
    out = results_path.parent
    written = [path for path in _plots(results, out) if path is not None]
    markdown = out / "results.md"
    markdown.write_text(to_markdown(results, [p.name for p in written]))
    return [markdown, *written]


def to_markdown(results: dict[str, Any], plots: list[str]) -> str:
    env, model = results["env"], results["model"]
    lines = [
        f"# timmserve bench: {model['name'] or 'a running server'}",
        "",
        f"- Machine: {env['cpu']}, {env['cpus']} CPUs ({', '.join(env['cpu_features']) or 'no AVX2'}), "
        f"{env['memory_gb']} GiB; device: {env['device']}",
        f"- Software: Python {env['python']}, torch {env['torch']}, timm {env['timm']}, litserve {env['litserve']}",
        f"- Model: {model['name']} ({model['weights']}), {_count(model['params'])} parameters, "
        f"input {model['input_size']}",
        f"- Run: `{env['command']}`, started {env['started']}; "
        f"{results['bench']['rounds']} rounds in ABBA order, {results['bench']['duration']} s per level "
        f"after {results['bench']['warmup']} s warm-up",
        f"- Client capacity: {results['client_capacity_req_per_s']:,.0f} req/s (the load generator against a "
        "trivial endpoint on this machine: a lower bound). Levels served at ≥ 70% of it would be marked client-bound.",
        "",
        "## Served",
        "",
        "req/s is the median over rounds (min–max). Efficiency = req/s ÷ the rung's best model ceiling; "
        "vs best = req/s ÷ the best decode+model pipeline ceiling in this run. CPU % is of the whole machine; "
        "foreign CPU is what processes other than the server, the load generator and the bench used (the "
        "worst round).",
        "",
        f"Marked levels are not compared anywhere in this report: client-bound; foreign load (≥ "
        f"{FOREIGN_LOAD_SHARE:g}% of the machine used by other processes in some round); too few completions (in "
        f"some round fewer than {MIN_COMPLETIONS}, or a window shorter than {MIN_WINDOW_LATENCIES}× the p50 "
        "latency). n/c: not comparable — the level, or the ceiling the ratio divides by, is marked.",
        "",
        "| rung | level | req/s | p50 ms | p99 ms | server CPU % | machine CPU % | foreign CPU % | GPU % "
        "| efficiency | vs best | non-200 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    best_pipeline = best_pipeline_run(results["runs"])
    for run in results["runs"]:
        for level in run["levels"]:
            non_200 = sum(level["errors"].values()) + level["timeouts"]
            reasons = flags(level)
            marked = f" ({', '.join(reasons)})" if reasons else ""
            efficiency = _ratio(level["efficiency"], bool(reasons) or _ceiling_flagged(run))
            vs_best = _ratio(level["efficiency_vs_best"], bool(reasons) or _ceiling_flagged(best_pipeline))
            lines.append(
                f"| {run['name']} | {_level_name(level)} | {_range(level, 'req_per_s')}{marked} "
                f"| {_num(level['latency_ms']['p50'])} | {_num(level['latency_ms']['p99'])} "
                f"| {_num(level['server_cpu_percent'])} | {_num(level['cpu_percent'])} "
                f"| {_num(level.get('foreign_cpu_percent'))} | {_num(level['gpu_percent'])} "
                f"| {efficiency} | {vs_best} | {non_200} |"
            )
    lines += _ceiling_table(results) + _accuracy_table(results) + _comparisons(results) + _best_section(results)
    lines += ["", "## Plots", ""] + [f"![{name[:-4]}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _ceiling_table(results: dict[str, Any]) -> list[str]:
    runs = [run for run in results["runs"] if run["ceiling"]]
    if not runs:
        return []
    lines = [
        "",
        "## Ceilings",
        "",
        "In-process images/s, same config as the server, no server running: the mean of the measurements right "
        "before and right after each round of the rung (min–max); foreign CPU: the most other processes used "
        f"during any of them (≥ {FOREIGN_LOAD_SHARE:g}%: marked, and no efficiency divides by it).",
        "",
        "| rung | batch size | model | decode + model pipeline | foreign CPU % |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        foreign = _num(run["ceiling"].get("foreign_cpu_percent")) + (" (foreign load)" if _ceiling_flagged(run) else "")
        for model_row, pipeline_row in zip(run["ceiling"]["model"], run["ceiling"]["pipeline"]):
            lines.append(
                f"| {run['name']} | {model_row['batch_size']} | {_range(model_row, 'img_per_s')} "
                f"| {_range(pipeline_row, 'img_per_s')} | {foreign} |"
            )
    return lines


def _ceiling_flagged(run: dict[str, Any] | None) -> bool:
    """The run's ceiling was measured under foreign load (False for a results.json from before the flag)."""
    return bool(run and run["ceiling"] and run["ceiling"].get("foreign_load"))


def _accuracy_table(results: dict[str, Any]) -> list[str]:
    runs = [run for run in results["runs"] if run["ceiling"] and "accuracy" in run["ceiling"]]
    if not runs:
        return []
    lines = [
        "",
        "## Accuracy guard",
        "",
        "Each rung's answers on the four reference photos (cat, espresso, Grace Hopper, rocket) against eager "
        "fp32 with a full JPEG decode: top-1 must agree on every photo and no class probability may move by more "
        "than the precision's tolerance (the worst of the rung's measurements).",
        "",
        "| rung | backend | precision | top-1 agrees | max Δ probability | tolerance | guard |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        guard, config = run["ceiling"]["accuracy"], run["config"]
        lines.append(
            f"| {run['name']} | {config.get('backend', 'eager')} | {config['precision']} "
            f"| {guard['top1_agree']}/{guard['images']} | {guard['max_prob_diff']:.1e} | {guard['tolerance']:g} "
            f"| {'ok' if guard['ok'] else 'FAILED'} |"
        )
    return lines


def _comparisons(results: dict[str, Any]) -> list[str]:
    runs = {run["name"]: run for run in results["runs"]}
    names = list(runs)
    pairs = list(zip(names, names[1:]))
    # best against where the ladder starts, and against the naive server: does the design pay?
    for start in ("baseline", "reference"):
        if start in runs and "best" in runs and (start, "best") not in pairs:
            pairs.append((start, "best"))
    if not pairs:
        return []
    lines = [
        "",
        "## Differences",
        "",
        "Where the min–max ranges over rounds overlap: no difference. A marked level is compared with nothing.",
        "",
    ]
    for before, after in pairs:
        verdicts = [
            f"{_level_name(a)}: {_compare(before, a, after, b)}"
            for a, b in zip(runs[before]["levels"], runs[after]["levels"])
        ]
        lines.append(f"- {after} vs {before}: " + "; ".join(verdicts))
    return lines


def _compare(before_name: str, before: dict[str, Any], after_name: str, after: dict[str, Any]) -> str:
    """The verdict on one level of two rungs, or why there is none."""
    marked = [
        f"{reason} during {name} {_level_name(level)}"
        for name, level in ((before_name, before), (after_name, after))
        for reason in flags(level)
    ]
    return f"not comparable: {', '.join(marked)}" if marked else verdict(before, after)


def verdict(before: dict[str, Any], after: dict[str, Any]) -> str:
    """ "no difference" when the req/s ranges overlap, else the ratio of medians."""
    if after["req_per_s_min"] <= before["req_per_s_max"] and before["req_per_s_min"] <= after["req_per_s_max"]:
        return "no difference"
    ratio = after["req_per_s"] / before["req_per_s"] if before["req_per_s"] else float("inf")
    return f"×{ratio:.2f} ({'faster' if ratio > 1 else 'slower'})"


def _best_section(results: dict[str, Any]) -> list[str]:
    notes = results["bench"].get("ladder_notes") or {}
    lines = [f"- Skipped rung {name}: {reason}." for name, reason in notes.get("skipped", {}).items()]
    lines += [f"- Rung {name} failed, not measured: {reason}" for name, reason in notes.get("failed", {}).items()]
    if "from" in notes:
        lines.append(
            f"- best = baseline + the knobs of: {', '.join(notes['from']) or 'nothing'}. Left out (measured here, "
            f"after the fastest rung of the first round, slower than it): {', '.join(notes['left_out']) or 'none'}."
        )
    return ["", "## Ladder", "", *lines] if lines else []


def _plots(results: dict[str, Any], out: Path) -> list[Path | None]:
    runs = [run for run in results["runs"] if any(level["mode"] == "closed" for level in run["levels"])]
    if not runs:
        return []
    return [_throughput(runs, out), _latency(runs, out), _resources(runs, out), _baseline_vs_best(runs, out)]


def _closed(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [level for level in run["levels"] if level["mode"] == "closed"]


def _throughput(runs: list[dict[str, Any]], out: Path) -> Path:
    figure, axes = plt.subplots(figsize=(8, 5))
    for index, run in enumerate(runs):
        color = f"C{index}"
        levels = _closed(run)
        x = [level["concurrency"] for level in levels]
        y = [level["req_per_s"] for level in levels]
        error = [[v - level["req_per_s_min"] for v, level in zip(y, levels)],
                 [level["req_per_s_max"] - v for v, level in zip(y, levels)]]  # fmt: skip
        axes.errorbar(x, y, yerr=error, marker="o", capsize=3, color=color, label=run["name"])
        if run["ceiling"]:
            ceiling = max(row["img_per_s"] for row in run["ceiling"]["model"])
            axes.axhline(ceiling, color=color, linestyle="--", linewidth=1, alpha=0.7)
    axes.set(xscale="log", xlabel="concurrency (closed loop)", ylabel="req/s",
             title="Served throughput (dashed: each rung's model ceiling)")  # fmt: skip
    axes.set_ylim(bottom=0)
    _concurrency_ticks(axes, runs)
    axes.legend()
    return _save(figure, out / "throughput.png")


def _latency(runs: list[dict[str, Any]], out: Path) -> Path:
    figure, axes = plt.subplots(figsize=(8, 5))
    for index, run in enumerate(runs):
        levels = _closed(run)
        x = [level["concurrency"] for level in levels]
        axes.plot(
            x, [level["latency_ms"]["p50"] for level in levels], "o-", color=f"C{index}", label=f"{run['name']} p50"
        )
        axes.plot(
            x, [level["latency_ms"]["p99"] for level in levels], "s--", color=f"C{index}", label=f"{run['name']} p99"
        )
    axes.set(xscale="log", yscale="log", xlabel="concurrency (closed loop)", ylabel="latency, ms", title="Latency")
    _concurrency_ticks(axes, runs)
    axes.legend(fontsize="small", ncol=2)
    return _save(figure, out / "latency.png")


def _resources(runs: list[dict[str, Any]], out: Path) -> Path:
    figure, (cpu_axes, gpu_axes) = plt.subplots(1, 2, figsize=(11, 4.5))
    has_gpu = False
    for index, run in enumerate(runs):
        levels = _closed(run)
        x = [level["concurrency"] for level in levels]
        cpu_axes.plot(
            x, [level["server_cpu_percent"] for level in levels], "o-", color=f"C{index}", label=f"{run['name']} server"
        )
        cpu_axes.plot(
            x, [level["cpu_percent"] for level in levels], ":", color=f"C{index}", label=f"{run['name']} machine"
        )
        gpu = [level["gpu_percent"] for level in levels]
        if any(value is not None for value in gpu):
            has_gpu = True
            gpu_axes.plot(x, gpu, "o-", color=f"C{index}", label=run["name"])
    cpu_axes.set(xscale="log", xlabel="concurrency", ylabel="CPU % of the machine", ylim=(0, 105), title="CPU")
    cpu_axes.legend(fontsize="x-small", ncol=2)
    gpu_axes.set(xscale="log", xlabel="concurrency", ylabel="GPU utilisation %", ylim=(0, 105), title="GPU")
    if has_gpu:
        gpu_axes.legend(fontsize="small")
    else:
        gpu_axes.text(0.5, 0.5, "no GPU on this machine", ha="center", va="center", transform=gpu_axes.transAxes)
    for axes in (cpu_axes, gpu_axes):
        _concurrency_ticks(axes, runs)
    return _save(figure, out / "resources.png")


def _baseline_vs_best(runs: list[dict[str, Any]], out: Path) -> Path | None:
    by_name = {run["name"]: run for run in runs}
    if "baseline" not in by_name or "best" not in by_name:
        return None
    pair = [by_name["baseline"], by_name["best"]]
    levels = [_closed(run) for run in pair]
    figure, axes = plt.subplots(figsize=(8, 5))
    width = 0.38
    for offset, (run, run_levels) in enumerate(zip(pair, levels)):
        x = [i + (offset - 0.5) * width for i in range(len(run_levels))]
        y = [level["req_per_s"] for level in run_levels]
        error = [[v - level["req_per_s_min"] for v, level in zip(y, run_levels)],
                 [level["req_per_s_max"] - v for v, level in zip(y, run_levels)]]  # fmt: skip
        axes.bar(x, y, width, yerr=error, capsize=3, color=f"C{offset}", label=run["name"])
    ceilings = [max(row["img_per_s"] for row in run["ceiling"]["pipeline"]) for run in pair if run["ceiling"]]
    if ceilings:
        axes.axhline(max(ceilings), color="gray", linestyle="--", label="best pipeline ceiling")
    axes.set_xticks(range(len(levels[0])), [f"c={level['concurrency']}" for level in levels[0]])
    axes.set(ylabel="req/s", title="baseline vs best (median over rounds, min–max)")
    axes.legend()
    return _save(figure, out / "baseline_vs_best.png")


def _concurrency_ticks(axes: Any, runs: list[dict[str, Any]]) -> None:
    ticks = sorted({level["concurrency"] for run in runs for level in _closed(run)})
    axes.set_xticks(ticks, [str(t) for t in ticks])
    axes.minorticks_off()


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _level_name(level: dict[str, Any]) -> str:
    return f"c={level['concurrency']}" if level["mode"] == "closed" else f"{level['target_rate']:g} req/s open"


def _range(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:,.1f} ({row[f'{key}_min']:,.1f}–{row[f'{key}_max']:,.1f})"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def _ratio(value: float | None, not_comparable: bool) -> str:
    """An efficiency, or n/c when the level or the ceiling it divides by is marked."""
    return "n/c" if not_comparable and value is not None else _pct(value)


def _count(value: int | None) -> str:
    return "–" if value is None else f"{value / 1e6:.1f} M"
