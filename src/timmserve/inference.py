"""What happens to admitted images wherever the LitServe engine classifies them: in an inference
worker (worker.py) or in an API server's inline lane (inline.py).

`classify_admitted` drops the images whose request is gone (their admission slot was freed:
answered 504, client left), classifies the rest as one batch, checks the batch contract (one
result per image, as Ray Serve's batcher checks its batch functions), records the batch's metrics
and returns one `list[Prediction] | RequestError` per image, `ABANDONED` for those it dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from timmserve import metrics
from timmserve.admission import Admission, Ticket
from timmserve.classifier import Classifier, Result
from timmserve.errors import ClientGoneError, InternalError
from timmserve.payload import ImageRequest

logger = logging.getLogger(__name__)

# The answer for an image whose request has gone: no one receives it.
ABANDONED = ClientGoneError("the request had already been answered or abandoned")


@dataclass(frozen=True)
class AdmittedImage:
    """One admitted image on its way to a model call: the slot it holds and its request."""

    image: ImageRequest
    ticket: Ticket
    request_id: str
    admitted_at: float  # time.monotonic(): one clock for every process on the machine


def classify_admitted(classifier: Classifier, admission: Admission, batch: Sequence[AdmittedImage]) -> list[Result]:
    """One result per image of `batch`, in order; images that nobody waits for any more are skipped
    (`ABANDONED`). Raises InternalError when the classifier breaks the batch contract (a bug), and
    whatever the classifier raised (a bug too: logged here with the batch's request ids)."""
    started = time.monotonic()
    wanted = [admission.is_live(item.ticket) for item in batch]
    live = [item for item, keep in zip(batch, wanted) if keep]
    try:
        answers = classifier.classify([item.image for item in live]) if live else []
        if len(answers) != len(live):
            raise InternalError(f"the classifier returned {len(answers)} results for {len(live)} images")
    except Exception:
        logger.exception("a batch failed", extra={"request_ids": [item.request_id for item in live]})
        raise
    metrics.record_batch(started, live, answers, abandoned=len(batch) - len(live))
    remaining = iter(answers)
    return [next(remaining) if keep else ABANDONED for keep in wanted]
