"""The LitServe engine's inference worker: the LitAPI that LitServe runs in each worker process.

LitServe starts the worker, calls `setup`, marks it ready and hands control to its loop:
`WorkerLoop`, which takes batches of images from the API servers (transport.py, batching.py) until
the stop message. Each batch is classified by `inference.classify_admitted` (images nobody waits
for skipped, the batch contract checked, metrics) and each image's `list[Prediction] |
RequestError` answered as is: the HTTP endpoints encode it (routes.py).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Sequence

import litserve as ls
import torch
from litserve.loops.base import LitLoop

from timmserve import metrics
from timmserve.admission import Admission
from timmserve.batching import take_batch
from timmserve.classifier import Classifier, Result, start_worker_classifier
from timmserve.config import ServeConfig
from timmserve.frontend import QueueFrontend
from timmserve.inference import AdmittedImage, classify_admitted
from timmserve.logs import configure_logging
from timmserve.transport import Answer, Endpoints, Stopped, WorkerEnd

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
        self.classifier = start_worker_classifier(config, self.labels, torch.device(device))
        load_seconds = time.monotonic() - started
        metrics.worker_metrics().model_load.set(load_seconds)
        logger.info("worker ready on %s", device, extra={"load_seconds": round(load_seconds, 2)})

    def classify(self, batch: list[AdmittedImage]) -> list[Result]:
        """One result per image of the batch (inference.classify_admitted)."""
        return classify_admitted(self.classifier, self.admission, batch)


class WorkerLoop(LitLoop):
    """The worker's loop, in place of LitServe's: batches from the transport, answers to it."""

    def __call__(self, lit_api: ClassifierAPI, device: str, worker_id: int, *_litserve_queues: object) -> None:
        # LitServe's request queue, response transport and status dict go unused (litserve_internals).
        end = WorkerEnd(lit_api.transport_endpoints, worker_id)
        try:
            while True:
                deliveries = take_batch(end.receive, lit_api.max_batch_size, lit_api.batch_timeout)
                try:
                    answers = [Answer(result, ok=True) for result in lit_api.classify([d.payload for d in deliveries])]
                except Exception:  # a bug, logged by `classify`: each image of the batch gets a 500
                    answers = [Answer(None, ok=False)] * len(deliveries)
                end.answer(deliveries, answers)
        except Stopped:
            return
        finally:
            end.close()
