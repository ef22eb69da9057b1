"""An API server's inline lane: a one-image request classified in the API server's own process
when nothing else is in flight, with no hop to an inference worker. JPEGs only (`takes`).

Why: on a CPU at low load there is nothing to batch, and the hop costs more than it can win back —
a request that crosses to a worker and back wakes two processes and pays the transport both ways
(issue 15: p50 at c=1 0.9–2.0 ms above a server that calls the model in its handler). As soon as a
second image is in flight anywhere (admission.py counts them over every API server), images go to
the workers as before, where batching pays; so the lane adds no thread of work under load.

The lane runs on one thread of its own (the event loop keeps parsing and answering meanwhile) with
the same classifier a worker builds (`start_worker_classifier`: backend, precision, one intra-op
thread), loaded as the API server starts, before it accepts connections. It needs one intra-op thread:
the API servers are forked from the main process, which ran the runtime (startup.prepare), and a
runtime's thread pool does not survive a fork — with two threads, eager PyTorch (libgomp) and ONNX
Runtime hang on their first parallel call in the child. machine.resolve_machine enforces that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from timmserve.engines.litserve.admission import Admission
from timmserve.engines.litserve.inference import ABANDONED, AdmittedImage, classify_admitted
from timmserve.errors import InternalError
from timmserve.http import metrics
from timmserve.model.classifier import Classifier, Result, start_worker_classifier
from timmserve.model.types import ImageRequest
from timmserve.settings.config import ServeConfig

logger = logging.getLogger(__name__)

# Every JPEG (JFIF, EXIF, Adobe, MPO …) starts with SOI and a marker's first byte.
JPEG_MAGIC = b"\xff\xd8\xff"


class InlineLane:
    """One classifier in an API server process, for one image at a time (see module doc). Made in
    the main process (config only); `start` loads the model in the API server."""

    def __init__(self, config: ServeConfig, labels: Sequence[str], admission: Admission) -> None:
        """`config` as resolved by startup.prepare (CPU, one intra-op thread); `admission` is the
        server's shared admission slots."""
        self.config = config
        self.labels = list(labels)
        self.admission = admission
        self._executor: ThreadPoolExecutor | None = None
        self._classifier: Classifier | None = None
        self._busy = False

    async def start(self) -> None:
        """Load the model on the lane's thread; returns when it is loaded, or failed to (logged:
        the lane stays unused). Awaited as the API server starts, before it accepts a connection,
        so that every API server that answers has its lane."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="timmserve-inline")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    def claim(self) -> bool:
        """Take the lane for one image: true when its model is loaded and it is idle. Call from the
        event loop only; the lane frees itself when that image's classification ends."""
        if self._busy or self._classifier is None:
            return False
        self._busy = True
        return True

    @staticmethod
    def takes(image: ImageRequest) -> bool:
        """Whether the lane may classify this image: a JPEG (by its first bytes), whose decode and
        resize release the GIL, so the API server's event loop runs on meanwhile (measured here:
        the event loop's longest wait while the lane read an 8000² or a 12-megapixel progressive
        JPEG, 1–6 ms). Pillow's WebP decoder holds the GIL (147 ms in one stretch on a 64-megapixel
        frame: the event loop frozen that long); any other format goes to a worker with it."""
        return image.data.startswith(JPEG_MAGIC)

    async def classify(self, item: AdmittedImage) -> Result:
        """The image's result (after `claim`). Raises InternalError when the classifier raised (a
        bug: logged with the request id)."""
        assert self._busy and self._executor is not None, "claim the lane first"
        future = self._executor.submit(self._classify, item)
        # Freed when the classification ends, not when its waiter gives up (deadline, client gone):
        # an image taken now would only queue behind it.
        future.add_done_callback(self._free)
        try:
            return await asyncio.wrap_future(future)
        except Exception:
            raise InternalError("classifying this request in the API server failed; see the server log") from None

    def close(self) -> None:
        """Wait for the image being classified, if any, and release the model (API server exit)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        if self._classifier is not None:
            self._classifier.close()

    def _load(self) -> None:
        started = time.monotonic()
        try:
            self._classifier = start_worker_classifier(self.config, self.labels, torch.device("cpu"))
        except Exception:
            logger.exception("the API server's inline lane could not load the model; its images go to the workers")
            return
        logger.info("inline lane ready", extra={"load_seconds": round(time.monotonic() - started, 2)})

    def _classify(self, item: AdmittedImage) -> Result:
        [result] = classify_admitted(self._classifier, self.admission, [item])
        if result is not ABANDONED:  # counted as timmserve_images_total counts it
            metrics.worker_metrics().inline_images.inc()
        return result

    def _free(self, _: Future) -> None:
        self._busy = False
