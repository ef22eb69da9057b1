"""Direct, in-process throughput: the most a server with this config could do.

- model: pre-made uint8 input tensors → device → normalise → model → softmax → host (what a
  worker's model step does), per batch size;
- pipeline: the same encoded image bytes the load sends → decode + preprocess (the server's
  thread pool) → model → top-k, per batch size: the most a server could do without HTTP.

Each batch size gets one warm-up call, then is timed for a fixed duration (at least one call);
the device→host copy of the result synchronises the device before each timestamp.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from timmserve.model.classifier import Classifier
from timmserve.model.types import ImageRequest


def measure_ceilings(
    classifier: Classifier,
    images: Sequence[bytes],
    batch_sizes: Sequence[int],
    duration: float,
    *,
    pipeline_batch_sizes: Sequence[int] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """{"model": [{"batch_size", "img_per_s"}, …], "pipeline": […]}; the pipeline at
    `pipeline_batch_sizes` (default: the same batch sizes as the model)."""
    channels, height, width = classifier.preprocessor.data_config["input_size"]
    # On CUDA a first call also pays one-off costs (context, kernel choice) far above a batch's time.
    cpu = classifier.device.type == "cpu"
    model_rows, pipeline_rows = [], []
    for batch_size in batch_sizes:
        tensors = torch.randint(0, 256, (batch_size, channels, height, width), dtype=torch.uint8)
        rate = _images_per_second(partial(classifier.probabilities, tensors), batch_size, duration, cpu)
        model_rows.append({"batch_size": batch_size, "img_per_s": rate})
    for batch_size in batch_sizes if pipeline_batch_sizes is None else pipeline_batch_sizes:
        requests = [ImageRequest(images[i % len(images)], 5) for i in range(batch_size)]
        rate = _images_per_second(partial(classifier.classify, requests), batch_size, duration, cpu)
        pipeline_rows.append({"batch_size": batch_size, "img_per_s": rate})
    return {"model": model_rows, "pipeline": pipeline_rows}


def _images_per_second(step: Callable[[], Any], batch_size: int, duration: float, warm_up_counts: bool) -> float:
    """One warm-up call (kernel selection, allocator growth), then calls for `duration` seconds.
    With `warm_up_counts` (the CPU), a warm-up call that alone takes `duration` or longer is the
    measurement: one-off costs are a small part of it (so a 5-second CPU batch is not run twice)."""
    start = time.perf_counter()
    step()
    warm_up = time.perf_counter() - start
    if warm_up_counts and warm_up >= duration:
        return batch_size / warm_up
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < duration:
        step()
        calls += 1
    return calls * batch_size / (time.perf_counter() - start)
