"""`timmserve bench`'s entry point: measure the ladder of rungs (rungs.py) with the runner
(runner.py), or one running server; aggregate the rounds (aggregate.py); return results.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from timmserve.bench.aggregate import add_efficiency, aggregate_rung
from timmserve.bench.config import BenchConfig
from timmserve.bench.load import measure_client_capacity
from timmserve.bench.machine import environment
from timmserve.bench.runner import Runner
from timmserve.errors import ConfigError
from timmserve.model import photos
from timmserve.model.factory import ModelInfo, load_model
from timmserve.model.labels import load_labels
from timmserve.settings.machine import resolve_accelerator

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def run_bench(config: BenchConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the ladder (or one running server with `config.url`); returns results.json's dict
    (rates in req/s and img/s, latencies in ms, durations in seconds). Raises ConfigError for an
    unknown rung or no images, ModelLoadError for a model that does not load, TimmServeError when
    a server or the client-capacity echo server does not start."""
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
    runner = Runner(config, images, labels, accelerator, progress, log)
    if config.url is not None:
        measured = [runner.run_url(measure_ceiling)]
        ladder_notes: dict[str, Any] = {}
    else:
        measured, ladder_notes = runner.run_ladder()
    results = {
        "env": {**environment(accelerator), "started": started},
        "model": _model_section(info),
        "client_capacity_req_per_s": round(capacity, 1),
        "bench": {**config.as_dict(), "ladder_notes": ladder_notes},
        "runs": [aggregate_rung(rung.name, rung.config, rung.rounds) for rung in measured],
    }
    add_efficiency(results)
    return results


def load_images(path: Path | None) -> list[bytes]:
    """A photo, or every image file in a folder (sorted, cycled by the load); default: the cat
    photo. Raises ConfigError for a folder without images."""
    path = path or photos.CAT
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    return [f.read_bytes() for f in files]


def _model_section(info: ModelInfo | None) -> dict[str, Any]:
    if info is None:
        return {"name": None, "weights": None, "params": None, "input_size": None}
    return {
        "name": info.name,
        "weights": info.weights,
        "params": info.params,
        "input_size": list(info.data_config["input_size"]),
    }
