"""The rungs: the named configurations a ladder compares, and how `best` is derived.

Rungs are cumulative: each adds its knobs to the rungs before it in the ladder, starting from
`baseline` (the original deployment: no batching, one worker, fp32 eager, serial full decode).
`best` is the fastest rung of the first round (its config carries every rung's knobs before it)
plus the knobs of rungs the run did not measure; rungs after the fastest one are left out. Knobs
interact, so a rung is never judged alone: batching to 64 lost with eager PyTorch on this CPU (its
batch of 64 runs slower per image than a batch of 8) and is part of the fastest rung with ONNX
Runtime.

Two rungs serve the knobs of the rungs before them another way, to compare with the rung right
before them and with `best`: `ray` (Ray Serve) and `reference` (the naive server, reference.py);
right after `default` they serve `default`'s configuration (`--ladder default,reference`: `serve`
as it comes against the naive server on the same runtime). Their own knobs are theirs alone, and
they are never part of `best`.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import psutil

from timmserve.bench.config import BenchConfig
from timmserve.bench.machine import cpu_features
from timmserve.errors import ConfigError
from timmserve.settings.config import ServeConfig

BASELINE = "baseline"
BEST = "best"
RAY = "ray"
REFERENCE = "reference"
DEFAULT = "default"
GPU_DECODE = "gpu-decode"
# Not cumulative, never in best: another server for the rungs before them, or serve's own defaults.
SIDE_RUNGS = (RAY, REFERENCE, DEFAULT)


def built_in_rungs(accelerator: str) -> dict[str, dict[str, Any]]:
    """Knobs (ServeConfig field → value) per rung; each rung adds its knobs to those of the rungs
    before it. `precision` only where the device runs reduced precision natively (see
    `unsupported_rungs`). `accelerator`: "cuda" or "cpu"."""
    return {
        BASELINE: {
            "max_batch_size": 1,
            "workers_per_device": 1,
            "precision": "fp32",
            "backend": "eager",
            "decode_threads": 1,
            "fast_decode": False,
            "gpu_decode": False,
        },
        "batching": {"max_batch_size": 64, "batch_timeout": 0.0},
        "workers": {"workers_per_device": 2},
        "precision": {"precision": "fp16" if accelerator == "cuda" else "bf16"},
        # Resolved once per run, before the first rung, by measuring the installed backends here.
        "backend": {"backend": "auto"},
        "decode": {"decode_threads": min(4, psutil.cpu_count() or 1), "fast_decode": True},
        # The batch's JPEGs decoded by nvJPEG on the GPU and resized there (CUDA only). Not a rung:
        # --overlap, measured slower on an H200 at every level (docs/gpu.md); a config file's
        # [rungs.NAME] table measures it.
        GPU_DECODE: {"gpu_decode": True},
        # An engine, not an optimisation: the knobs of the rungs before it, served by Ray Serve, so
        # it compares with the LitServe rung right before it. Never part of `best`.
        RAY: {"engine": "ray"},
        # The naive server: the model called in the request handler, one image per call; the
        # workers, backend, precision and threads of the rungs before it. Never part of `best`.
        REFERENCE: {"max_batch_size": 1},
        # `timmserve serve` as it comes: the shared settings only, everything else the machine rule
        # and `auto` decide (machine.resolve_machine, classifier.resolve_auto). Never part of `best`.
        DEFAULT: {},
    }


def unsupported_rungs(accelerator: str) -> dict[str, str]:
    """Rungs this device cannot run well, with the reason. On a CPU without AVX-512 BF16 or AMX,
    bf16 is emulated: measured here (AVX2 EPYC) it ran the model 14× slower than fp32."""
    unsupported = {}
    if accelerator != "cuda" and not {"avx512_bf16", "amx_bf16"} & set(cpu_features()):
        unsupported["precision"] = (
            "this CPU has no native bf16 (AVX-512 BF16 or AMX); force it with --set precision=bf16"
        )
    if accelerator != "cuda":
        unsupported[GPU_DECODE] = "JPEGs are decoded on the GPU only on a CUDA device (nvJPEG)"
    if importlib.util.find_spec("ray") is None:
        unsupported[RAY] = "Ray Serve is not installed (pip install 'timmserve[ray]')"
    return unsupported


class Ladder:
    """Resolves rung names to ServeConfigs; decides `best` from what the first round measured."""

    def __init__(self, config: BenchConfig, accelerator: str) -> None:
        """The built-in rungs with `config.rung_overrides` applied, less those this device cannot
        run (in `skipped`, with the reason). Raises ConfigError for a rung name nobody defines."""
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
        """The rung's ServeConfig: the shared settings plus baseline's knobs and those of every
        rung up to `name` in the ladder (a side rung's knobs only for itself). Raises RuntimeError
        for `best` before `decide_best`."""
        if name == BEST:
            if self.best_knobs is None:
                raise RuntimeError("best is decided after the first round's other rungs")
            return self.base.replace(**self.best_knobs)
        if name == DEFAULT:
            return self.base.replace(**self.rungs[DEFAULT])
        if name in (RAY, REFERENCE) and self._right_after_default(name):
            return self.base.replace(**{**self.rungs[DEFAULT], **self.rungs[name]})
        knobs = dict(self.rungs[BASELINE])  # the starting point, even when not in the ladder
        for rung in (n for n in self.names if n != BEST):
            if rung == name or rung not in SIDE_RUNGS:
                knobs.update(self.rungs[rung])
            if rung == name:
                break
        return self.base.replace(**knobs)

    def _right_after_default(self, name: str) -> bool:
        position = self.names.index(name) if name in self.names else 0
        return position > 0 and self.names[position - 1] == DEFAULT

    def decide_best(self, peaks: dict[str, float]) -> None:
        """`peaks`: first-round peak req/s per measured rung. Rungs are cumulative, so the fastest
        measured rung carries the knobs of every rung before it: `best` is that configuration plus
        the knobs of the rungs this run did not measure (nothing says they lose); the rungs measured
        after the fastest one only made it slower and are left out."""
        measured = [n for n in self.names if n in peaks and n not in (*SIDE_RUNGS, BEST)]
        kept = measured[: measured.index(max(measured, key=peaks.__getitem__)) + 1] if measured else []
        self.best_left_out = [n for n in measured if n not in kept]
        self.best_from = [n for n in self.rungs if n not in (BASELINE, *SIDE_RUNGS, *self.best_left_out)]
        knobs = dict(self.rungs[BASELINE])
        for name in self.best_from:
            knobs.update(self.rungs[name])
        self.best_knobs = knobs
