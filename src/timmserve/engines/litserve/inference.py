"""What happens to admitted images wherever the LitServe engine classifies them: in an inference
worker (worker.py) or in an API server's inline lane (inline.py).

`classify_admitted` drops the images whose request is gone (their admission slot was freed:
answered 504, client left), classifies the rest as one batch, checks the batch contract (one
result per image, as Ray Serve's batcher checks its batch functions), records the batch's metrics
and returns one `list[Prediction] | RequestError` per image, `ABANDONED` for those it dropped. It
is the classifier's two stages in turn, which a worker with `--overlap` runs on two threads
(`decode_admitted`, `finish_admitted`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from timmserve.engines.litserve.admission import Admission, Ticket
from timmserve.errors import ClientGoneError, InternalError
from timmserve.http import metrics
from timmserve.model.classifier import Classifier, DecodedBatch, Result
from timmserve.model.types import ImageRequest

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


@dataclass(frozen=True)
class StagedBatch:
    """A batch of admitted images between the two stages (`decode_admitted`, `finish_admitted`)."""

    batch: Sequence[AdmittedImage]
    wanted: list[bool]  # per image: its request still waits for it
    decoded: DecodedBatch  # of the wanted images only
    started: float  # time.monotonic() when stage 1 began


def classify_admitted(classifier: Classifier, admission: Admission, batch: Sequence[AdmittedImage]) -> list[Result]:
    """One result per image of `batch`, in order; images that nobody waits for any more are skipped
    (`ABANDONED`). Raises InternalError when the classifier breaks the batch contract (a bug), and
    whatever the classifier raised (a bug too: logged here with the batch's request ids)."""
    return finish_admitted(classifier, decode_admitted(classifier, admission, batch))


def decode_admitted(classifier: Classifier, admission: Admission, batch: Sequence[AdmittedImage]) -> StagedBatch:
    """Stage 1 (Classifier.decode) of the images still wanted. Raises what the classifier raised
    (a bug: logged)."""
    started = time.monotonic()
    wanted = [admission.is_live(item.ticket) for item in batch]
    live = [item for item, keep in zip(batch, wanted) if keep]
    with _logged_failure(live):
        decoded = classifier.decode([item.image for item in live])
    return StagedBatch(batch, wanted, decoded, started)


def finish_admitted(classifier: Classifier, staged: StagedBatch) -> list[Result]:
    """Stage 2 (Classifier.finish), the batch contract checked and the batch's metrics recorded:
    one result per image of the staged batch, `ABANDONED` for those skipped."""
    live = [item for item, keep in zip(staged.batch, staged.wanted) if keep]
    with _logged_failure(live):
        answers = classifier.finish(staged.decoded) if live else []
        if len(answers) != len(live):
            raise InternalError(f"the classifier returned {len(answers)} results for {len(live)} images")
    metrics.record_batch(staged.started, live, answers, abandoned=len(staged.batch) - len(live))
    remaining = iter(answers)
    return [next(remaining) if keep else ABANDONED for keep in staged.wanted]


@contextmanager
def _logged_failure(live: Sequence[AdmittedImage]) -> Iterator[None]:
    try:
        yield
    except Exception:
        logger.exception("a batch failed", extra={"request_ids": [item.request_id for item in live]})
        raise
