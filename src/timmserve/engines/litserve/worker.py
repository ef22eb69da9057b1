"""The LitServe engine's inference worker: the LitAPI that LitServe runs in each worker process.

LitServe starts the worker, calls `setup`, marks it ready and hands control to its loop:
`WorkerLoop`, which takes batches of images from the API servers (transport.py, batching.py) until
the stop message. Each batch is classified by `inference.classify_admitted` (images nobody waits
for skipped, the batch contract checked, metrics) and each image's `list[Prediction] |
RequestError` answered as is: the HTTP endpoints encode it (routes.py).
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import litserve as ls
import torch
from litserve.loops.base import LitLoop

from timmserve.engines.litserve.admission import Admission
from timmserve.engines.litserve.batching import take_batch
from timmserve.engines.litserve.frontend import QueueFrontend
from timmserve.engines.litserve.inference import (
    AdmittedImage,
    StagedBatch,
    classify_admitted,
    decode_admitted,
    finish_admitted,
)
from timmserve.engines.litserve.transport import Answer, Delivery, Endpoints, Stopped, WorkerEnd
from timmserve.http import metrics
from timmserve.logs import configure_logging
from timmserve.model.classifier import Classifier, Result, start_worker_classifier
from timmserve.settings.config import ServeConfig
from timmserve.supervision import exit_with_parent

logger = logging.getLogger(__name__)


class ClassifierAPI(ls.LitAPI):
    """Runs in each inference worker. `__init__` stores config only (in the main process); `setup`
    loads the model (in the worker)."""

    def __init__(self, config: ServeConfig, labels: Sequence[str], frontend: QueueFrontend) -> None:
        """`config` as resolved by startup.prepare; `frontend` is the API servers' side, whose
        admission slots tell the worker which images are still wanted."""
        super().__init__(
            max_batch_size=config.max_batch_size,
            batch_timeout=config.batch_timeout,
            api_path=frontend.api_path,
            loop=WorkerLoop(),
            spec=frontend,
        )
        self.config = config
        self.labels = list(labels)
        self.admission: Admission = frontend.admission
        self.transport_endpoints: Endpoints = frontend.transport_endpoints
        self.classifier: Classifier | None = None

    def setup(self, device: str) -> None:
        started = time.monotonic()
        config = self.config
        configure_logging(config.log_level, config.log_format)
        # Ctrl-C (or systemd's SIGTERM) reaches the whole process group: the main process drains
        # the API servers first and stops the workers after, so a worker must not die of it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        exit_with_parent()  # but not outlive a main process that died without its drain
        self.classifier = start_worker_classifier(config, self.labels, torch.device(device))
        load_seconds = time.monotonic() - started
        metrics.worker_metrics().model_load.set(load_seconds)
        logger.info("worker ready on %s", device, extra={"load_seconds": round(load_seconds, 2)})

    def classify(self, batch: list[AdmittedImage]) -> list[Result]:
        """One result per image of the batch (inference.classify_admitted)."""
        return classify_admitted(self.classifier, self.admission, batch)

    def decode(self, batch: list[AdmittedImage]) -> StagedBatch:
        """Stage 1 of `classify` (inference.decode_admitted)."""
        return decode_admitted(self.classifier, self.admission, batch)

    def finish(self, staged: StagedBatch) -> list[Result]:
        """Stage 2 of `classify` (inference.finish_admitted)."""
        return finish_admitted(self.classifier, staged)


class WorkerLoop(LitLoop):
    """The worker's loop, in place of LitServe's: batches from the transport, answers to it. With
    `--overlap`, the next batch is taken and decoded on a thread of its own while the current one
    is on the model, at most one batch ahead: on a GPU the model need not wait for the CPU."""

    def __call__(self, lit_api: ClassifierAPI, device: str, worker_id: int, *_litserve_queues: object) -> None:
        # LitServe's request queue, response transport and status dict go unused (litserve_internals).
        end = WorkerEnd(lit_api.transport_endpoints, worker_id)
        try:
            if lit_api.config.overlap:
                overlapped(lit_api, end)
            else:
                while True:
                    deliveries = take_batch(end.receive, lit_api.max_batch_size, lit_api.batch_timeout)
                    end.answer(deliveries, _answers(deliveries, lit_api.classify, _payloads(deliveries)))
        except Stopped:
            return
        finally:
            end.close()


def overlapped(lit_api: ClassifierAPI, end: WorkerEnd) -> None:
    """Serve until the stop message with the two stages on two threads: this one runs the model
    (`finish`) and answers; the other takes the next batch and decodes it meanwhile. At most one
    batch is ahead of the model: the next is taken only when the model starts on the one decoded
    (a batch taken early holds only what had arrived by then). A batch whose stage 1 raised (a
    bug, logged) is answered failed here, in order."""
    staged_batches: queue.Queue[tuple[list[Delivery], StagedBatch | None] | None] = queue.Queue()
    room_ahead = threading.Semaphore(1)  # released when the model takes the batch decoded ahead

    def decode_ahead() -> None:
        try:
            while True:
                room_ahead.acquire()
                deliveries = take_batch(end.receive, lit_api.max_batch_size, lit_api.batch_timeout)
                try:
                    staged: StagedBatch | None = lit_api.decode(_payloads(deliveries))
                except Exception:
                    staged = None
                staged_batches.put((deliveries, staged))
        except Stopped:
            pass
        finally:
            staged_batches.put(None)  # the stop message, or a failure of the transport: stop too

    decoder = threading.Thread(target=decode_ahead, name="timmserve-decode-ahead", daemon=True)
    decoder.start()
    while (item := staged_batches.get()) is not None:
        room_ahead.release()
        deliveries, staged = item
        end.answer(deliveries, _answers(deliveries, lit_api.finish, staged))
    decoder.join()


def _payloads(deliveries: list[Delivery]) -> list[AdmittedImage]:
    return [delivery.payload for delivery in deliveries]


def _answers(deliveries: list[Delivery], stage: Callable[[Any], list[Result]], argument: Any) -> list[Answer]:
    """One Answer per delivery: each result of `stage(argument)`, or failed for all when the
    argument is None (its stage 1 raised) or the stage raises (a bug, logged where it happened:
    each image of the batch gets a 500)."""
    if argument is not None:
        try:
            return [Answer(result, ok=True) for result in stage(argument)]
        except Exception:
            pass
    return [Answer(None, ok=False)] * len(deliveries)
