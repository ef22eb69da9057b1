"""`--backend auto`: measure the installed backends on this machine and keep the fastest whose
answers agree with eager fp32 (`choose_backend`). The fastest backend depends on the machine
(measured on a 2-core AVX2 EPYC, tf_efficientnet_lite0 fp32 img/s at batch 1/8/32: eager 32/32/16,
compile 43/53/43, OpenVINO 90/83/92, ONNX Runtime 97/107/109)."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from timmserve.errors import ModelLoadError
from timmserve.model.backends.base import Backend, BackendSpec
from timmserve.model.backends.cache import library_version, weights_fingerprint
from timmserve.model.backends.registry import AUTO_CANDIDATES, BACKENDS, create_backend
from timmserve.settings.machine import cpu_features, device_name, native_reduced_precision

AUTO_TIMING_SLICES = 4  # round-robin slices per candidate when `auto` times them


def decision_key(model: torch.nn.Module, spec: BackendSpec, candidates: Sequence[tuple[str, str]]) -> str:
    """What an `auto` decision depends on, hashed: the weights, the machine (device name, CPU
    instruction sets), the libraries' versions, the threads, batch size (`timing_batch_size`),
    memory format and input shape it was timed with, and the candidates."""
    libraries = [
        f"{kind.package}={library_version(kind.package)}"
        for kind in BACKENDS.values()
        if kind.package is not None and kind.installed()
    ]
    parts = [
        weights_fingerprint(model),
        device_name(spec.device),
        ",".join(cpu_features()),
        f"torch={torch.__version__}",
        *libraries,
        f"threads={spec.threads}",
        f"batch={timing_batch_size(spec)}",
        f"channels_last={spec.channels_last}",
        "x".join(map(str, spec.input_size)),
        *(f"{name}:{precision}" for name, precision in candidates),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def timing_batch_size(spec: BackendSpec) -> int:
    """The batch size `auto` times candidates at: what a busy server mostly runs, at most 8."""
    return min(8, spec.max_batch_size)


@dataclass(frozen=True)
class Agreement:
    """How a backend's answers compare with eager fp32 on the same inputs."""

    top1_agree: int
    images: int
    max_prob_diff: float  # largest |Δ softmax probability| over all images and classes
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.top1_agree == self.images and self.max_prob_diff <= self.tolerance

    def as_dict(self) -> dict[str, Any]:
        return {
            "top1_agree": self.top1_agree,
            "images": self.images,
            "max_prob_diff": float(f"{self.max_prob_diff:.3g}"),
            "tolerance": self.tolerance,
            "ok": self.ok,
        }


# Largest |Δ probability| accepted against eager fp32: fp32 backends differ only in summation order
# (measured ≤ 1e-5 here); bf16 keeps 8 bits of mantissa and moves logits by up to a few percent.
PROBABILITY_TOLERANCE = {"fp32": 1e-3, "fp16": 0.02, "bf16": 0.05}
# A JPEG decoded at a reduced DCT scale (--fast-decode) is a slightly different picture: on the
# reference photos it moved one probability by 0.022 here, top-1 unchanged.
FAST_DECODE_TOLERANCE = 0.05


def probability_tolerance(precision: str, fast_decode: bool = False) -> float:
    return PROBABILITY_TOLERANCE[precision] + (FAST_DECODE_TOLERANCE if fast_decode else 0.0)


def agreement(reference_logits: torch.Tensor, logits: torch.Tensor, tolerance: float) -> Agreement:
    reference, probs = reference_logits.float().softmax(1), logits.float().softmax(1)
    return Agreement(
        top1_agree=int((reference.argmax(1) == probs.argmax(1)).sum()),
        images=reference.shape[0],
        max_prob_diff=float((reference - probs).abs().max()),
        tolerance=tolerance,
    )


@dataclass(frozen=True)
class BackendTrial:
    name: str
    precision: str
    img_per_s: float | None  # None: could not run here
    agreement: Agreement | None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        agreed = self.agreement.as_dict() if self.agreement is not None else None
        return {"backend": self.name, "precision": self.precision, "img_per_s": self.img_per_s,
                "agreement": agreed, "error": self.error}  # fmt: skip


def auto_candidates(backend: str, precision: str, device: torch.device) -> list[tuple[str, str]]:
    """The (backend, precision) pairs `auto` measures: every `auto` backend where `backend` is
    "auto", and fp32 plus the device's native reduced precision (machine.native_reduced_precision)
    where `precision` is "auto"; a pinned value is the only candidate of its kind."""
    names = AUTO_CANDIDATES if backend == "auto" else (backend,)
    reduced = native_reduced_precision(device)
    precisions = (precision,) if precision != "auto" else ("fp32", reduced) if reduced else ("fp32",)
    return [(name, p) for name in names for p in precisions]


def choose_backend(
    model: torch.nn.Module,
    spec: BackendSpec,
    inputs: torch.Tensor,
    candidates: Sequence[tuple[str, str]],
    *,
    seconds: float = 1.0,
) -> tuple[BackendTrial, list[BackendTrial]]:
    """`auto`: build every candidate (backend, precision), check its answers on `inputs`
    (normalised photos) against eager fp32 within that precision's tolerance, time it at the batch
    size the server will mostly see, keep the fastest that agrees. The timing interleaves the
    candidates in short slices (each keeps its best slice), so a machine whose speed drifts favours
    none of them. Returns (the chosen trial, every trial); raises ModelLoadError when none runs and
    agrees."""
    with torch.inference_mode():
        reference = model.float().eval()(inputs.to(torch.float32)).float()
    batch_size = timing_batch_size(spec)
    timing_batch = inputs[torch.arange(batch_size) % inputs.shape[0]].to(spec.device)
    built: dict[tuple[str, str], tuple[Backend, Agreement]] = {}
    errors: dict[tuple[str, str], str] = {}
    for name, precision in candidates:
        try:
            backend = create_backend(name, model, dataclasses.replace(spec, precision=precision))
        except ModelLoadError as exc:
            errors[name, precision] = str(exc)
            continue
        logits = backend(inputs.to(spec.device)).cpu()
        built[name, precision] = (backend, agreement(reference, logits, probability_tolerance(precision)))
    rates = dict.fromkeys(built, 0.0)
    for _ in range(AUTO_TIMING_SLICES):
        for key, (backend, _agreed) in built.items():
            rates[key] = max(rates[key], _images_per_second(backend, timing_batch, seconds / AUTO_TIMING_SLICES))
    trials = [
        BackendTrial(name, precision, rates[name, precision], built[name, precision][1])
        if (name, precision) in built
        else BackendTrial(name, precision, None, None, errors[name, precision])
        for name, precision in candidates
    ]
    usable = [t for t in trials if t.img_per_s is not None and t.agreement is not None and t.agreement.ok]
    if not usable:
        raise ModelLoadError(f"no candidate backend runs here and agrees with eager fp32: {describe_trials(trials)}")
    return max(usable, key=lambda t: t.img_per_s or 0.0), trials


def _images_per_second(backend: Backend, batch: torch.Tensor, seconds: float) -> float:
    backend(batch)  # warm-up
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        backend(batch)
        calls += 1
    return calls * batch.shape[0] / (time.perf_counter() - start)


def describe_trials(trials: Sequence[BackendTrial]) -> str:
    """One line per trial for the start-up log."""
    lines = []
    for trial in trials:
        label = f"{trial.name} {trial.precision}"
        if trial.img_per_s is None:
            lines.append(f"{label}: not available ({trial.error})")
        else:
            agreed = trial.agreement
            verdict = "agrees" if agreed and agreed.ok else "DISAGREES"
            detail = f"top-1 {agreed.top1_agree}/{agreed.images}, max Δp {agreed.max_prob_diff:.1e}" if agreed else ""
            lines.append(f"{label}: {trial.img_per_s:.1f} img/s, {verdict} with eager fp32 ({detail})")
    return "; ".join(lines)
