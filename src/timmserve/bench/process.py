"""A server subprocess on 127.0.0.1 — `timmserve serve`, or the reference server that takes the
same flags — started, waited for until healthy, stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from timmserve.errors import TimmServeError
from timmserve.settings.config import ServeConfig

# What `python -m` runs: the server, or the `reference` rung's naive one (bench/reference.py).
SERVE = ("timmserve", "serve")
REFERENCE_SERVER = ("timmserve.bench.reference",)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`timmserve serve ARGS` (or another `program` taking `--host` and `--port`) on a free
    loopback port, in its own session so that a stuck shutdown can be ended for this server's
    processes only."""

    def __init__(self, args: list[str], *, program: Sequence[str] = SERVE, startup_timeout: float = 300.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = tempfile.NamedTemporaryFile("w", prefix=f"timmserve-{self.port}-", suffix=".log", delete=False)
        self.log_path = Path(log.name)
        self._log = log
        # Given last, so they win over the same flags in `args`.
        command = [sys.executable, "-m", *program, *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_healthy(startup_timeout)

    @classmethod
    def from_config(
        cls, config: ServeConfig, *, program: Sequence[str] = SERVE, startup_timeout: float = 300.0
    ) -> ServerProcess:
        return cls(config.to_cli_args(), program=program, startup_timeout=startup_timeout)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TimmServeError(f"the server exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimmServeError(f"the server was not healthy after {timeout:.0f} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0, signum: int = signal.SIGINT) -> int | None:
        """SIGINT or SIGTERM (a clean shutdown), then SIGKILL to the server's own session if stuck."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
