"""One start-up path for every engine and the bench: resolve the machine, check the model once.

`prepare(config)` runs in the main process before any worker or replica starts, so anything wrong
with the settings, the model, its weights or its labels is one clear error at once. It resolves
what the config left to the machine — the accelerator, the device count, the threads per worker —
into the config it returns, so that every later step (the backend's `auto` timing, the workers,
Ray's replica count and CPU shares, the queue limit) uses the same numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from timmserve.backends import check_supported
from timmserve.classifier import prepare_backend
from timmserve.config import ServeConfig
from timmserve.errors import ConfigError, ModelLoadError
from timmserve.labels import load_labels
from timmserve.machine import usable_cores
from timmserve.model import ModelInfo, load_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """What every worker or replica is started from."""

    config: ServeConfig  # accelerator, devices, torch_threads and backend resolved
    info: ModelInfo
    labels: list[str]
    metadata: dict[str, Any]  # /info's "model": the model's info, label count, the config

    @property
    def device(self) -> torch.device:
        """The device type workers run on (LitServe and Ray pick the index per worker)."""
        return torch.device(self.config.accelerator)


def resolve_accelerator(config: ServeConfig) -> str:
    """ "cpu" or "cuda"; raises ModelLoadError when CUDA is asked for and torch sees none."""
    if config.accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if config.accelerator == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--accelerator cuda was asked for, but torch sees no CUDA device")
    return config.accelerator


# The machine rule for what the config leaves unset (README "Fast by default", measured there): on
# a CPU one single-threaded worker per usable core — the fastest per core here, and a single thread
# never waits in a parallel region for a thread that another process delayed, so throughput falls
# in proportion to the CPU that is left (README "Shared cores"); on a GPU two workers per device,
# so one decodes while the other's batch runs, with big batches and a decode pool.
CPU_MAX_WORKERS = 8
DEFAULTS = {
    "cpu": {"max_batch_size": 16, "decode_threads": 1},
    "cuda": {"workers_per_device": 2, "max_batch_size": 64, "decode_threads": 4},
}


def resolve_machine(config: ServeConfig) -> ServeConfig:
    """The config with everything left to the machine made explicit: `accelerator` ("cpu" or
    "cuda"), `devices` (every GPU unless given; 1 on the CPU), `workers_per_device`,
    `max_batch_size`, `decode_threads` (the machine rule above) and `torch_threads` (the usable
    cores shared out between all workers). Raises ModelLoadError when asked for more GPUs than torch
    sees, ConfigError for a replica bound below the replica count."""
    accelerator = resolve_accelerator(config)
    available = torch.cuda.device_count() if accelerator == "cuda" else 1
    devices = config.devices or available
    if devices > available:
        raise ModelLoadError(f"--devices {devices} was asked for, but torch sees {available} {accelerator} device(s)")
    cores = usable_cores()
    rule = {"workers_per_device": min(cores, CPU_MAX_WORKERS), **DEFAULTS["cpu"]}
    rule = DEFAULTS["cuda"] if accelerator == "cuda" else rule
    unset = {name: value for name, value in rule.items() if getattr(config, name) is None}
    resolved = config.replace(accelerator=accelerator, devices=devices, **unset)
    if resolved.torch_threads is None:
        resolved = resolved.replace(torch_threads=max(1, cores // resolved.worker_count()))
    if resolved.ray_max_replicas is not None and resolved.ray_max_replicas < resolved.worker_count():
        raise ConfigError(
            f"--ray-max-replicas {resolved.ray_max_replicas} is below the starting replica count "
            f"{resolved.worker_count()} (workers per device × devices)"
        )
    return resolved


def describe(config: ServeConfig) -> str:
    """A resolved config's serving choices in one line, for the start-up log."""
    return (
        f"{config.engine} on {config.devices} {config.accelerator} device(s): {config.workers_per_device} "
        f"worker(s) per device × {config.torch_threads} thread(s), backend {config.backend} {config.precision}, "
        f"max batch {config.max_batch_size} (wait {config.batch_timeout:g} s), decode {config.decode_threads} "
        f"thread(s){', fast' if config.fast_decode else ''}"
    )


def prepare(config: ServeConfig) -> Prepared:
    """Resolve the machine, load the model and labels once, and prepare the backend (`auto`
    resolved, artifacts exported into the cache so workers only load them). Raises ConfigError or
    ModelLoadError for anything wrong with the settings, the model, its weights or its labels."""
    config = resolve_machine(config)
    device = torch.device(config.accelerator)
    check_supported(config.backend, device, config.precision)
    loaded = load_model(config)  # the workers load their own copy
    labels = load_labels(loaded.info.num_classes, label_file=config.labels, model_label_names=loaded.info.label_names)
    config = prepare_backend(config, loaded, device)
    logger.info("serving %s: %s", loaded.info.name, describe(config))
    metadata: dict[str, Any] = {**loaded.info.as_dict(), "labels": len(labels), "config": config.as_dict()}
    return Prepared(config=config, info=loaded.info, labels=labels, metadata=metadata)


def oip_model_name(info: ModelInfo) -> str:
    """The model's name in /v2 URLs: the timm name, or a model folder's own name."""
    return Path(info.name).name
