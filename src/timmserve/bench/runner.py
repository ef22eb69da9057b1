"""The runner: measures rungs one after another, each on a freshly started server.

A rung's round: its ceilings in this process (no server running, the whole machine), then a
server with the rung's config under each load level, then the ceilings again at the batch sizes
that were best, so the rung's ceiling is bracketed in time. Rounds run the ladder in ABBA order
(forward, backward, …) so a machine that drifts favours neither end. What it returns is raw, one
dict per round, for `aggregate.aggregate_rung`.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import psutil
import torch
from tqdm import tqdm

from timmserve.bench.ceiling import measure_ceilings
from timmserve.bench.config import BenchConfig
from timmserve.bench.load import LoadSpec, run_level
from timmserve.bench.monitor import Monitor
from timmserve.bench.process import REFERENCE_SERVER, SERVE, ServerProcess
from timmserve.bench.rungs import BEST, REFERENCE, Ladder
from timmserve.model.backends import agreement, probability_tolerance
from timmserve.model.classifier import Classifier, build_classifier, resolve_auto
from timmserve.model.factory import load_model
from timmserve.model.photos import reference_photos
from timmserve.model.prepare import prepare
from timmserve.settings import machine
from timmserve.settings.config import ServeConfig


@dataclass
class Measured:
    """One rung's raw measurements."""

    name: str
    config: dict[str, Any]  # as results.json reports it
    rounds: list[dict[str, Any]]  # per round: {"ceiling_before", "ceiling_after", "levels"}


class Runner:
    """Measures the ladder of `config`, or the one server at `config.url`."""

    def __init__(
        self,
        config: BenchConfig,
        images: list[bytes],
        labels: list[str],
        accelerator: str,
        progress: bool,
        log: Callable[[str], None],
    ) -> None:
        """`images`: the encoded files the load sends and the pipeline ceiling decodes; `labels`:
        the model's class names; `accelerator`: "cuda" or "cpu"; `progress`: a bar per level."""
        self.config = config
        self.images = images
        self.labels = labels
        self.accelerator = accelerator
        self.progress = progress
        self.log = log
        self.device = torch.device("cuda" if accelerator == "cuda" else "cpu")
        self.reference_logits: torch.Tensor | None = None

    def run_ladder(self) -> tuple[list[Measured], dict[str, Any]]:
        """Every rung of the ladder, `config.rounds` times; and the ladder's notes for results.json
        (rungs skipped or failed, with the reason; what `best` combines and left out). A rung that
        fails (its server does not become healthy, its backend does not load, a device error) is
        logged and left out of the rounds after, so one rung cannot lose the others' measurements.
        Raises ConfigError for an unknown rung."""
        ladder = Ladder(self.config, self.accelerator)
        measured: dict[str, list[dict[str, Any]]] = {name: [] for name in ladder.names}
        for name, reason in ladder.skipped.items():
            self.log(f"skipping rung {name}: {reason}")
        self._resolve_auto_backend(ladder)
        failed: dict[str, str] = {}  # rung → why it failed; the ladder goes on without it
        for round_index in range(self.config.rounds):
            order = ladder.names if round_index % 2 == 0 else tuple(reversed(ladder.names))
            for name in (n for n in order if n not in failed):
                if name == BEST and ladder.best_knobs is None:
                    ladder.decide_best({n: _peak(runs[0]["levels"]) for n, runs in measured.items() if runs})
                    self.log(f"best = baseline + {', '.join(ladder.best_from) or 'nothing'}")
                    if ladder.best_knobs["backend"] == "auto":  # the backend rung was not measured
                        ladder.best_knobs["backend"] = self._pick_backend(BEST, ladder.config(BEST))
                self.log(f"round {round_index + 1}/{self.config.rounds}: {name}")
                try:
                    measured[name].append(self._run_rung(name, ladder.config(name), round_index))
                except Exception as exc:  # noqa: BLE001 (one rung's failure, e.g. a CUDA error, must not lose the others)
                    failed[name] = f"{type(exc).__name__}: {exc}"
                    self.log(f"rung {name} failed, the ladder goes on without it: {failed[name]}")
        runs = [
            Measured(name, _reported_config(name, ladder.config(name)), rounds)
            for name, rounds in measured.items()
            if name not in failed
        ]
        notes = {"skipped": ladder.skipped, "failed": failed}
        if BEST in ladder.names:
            notes.update({"from": ladder.best_from, "left_out": ladder.best_left_out})
        return runs, notes

    def run_url(self, measure_ceiling: bool) -> Measured:
        """One round against the server already running at `config.url`; the ceilings of
        `config.serve` around it when `measure_ceiling` (the model is known). Raises ModelLoadError
        for a model that does not load here."""
        serve = _as_served(self.config.serve) if measure_ceiling else self.config.serve
        before = self._ceilings(serve) if measure_ceiling else None
        levels = self._levels("url", self.config.url.rstrip("/"), None)
        after = self._ceilings(serve, best_of=before) if measure_ceiling else None
        one_round = {"ceiling_before": before, "ceiling_after": after, "levels": levels}
        return Measured("url", {"url": self.config.url}, [one_round])

    def _resolve_auto_backend(self, ladder: Ladder) -> None:
        """A rung asking for `auto` gets the backend `auto` picks for that rung's workers, decided
        once here, so every round, its ceilings and `best` measure the same backend."""
        for name in ladder.names:
            if name == BEST or ladder.rungs[name].get("backend") != "auto":
                continue
            ladder.rungs[name]["backend"] = self._pick_backend(name, ladder.config(name))

    def _pick_backend(self, name: str, serve: ServeConfig) -> str:
        torch.set_num_threads(machine.resolve_machine(serve).torch_threads)  # as the rung's workers will run
        chosen = resolve_auto(serve, load_model(serve), self.device)[0].backend
        self.log(f"rung {name}: --backend auto chose {chosen}")
        return chosen

    def _run_rung(self, name: str, serve: ServeConfig, round_index: int) -> dict[str, Any]:
        serve = _as_served(serve)
        before = self._ceilings(serve)
        self.log(f"  {name} r{round_index + 1} ceilings: {_describe_ceilings(before)}")
        program = REFERENCE_SERVER if name == REFERENCE else SERVE
        with ServerProcess.from_config(serve.replace(log_level="warning"), program=program) as server:
            self.log(f"  {name} r{round_index + 1} server: python -m {' '.join(program)} on {server.url}")
            levels = self._levels(f"{name} r{round_index + 1}", server.url, server.pid)
        after = self._ceilings(serve, best_of=before)
        return {"ceiling_before": before, "ceiling_after": after, "levels": levels}

    def _ceilings(self, serve: ServeConfig, best_of: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
        """In this process, with the whole machine (no server running): model and pipeline at each
        batch size up to the rung's max batch size; or, after the levels, again at the batch sizes
        that were best in `best_of` (so the rung's ceiling is bracketed in time). With the accuracy
        guard, and the CPU % of the machine other processes used meanwhile."""
        sizes = [b for b in self.config.ceiling_batch_sizes if b <= serve.max_batch_size] or [1]
        pipeline_sizes = None
        if best_of is not None:
            sizes = [_fastest(best_of["model"])["batch_size"]]
            pipeline_sizes = [_fastest(best_of["pipeline"])["batch_size"]]
        torch.set_num_threads(serve.torch_threads or psutil.cpu_count() or 1)
        classifier, _ = build_classifier(serve, self.labels, self.device)
        try:
            with Monitor() as monitor:
                measured = measure_ceilings(
                    classifier, self.images, sizes, self.config.ceiling_duration, pipeline_batch_sizes=pipeline_sizes
                )
            foreign = monitor.summary()["foreign_cpu_percent"]
            return {**measured, "accuracy": self._accuracy_guard(classifier, serve), "foreign_cpu_percent": foreign}
        finally:
            classifier.close()
            del classifier
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the server about to start needs the memory

    def _accuracy_guard(self, classifier: Classifier, serve: ServeConfig) -> dict[str, Any]:
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

    def _levels(self, label: str, url: str, server_pid: int | None) -> list[dict[str, Any]]:
        """Each level's load, resources and foreign CPU; `server_pid` None: a server not ours (`--url`)."""
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
            with Monitor(server_pid, unseen_server=server_pid is None) as monitor:
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


def _reported_config(name: str, serve: ServeConfig) -> dict[str, Any]:
    """A run's config as results.json reports it; the reference rung names its own server."""
    config = serve.as_dict()
    if name == REFERENCE:
        config["engine"] = "reference"  # the knobs are ServeConfig's, the server is not LitServe
    return config


def _fastest(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The ceiling row (one batch size) with the most img/s."""
    return max(rows, key=lambda row: row["img_per_s"])


def _describe_ceilings(ceilings: dict[str, Any]) -> str:
    """One log line: each ceiling's best rate and batch size, and the accuracy guard's verdict."""
    parts = []
    for kind in ("model", "pipeline"):
        best = _fastest(ceilings[kind])
        parts.append(f"{kind} {best['img_per_s']:,.1f} img/s at batch {best['batch_size']}")
    guard = ceilings["accuracy"]
    parts.append(f"accuracy guard {'ok' if guard['ok'] else 'FAILED'} (top-1 {guard['top1_agree']}/{guard['images']})")
    return ", ".join(parts)


def _as_served(serve: ServeConfig) -> ServeConfig:
    """The rung's config with what its server resolves at start made explicit (the machine rule,
    and `auto` decided with the workers' threads), so its ceilings and guard measure the backend,
    precision and batch sizes it serves with; but its threads as given, so the ceilings have the
    whole machine unless the rung pins them."""
    return prepare(serve).config.replace(torch_threads=serve.torch_threads)


def _peak(levels: list[dict[str, Any]]) -> float:
    """A round's highest served rate over its levels, req/s."""
    return max(level["req_per_s"] for level in levels)
