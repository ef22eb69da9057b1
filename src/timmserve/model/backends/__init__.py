"""Inference backends, timm-style: a registry (`registry.BACKENDS`) of small modules, one per
backend (eager.py: eager and compile; onnxruntime.py; openvino.py), the artifacts' cache (cache.py)
and `--backend auto`'s trials (auto.py). Everything the rest of timmserve uses is named here."""

from timmserve.model.backends.auto import (
    Agreement,
    BackendTrial,
    agreement,
    auto_candidates,
    choose_backend,
    decision_key,
    describe_trials,
    probability_tolerance,
    timing_batch_size,
)
from timmserve.model.backends.base import Backend, BackendKind, BackendSpec, autocast
from timmserve.model.backends.cache import cached_artifact, weights_fingerprint, write_atomically
from timmserve.model.backends.openvino import openvino_capabilities
from timmserve.model.backends.registry import AUTO_CANDIDATES, BACKENDS, check_supported, create_backend

__all__ = [
    "AUTO_CANDIDATES", "BACKENDS", "Agreement", "Backend", "BackendKind", "BackendSpec", "BackendTrial",
    "agreement", "auto_candidates", "autocast", "cached_artifact", "check_supported", "choose_backend",
    "create_backend", "decision_key", "describe_trials", "openvino_capabilities", "probability_tolerance",
    "timing_batch_size", "weights_fingerprint", "write_atomically",
]  # fmt: skip
