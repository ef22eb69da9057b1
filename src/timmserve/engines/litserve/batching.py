"""The workers' batching policy: take what is queued, wait only as long as asked.

LitServe 0.2.19's batched loop polls its queue every millisecond from the moment it is called and
waits the whole `batch_timeout` for every batch, so a lone request at concurrency 1 always pays the
timeout, and an idle worker keeps polling (~10–15% of a core each, measured here). With
`batch_timeout=0` it spins on an empty queue instead.

`take_batch`:
1. blocks until the first image arrives (an idle worker costs nothing);
2. takes every image already queued behind it, up to the max batch size, without waiting;
3. only then, if the batch is not full and `batch_timeout` > 0, waits for more until
   `batch_timeout` after the first image arrived.

With `batch_timeout=0` (the default) the policy is work-conserving: the model never waits for a
batch to fill while an image is ready, and under load batches grow by themselves, because images
queue up while the model runs the previous batch. A positive timeout trades latency at low load for
bigger batches (worth it on GPUs, where a batch of 32 costs little more than a batch of 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

Item = TypeVar("Item")


def take_batch(receive: Callable[[float | None], Item | None], max_batch_size: int, batch_timeout: float) -> list[Item]:
    """The next batch: 1 to `max_batch_size` items, in arrival order.

    `receive(timeout)` returns the next item, waiting up to `timeout` seconds (None: for ever, 0:
    not at all), or None when none came; whatever it raises (the stop signal) goes through."""
    first = receive(None)
    while first is None:
        first = receive(None)
    deadline = time.monotonic() + batch_timeout
    batch = [first]
    while len(batch) < max_batch_size:
        item = receive(max(0.0, deadline - time.monotonic()))
        if item is None:
            break
        batch.append(item)
    return batch
