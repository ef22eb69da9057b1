"""One start-up path for every engine and the bench: resolve the machine, check the model once.

`prepare(config)` runs in the main process before any worker or replica starts, so anything wrong
with the settings, the model, its weights or its labels is one clear error at once. It resolves
what the config left to the machine — the accelerator, the device count, the threads per worker —
into the config it returns, so that every later step (the backend's `auto` timing, the workers,
Ray's replica count and CPU shares, the queue limit) uses the same numbers. The backend's own step
(export, `auto`'s trials) runs in a child process (supervision.run_in_child): the main process, the
supervisor that forks the API servers and handles the stop signals, never starts a runtime's threads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from timmserve.logs import configure_logging
from timmserve.model.backends import check_supported
from timmserve.model.classifier import needs_preparing, prepare_backend
from timmserve.model.factory import ModelInfo, load_model
from timmserve.model.labels import load_labels
from timmserve.settings.config import ServeConfig
from timmserve.settings.machine import describe, resolve_machine
from timmserve.supervision import run_in_child

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


def prepare(config: ServeConfig) -> Prepared:
    """Resolve the machine, load the model and labels once, and prepare the backend in a child
    process (`auto` resolved, artifacts exported into the cache so workers only load them). Raises
    ConfigError or ModelLoadError for anything wrong with the settings, the model, its weights or
    its labels."""
    config = resolve_machine(config)
    device = torch.device(config.accelerator)
    check_supported(config.backend, device, config.precision)
    loaded = load_model(config)  # the workers load their own copy
    labels = load_labels(loaded.info.num_classes, label_file=config.labels, model_label_names=loaded.info.label_names)
    if needs_preparing(config):
        config = run_in_child("preparing the backend", _prepare_backend, config)
    logger.info("serving %s: %s", loaded.info.name, describe(config))
    metadata: dict[str, Any] = {**loaded.info.as_dict(), "labels": len(labels), "config": config.as_dict()}
    return Prepared(config=config, info=loaded.info, labels=labels, metadata=metadata)


def _prepare_backend(config: ServeConfig) -> ServeConfig:
    """classifier.prepare_backend in the child process: it loads its own copy of the model."""
    configure_logging(config.log_level, config.log_format)
    return prepare_backend(config, load_model(config), torch.device(config.accelerator))


def oip_model_name(info: ModelInfo) -> str:
    """The model's name in /v2 URLs: the timm name, or a model folder's own name."""
    return Path(info.name).name
