"""The workers' batching policy: take what is queued, wait only as long as asked.

LitServe 0.2.19's batched loop polls its queue every millisecond from the moment it is called and
waits the whole `batch_timeout` for every batch, so a lone request at concurrency 1 always pays the
timeout, and an idle worker keeps polling (~10–15% of a core each, measured here). With
`batch_timeout=0` it spins on an empty queue instead.

This loop:
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
from queue import Queue
from typing import Any

from litserve import LitAPI
from litserve.loops.simple_loops import BatchedLoop
from litserve.transport.base import MessageTransport

from timmserve import litserve_internals

# How long the first `get` blocks before the loop goes round again (LitServe's own stop signal
# arrives through the queue, so this only bounds how stale the loop may be).
IDLE_WAIT_SECONDS = 1.0


class DrainingBatchLoop(BatchedLoop):
    def get_batch_requests(
        self, lit_api: LitAPI, request_queue: Queue, transport: MessageTransport
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """(payloads, timed-out ids) as LitServe's loop expects; nothing times out in the queue here
        (the API servers own each request's deadline)."""
        first = self.get_request(request_queue, timeout=IDLE_WAIT_SECONDS)
        if first is None:
            return [], []
        deadline = time.monotonic() + lit_api.batch_timeout
        payloads = [self._accept(first, lit_api, transport)]
        while len(payloads) < lit_api.max_batch_size:
            remaining = deadline - time.monotonic()
            item = self.get_request(request_queue, block=remaining > 0, timeout=remaining if remaining > 0 else None)
            if item is None:
                break
            payloads.append(self._accept(item, lit_api, transport))
        return payloads, []

    def _accept(self, item: Any, lit_api: LitAPI, transport: MessageTransport) -> tuple[Any, ...]:
        response_queue_id, uid, payload = litserve_internals.unpack(item)  # StopLoop on the stop signal
        litserve_internals.send_start(self, transport, response_queue_id, uid)
        return response_queue_id, uid, payload
