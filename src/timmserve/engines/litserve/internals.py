"""Every private piece of LitServe that timmserve touches, in one place (pinned: litserve==0.2.19).

LitServe supervises the processes (spawns the inference workers, forks the API servers, replaces a
dead worker, keeps each worker's status); timmserve carries the images itself (transport.py),
because LitServe's request path costs more per request than the whole image (issue 15) and cannot
express per-image answers from a batch, a deadline that covers inference, or a drain that loses no
admitted request. Where the two meet:

- the call LitServe makes to a worker's loop once the worker is set up and marked ready:
  `loop(lit_api, device, worker_id, request_queue, transport, workers_setup_status,
  callback_runner)` (worker.WorkerLoop takes the first three);
- the key of a worker in `LitServer.workers_setup_status` (`worker_status_key`), and its values;
- the number LitServe gives each API server on the LitSpec before forking it
  (`spec.response_queue_id`, 0…n-1), and `LitServer.inference_workers` (one per worker id);
- the LitServer methods `server.TimmServer` overrides (`OVERRIDDEN_SERVER_METHODS`), among them
  `lifespan`, which LitServe hands to FastAPI as each API server's start and end;
- the monitor thread that replaces dead workers, and the event that ends it (`stop_monitor`).

tests/unit/test_internals.py checks each of these against the installed LitServe, so a
version that moves one fails there, loudly, instead of somewhere in the request path.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import litserve as ls
from litserve.utils import WorkerSetupStatus

# The name LitServe gives its monitor thread (`LitServer._start_worker_monitoring`).
MONITOR_THREAD_NAME = "litserve-monitoring"

# LitServer methods that TimmServer overrides (checked against the installed LitServe by the tests).
OVERRIDDEN_SERVER_METHODS = (
    "_start_server",
    "_init_manager",
    "_perform_graceful_shutdown",
    "launch_single_inference_worker",
    "lifespan",
)


def worker_status_key(api_path: str, worker_id: int) -> str:
    """The key of a worker in `LitServer.workers_setup_status` (`"predict_0"` for `/predict`)."""
    return f"{api_path.split('/')[-1]}_{worker_id}"


def worker_ready(statuses: Mapping[str, str], api_path: str, worker_id: int) -> bool:
    """Whether that worker is up (LitServe's monitor sets STARTING while it replaces a dead one)."""
    return statuses.get(worker_status_key(api_path, worker_id)) == WorkerSetupStatus.READY


def all_workers_ready(statuses: Mapping[str, str]) -> bool:
    """At least one worker, and every worker ready."""
    return bool(statuses) and all(value == WorkerSetupStatus.READY for value in statuses.values())


def stop_monitor(server: ls.LitServer, timeout: float) -> None:
    """End LitServe's monitor (no worker is replaced after this) and wait up to `timeout` seconds
    for its last round, which may be starting a replacement, to finish."""
    server._shutdown_event.set()
    for thread in threading.enumerate():
        if thread.name == MONITOR_THREAD_NAME:
            thread.join(timeout)
