"""The ladder: named configurations measured one after another in one run, each on a freshly
started server, in ABBA order, with the ceiling measured right before and right after each rung.

Rungs are cumulative: each adds its knobs to the rungs before it in the ladder, starting from
`baseline` (the original deployment: no batching, one worker, fp32 eager, serial full decode).
`best` is the fastest rung of the first round (its config carries every rung's knobs before it)
plus the knobs of rungs the run did not measure; rungs after the fastest one are left out. Knobs
interact, so a rung is never judged alone: batching to 64 lost with eager PyTorch on this CPU (its
batch of 64 runs slower per image than a batch of 8) and is part of the fastest rung with ONNX
Runtime.
"""

from __future__ import annotations

import gc
import importlib.util
import platform
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm import tqdm

from timmserve import photos
from timmserve.backends import agreement, probability_tolerance
from timmserve.bench.ceiling import measure_ceilings
from timmserve.bench.config import BenchConfig
from timmserve.bench.load import LoadSpec, measure_client_capacity, run_level
from timmserve.bench.monitor import Monitor
from timmserve.bench.process import ServerProcess
from timmserve.classifier import Classifier, build_classifier, resolve_backend
from timmserve.config import ServeConfig
from timmserve.errors import ConfigError
from timmserve.labels import load_labels
from timmserve.model import ModelInfo, load_model
from timmserve.photos import reference_photos
from timmserve.startup import resolve_accelerator

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
CLIENT_BOUND_SHARE = 0.7  # a level served at ≥ 70% of the client's capacity is client-bound

BASELINE = "baseline"
BEST = "best"
RAY = "ray"


def built_in_rungs(accelerator: str) -> dict[str, dict[str, Any]]:
    """Knobs per rung; each rung adds its knobs to those of the rungs before it. `precision` only
    where the device runs reduced precision natively (see `unsupported_rungs`)."""
    return {
        BASELINE: {
            "max_batch_size": 1,
            "workers_per_device": 1,
            "precision": "fp32",
            "backend": "eager",
            "decode_threads": 1,
            "fast_decode": False,
        },
        "batching": {"max_batch_size": 64, "batch_timeout": 0.0},
        "workers": {"workers_per_device": 2},
        "precision": {"precision": "fp16" if accelerator == "cuda" else "bf16"},
        # Resolved once per run, before the first rung, by measuring the installed backends here.
        "backend": {"backend": "auto"},
        "decode": {"decode_threads": min(4, psutil.cpu_count() or 1), "fast_decode": True},
        # An engine, not an optimisation: the knobs of the rungs before it, served by Ray Serve, so
        # it compares with the LitServe rung right before it. Never part of `best`.
        RAY: {"engine": "ray"},
    }


def unsupported_rungs(accelerator: str) -> dict[str, str]:
    """Rungs this device cannot run well, with the reason. On a CPU without AVX-512 BF16 or AMX,
    bf16 is emulated: measured here (AVX2 EPYC) it ran the model 14× slower than fp32."""
    unsupported = {}
    if accelerator != "cuda" and not {"avx512_bf16", "amx_bf16"} & set(_cpu_features()):
        unsupported["precision"] = (
            "this CPU has no native bf16 (AVX-512 BF16 or AMX); force it with --set precision=bf16"
        )
    if importlib.util.find_spec("ray") is None:
        unsupported[RAY] = "Ray Serve is not installed (pip install 'timmserve[ray]')"
    return unsupported


class Ladder:
    """Resolves rung names to ServeConfigs; decides `best` from what the first round measured."""

    def __init__(self, config: BenchConfig, accelerator: str) -> None:
        rungs = built_in_rungs(accelerator)
        for name, knobs in config.rung_overrides.items():
            rungs[name] = {**rungs.get(name, {}), **knobs}
        unknown = [name for name in config.ladder if name != BEST and name not in rungs]
        if unknown:
            raise ConfigError(f"unknown rung {unknown[0]!r}; known: {', '.join([*rungs, BEST])}")
        unsupported = unsupported_rungs(accelerator)
        self.skipped = {name: why for name, why in unsupported.items() if name in config.ladder}  # reported
        self.rungs = {name: knobs for name, knobs in rungs.items() if name not in unsupported}
        self.names = tuple(name for name in config.ladder if name not in self.skipped)
        self.base = config.serve
        self.best_knobs: dict[str, Any] | None = None
        self.best_from: list[str] = []  # rungs whose knobs `best` combines
        self.best_left_out: list[str] = []  # rungs measured here to be slower

    def config(self, name: str) -> ServeConfig:
        if name == BEST:
            if self.best_knobs is None:
                raise RuntimeError("best is decided after the first round's other rungs")
            return self.base.replace(**self.best_knobs)
        knobs = dict(self.rungs[BASELINE])  # the starting point, even when not in the ladder
        for rung in (n for n in self.names if n != BEST):
            knobs.update(self.rungs[rung])
            if rung == name:
                break
        return self.base.replace(**knobs)

    def decide_best(self, peaks: dict[str, float]) -> None:
        """`peaks`: first-round peak req/s per measured rung. Rungs are cumulative, so the fastest
        measured rung carries the knobs of every rung before it: `best` is that configuration plus
        the knobs of the rungs this run did not measure (nothing says they lose); the rungs measured
        after the fastest one only made it slower and are left out."""
        measured = [n for n in self.names if n in peaks and n not in (RAY, BEST)]
        kept = measured[: measured.index(max(measured, key=peaks.__getitem__)) + 1] if measured else []
        self.best_left_out = [n for n in measured if n not in kept]
        self.best_from = [n for n in self.rungs if n not in (BASELINE, RAY, *self.best_left_out)]
        knobs = dict(self.rungs[BASELINE])
        for name in self.best_from:
            knobs.update(self.rungs[name])
        self.best_knobs = knobs


def run_bench(config: BenchConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the ladder (or one running server with `config.url`); returns results.json's dict."""
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    images = load_images(config.images)
    serve = config.serve
    accelerator = resolve_accelerator(serve) if config.url is None else "cpu"
    measure_ceiling = config.url is None or serve.model is not None
    info = load_model(serve).info if measure_ceiling else None
    labels = load_labels(info.num_classes, label_file=serve.labels, model_label_names=info.label_names) if info else []
    log("measuring the load generator's own capacity against a trivial endpoint …")
    capacity = measure_client_capacity(
        images[0], concurrency=max(config.concurrency or (64,)), duration=3.0, processes=config.client_processes
    )
    log(f"client capacity: {capacity:,.0f} req/s")
    bench = _Bench(config, images, labels, accelerator, progress, log)
    if config.url is not None:
        runs = [bench.run_url(measure_ceiling)]
        ladder_info: dict[str, Any] = {}
    else:
        runs, ladder_info = bench.run_ladder()
    results = {
        "env": {**environment(accelerator), "started": started},
        "model": _model_section(info),
        "client_capacity_req_per_s": round(capacity, 1),
        "bench": {**config.as_dict(), "ladder_notes": ladder_info},
        "runs": runs,
    }
    add_efficiency(results)
    return results


class _Bench:
    def __init__(
        self,
        config: BenchConfig,
        images: list[bytes],
        labels: list[str],
        accelerator: str,
        progress: bool,
        log: Callable[[str], None],
    ) -> None:
        self.config = config
        self.images = images
        self.labels = labels
        self.accelerator = accelerator
        self.progress = progress
        self.log = log
        self.device = torch.device("cuda" if accelerator == "cuda" else "cpu")
        self.reference_logits: torch.Tensor | None = None

    def run_ladder(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        ladder = Ladder(self.config, self.accelerator)
        measured: dict[str, list[dict[str, Any]]] = {name: [] for name in ladder.names}
        for name, reason in ladder.skipped.items():
            self.log(f"skipping rung {name}: {reason}")
        self.resolve_auto_backend(ladder)
        for round_index in range(self.config.rounds):
            order = ladder.names if round_index % 2 == 0 else tuple(reversed(ladder.names))
            for name in order:
                if name == BEST and ladder.best_knobs is None:
                    ladder.decide_best({n: _peak(runs[0]["levels"]) for n, runs in measured.items() if runs})
                    self.log(f"best = baseline + {', '.join(ladder.best_from) or 'nothing'}")
                    if ladder.best_knobs["backend"] == "auto":  # the backend rung was not measured
                        ladder.best_knobs["backend"] = self.pick_backend(BEST, ladder.config(BEST))
                self.log(f"round {round_index + 1}/{self.config.rounds}: {name}")
                measured[name].append(self.run_rung(name, ladder.config(name), round_index))
        runs = [_aggregate(name, ladder.config(name), rounds) for name, rounds in measured.items()]
        notes = {"skipped": ladder.skipped}
        if BEST in ladder.names:
            notes.update({"from": ladder.best_from, "left_out": ladder.best_left_out})
        return runs, notes

    def resolve_auto_backend(self, ladder: Ladder) -> None:
        """A rung asking for `auto` gets the backend `auto` picks for that rung's workers, decided
        once here, so every round, its ceilings and `best` measure the same backend."""
        for name in ladder.names:
            if name == BEST or ladder.rungs[name].get("backend") != "auto":
                continue
            ladder.rungs[name]["backend"] = self.pick_backend(name, ladder.config(name))

    def pick_backend(self, name: str, serve: ServeConfig) -> str:
        torch.set_num_threads(serve.torch_threads_per_worker(serve.workers_per_device))
        chosen = resolve_backend(serve, load_model(serve), self.device)
        self.log(f"rung {name}: --backend auto chose {chosen}")
        return chosen

    def run_rung(self, name: str, serve: ServeConfig, round_index: int) -> dict[str, Any]:
        before = self.ceilings(serve)
        self.log(f"  {name} r{round_index + 1} ceilings: {_describe_ceilings(before)}")
        with ServerProcess.from_config(serve.replace(log_level="warning")) as server:
            levels = self.levels(f"{name} r{round_index + 1}", server.url, server.pid)
        after = self.ceilings(serve, best_of=before)
        return {"ceiling_before": before, "ceiling_after": after, "levels": levels}

    def run_url(self, measure_ceiling: bool) -> dict[str, Any]:
        serve = self.config.serve
        before = self.ceilings(serve) if measure_ceiling else None
        levels = self.levels("url", self.config.url.rstrip("/"), None)
        after = self.ceilings(serve, best_of=before) if measure_ceiling else None
        run = _aggregate("url", serve, [{"ceiling_before": before, "ceiling_after": after, "levels": levels}])
        run["config"] = {"url": self.config.url}
        return run

    def ceilings(self, serve: ServeConfig, best_of: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
        """In this process, with the whole machine (no server running): model and pipeline at each
        batch size up to the rung's max batch size; or, after the levels, again at the batch sizes
        that were best in `best_of` (so the rung's ceiling is bracketed in time)."""
        sizes = [b for b in self.config.ceiling_batch_sizes if b <= serve.max_batch_size] or [1]
        pipeline_sizes = None
        if best_of is not None:
            sizes = [_best_batch_size(best_of["model"])]
            pipeline_sizes = [_best_batch_size(best_of["pipeline"])]
        torch.set_num_threads(serve.torch_threads or psutil.cpu_count() or 1)
        classifier, _ = build_classifier(serve, self.labels, self.device)
        try:
            measured = measure_ceilings(
                classifier, self.images, sizes, self.config.ceiling_duration, pipeline_batch_sizes=pipeline_sizes
            )
            return {**measured, "accuracy": self.accuracy_guard(classifier, serve)}
        finally:
            classifier.close()
            del classifier
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the server about to start needs the memory

    def accuracy_guard(self, classifier: Classifier, serve: ServeConfig) -> dict[str, Any]:
        """The rung's answers on the reference photos against eager fp32's (full JPEG decode)."""
        if self.reference_logits is None:
            reference_config = self.config.serve.replace(
                backend="eager", precision="fp32", channels_last=False, fast_decode=False
            )
            reference, _ = build_classifier(reference_config, self.labels, self.device)
            self.reference_logits = reference.logits(list(reference_photos().values())).cpu()
        logits = classifier.logits(list(reference_photos().values())).cpu()
        tolerance = probability_tolerance(serve.precision, serve.fast_decode)
        return agreement(self.reference_logits, logits, tolerance).as_dict()

    def levels(self, label: str, url: str, server_pid: int | None) -> list[dict[str, Any]]:
        config = self.config
        steps = [("closed", c) for c in config.concurrency] + [("open", r) for r in config.rates]
        results = []
        for mode, value in steps:
            key = "concurrency" if mode == "closed" else "rate"
            spec = LoadSpec(
                url=f"{url}/predict",
                bodies=tuple(self.images),
                duration=config.duration,
                warmup=config.warmup,
                concurrency=value if mode == "closed" else None,
                rate=value if mode == "open" else None,
                timeout=config.request_timeout,
            )
            with Monitor(server_pid) as monitor:
                stats = self._with_progress(
                    f"{label} {key}={value:g}", partial(run_level, spec, config.client_processes)
                )
            level = {
                "mode": mode,
                "concurrency": value if mode == "closed" else None,
                "target_rate": value if mode == "open" else None,
                **stats.summary(),
                **monitor.summary(stats.window),  # the measured part only, not the warm-up
            }
            results.append(level)
        return results

    def _with_progress(self, description: str, work: Callable[[], Any]) -> Any:
        """Run one level's load with a progress bar over its duration; log its rate when done."""
        stats = self._run_with_bar(description, work) if self.progress else work()
        line = f"  {description}: {stats.ok / stats.duration_s:,.1f} req/s, errors {dict(stats.errors)}"
        (tqdm.write if self.progress else self.log)(line)
        return stats

    def _run_with_bar(self, description: str, work: Callable[[], Any]) -> Any:
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["value"] = work()
            except BaseException as exc:  # re-raised in the caller's thread below
                outcome["error"] = exc

        thread = threading.Thread(target=target, daemon=True)
        with tqdm(total=round(self.config.duration, 1), desc=description, unit="s", leave=False) as bar:
            start = time.monotonic()
            thread.start()
            while thread.is_alive():
                thread.join(0.25)
                bar.n = round(min(time.monotonic() - start, self.config.duration), 1)
                bar.refresh()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]


def _aggregate(name: str, serve: ServeConfig, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One rung over its rounds: level medians with min–max; per batch size, the ceiling is the
    mean of every measurement (before each round; after it, at the best batch sizes) with min–max."""
    levels = [_aggregate_level([r["levels"][i] for r in rounds]) for i in range(len(rounds[0]["levels"]))]
    ceiling = None
    if rounds[0]["ceiling_before"] is not None:
        ceiling = {}
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
    return {"name": name, "config": serve.as_dict(), "rounds": len(rounds), "ceiling": ceiling, "levels": levels}


def _aggregate_level(per_round: list[dict[str, Any]]) -> dict[str, Any]:
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


def add_efficiency(results: dict[str, Any]) -> None:
    """efficiency: served ÷ the rung's best model ceiling (batch sizes up to its max batch);
    efficiency_vs_best: served ÷ the best pipeline ceiling measured anywhere in the run;
    client_bound: served at ≥ 70% of what the load generator alone can send."""
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


def load_images(path: Path | None) -> list[bytes]:
    """A photo, or every image file in a folder (sorted, cycled by the load); default: the cat photo."""
    path = path or photos.CAT
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    return [f.read_bytes() for f in files]


def environment(accelerator: str) -> dict[str, Any]:
    cpu = _cpu_name()
    device = torch.cuda.get_device_name(0) if accelerator == "cuda" else cpu
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": version("timm"),
        "litserve": version("litserve"),
        "device": device,
        "cpu": cpu,
        "cpu_features": _cpu_features(),
        "cpus": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "command": " ".join(["timmserve", *sys.argv[1:]]),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_features() -> list[str]:
    """The instruction sets that decide CPU inference speed (bf16 needs AVX-512 BF16 or AMX)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags]


def _model_section(info: ModelInfo | None) -> dict[str, Any]:
    if info is None:
        return {"name": None, "weights": None, "params": None, "input_size": None}
    return {
        "name": info.name,
        "weights": info.weights,
        "params": info.params,
        "input_size": list(info.data_config["input_size"]),
    }


def _best_batch_size(rows: list[dict[str, Any]]) -> int:
    return max(rows, key=lambda row: row["img_per_s"])["batch_size"]


def _describe_ceilings(ceilings: dict[str, Any]) -> str:
    """One log line: each ceiling's best rate and batch size, and the accuracy guard's verdict."""
    parts = []
    for kind in ("model", "pipeline"):
        best = max(ceilings[kind], key=lambda row: row["img_per_s"])
        parts.append(f"{kind} {best['img_per_s']:,.1f} img/s at batch {best['batch_size']}")
    guard = ceilings["accuracy"]
    parts.append(f"accuracy guard {'ok' if guard['ok'] else 'FAILED'} (top-1 {guard['top1_agree']}/{guard['images']})")
    return ", ".join(parts)


def _peak(levels: list[dict[str, Any]]) -> float:
    return max(level["req_per_s"] for level in levels)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None
