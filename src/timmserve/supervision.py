"""The server's processes and their supervisor: heavy one-off work runs in a child, and no process
outlives the process that started it.

- `run_in_child(function, *args)` runs start-up work that starts a runtime's threads (ONNX Runtime's
  and OpenVINO's pools, OpenMP's) in a spawned process, so the main process — which later forks the
  API servers and handles the stop signals — never holds them. A first start (an empty cache: the
  backend exported and `auto`'s trials timed in the main process) left 12 threads in the main
  process against 5 on a second start, and on Zen 4 every stop signal then made it die of SIGSEGV
  and left its children running (issue 23).
- `exit_with_parent()` makes the calling process exit once its parent has gone: the supervisor's
  drain stops every child it started, and a supervisor that dies without one (killed, crashed) no
  longer leaves workers and API servers holding memory and the port for ever.
- `stop_on_signals()` turns SIGTERM and SIGINT into the supervisor's drain, and makes every child it
  forks leave the stop signals to it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from types import FrameType
from typing import Any, TypeVar

from timmserve.errors import ModelLoadError, TimmServeError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How often a child checks that its parent is alive: an orphan exits within this.
PARENT_WATCH_INTERVAL_S = 0.25
# Exit status of a process whose supervisor has gone (EX_SOFTWARE would be a bug of its own).
ORPHAN_EXIT_CODE = 3


def run_in_child(what: str, function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a spawned child process; its result, or the TimmServeError it raised,
    here. `function` must be importable by name and its arguments and result picklable. Raises
    ModelLoadError when the child dies without an answer (a crash, the OOM killer), with `what`
    (e.g. "preparing the backend") in the message; any other exception in the child is raised here
    as a RuntimeError that carries its traceback (a bug). The child is killed if this process is
    interrupted meanwhile."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(sender, function, args), name=f"timmserve-{what}", daemon=True)
    child.start()
    sender.close()  # this process's copy: the child's end closing is then EOF here
    try:
        try:
            ok, value = receiver.recv()
        except EOFError:
            child.join()
            raise ModelLoadError(f"{what} failed: its process died with exit code {child.exitcode}") from None
    finally:
        receiver.close()
        if child.is_alive():  # interrupted (a stop signal) or an answer already in: no orphan either way
            child.kill()
        child.join()
    if ok:
        return value
    if isinstance(value, TimmServeError):
        raise value
    raise RuntimeError(f"{what} failed in its process:\n{value}")


def _child_main(sender: Connection, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
    exit_with_parent()
    try:
        answer: tuple[bool, Any] = (True, function(*args))
    except TimmServeError as exc:
        answer = (False, exc)
    except BaseException:  # a bug: its traceback goes to the parent as text (it may not pickle)
        answer = (False, traceback.format_exc())
    sender.send(answer)
    sender.close()


def exit_with_parent() -> None:
    """Exit this process (status ORPHAN_EXIT_CODE, at once: no cleanup that could wait on the dead
    parent) within PARENT_WATCH_INTERVAL_S of its parent's death. A daemon thread polls the parent
    id, which changes when the process is re-parented: unlike PR_SET_PDEATHSIG, whose signal comes
    when the *thread* that started the child ends, it holds for children that LitServe's monitor
    thread starts."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_WATCH_INTERVAL_S)
        logger.error("the supervising process %d has gone; exiting", parent)
        os._exit(ORPHAN_EXIT_CODE)

    threading.Thread(target=watch, name="timmserve-parent-watch", daemon=True).start()


def stop_on_signals() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt in this process, so `finally` blocks and context
    managers clean up. SIGINT is set too because a shell starts background jobs with SIGINT
    ignored. Forked children (LitServe's manager and API servers) ignore both: the API servers'
    uvicorn installs its own graceful handlers, and the manager must outlive the drain. They exit
    if this process dies without its drain (`exit_with_parent`)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _raise_keyboard_interrupt)
    os.register_at_fork(after_in_child=_forked_child)


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _forked_child() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent()
