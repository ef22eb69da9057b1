"""Assemble and run the LitServer: the model is checked in this process first, so a bad name, file
or label list is one clear error before any worker starts; then the workers load it for real.

Process tree: this main process (LitServe's supervisor), a multiprocessing manager (the workers'
statuses), the API servers (uvicorn, forked) and the inference workers (spawned); images go from
API servers to workers and back over transport.py's sockets, not through the manager. A worker
that dies is replaced by LitServe's monitor (`restart_workers`): the other workers keep serving
meanwhile, `/health` answers 503 until the new one is ready, and the images that were on the dead
worker go to a live one (frontend.py).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import litserve as ls

from timmserve.engines.litserve import internals
from timmserve.engines.litserve.admission import Admission
from timmserve.engines.litserve.frontend import QueueFrontend
from timmserve.engines.litserve.inline import InlineLane
from timmserve.engines.litserve.transport import Endpoints, stop_workers
from timmserve.engines.litserve.worker import ClassifierAPI
from timmserve.errors import ConfigError, ModelLoadError
from timmserve.http import metrics, routes
from timmserve.http.payload import PayloadLimits
from timmserve.http.protocol import limited_protocol
from timmserve.logs import configure_logging
from timmserve.model.prepare import oip_model_name, prepare
from timmserve.settings.config import ServeConfig
from timmserve.supervision import stop_on_signals

logger = logging.getLogger(__name__)


class TimmServer(ls.LitServer):
    """LitServer with a shutdown that loses no admitted request.

    LitServe stops its API servers one after another, each with the full grace period, while its
    monitor may restart the workers being stopped, and it stops workers with SIGTERM. Here: every
    API server is told at once to stop accepting and finish what it has (uvicorn's graceful
    shutdown), within one shared grace period, while the workers keep answering and the monitor
    keeps replacing any that dies; then the monitor is stopped; then each worker gets the stop
    message (transport.py); then the manager stops. The children ignore SIGTERM and SIGINT
    themselves (see `stop_on_signals`), so a signal sent to the whole process group (Ctrl-C,
    systemd) drains the same way.

    The LitServer methods overridden here are private (internals.OVERRIDDEN_SERVER_METHODS,
    checked against the installed LitServe by the tests)."""

    grace_period: float = 30.0
    transport_endpoints: Endpoints  # the transport's sockets (set by build_server)
    inline_lane: InlineLane | None = None  # each API server's own, when the config has one
    grpc_endpoint: GrpcEndpoint | None = None  # with --grpc-port

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """LitServe's start and end of each API server, in its process: the inline lane loads its
        model and the gRPC endpoint starts before the API server accepts connections; at the end
        (once uvicorn's HTTP drain is over) the gRPC endpoint drains, and the inline lane waits for
        its last image."""
        if self.inline_lane is not None:
            await self.inline_lane.start()
        grpc_server = await self.grpc_endpoint.start() if self.grpc_endpoint is not None else None
        try:
            async with super().lifespan(app):
                yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(self.grace_period)
            if self.inline_lane is not None:
                self.inline_lane.close()

    def _start_server(self, port: int, num_servers: int, log_level: str, sockets: list[socket.socket],
                      worker_type: str, **kwargs: Any) -> dict[int, BaseProcess | threading.Thread]:  # fmt: skip
        self.uvicorn_graceful_timeout = self.grace_period
        self._listening_sockets = sockets
        return super()._start_server(port, num_servers, log_level, sockets, worker_type, **kwargs)

    def _init_manager(self, num_api_servers: int) -> Any:
        # LitServe forks its manager process after binding the port. Left open there, the port
        # would keep accepting connections during a drain that nobody will ever answer.
        forking_manager = True

        def close_server_sockets_in_manager() -> None:
            if forking_manager:
                _close_server_sockets()

        os.register_at_fork(after_in_child=close_server_sockets_in_manager)
        try:
            return super()._init_manager(num_api_servers)
        finally:
            forking_manager = False

    def launch_single_inference_worker(self, lit_api: ls.LitAPI, worker_id: int) -> BaseProcess:
        """LitServe's monitor calls this only to replace a worker that died (and logs it at info level only)."""
        dead = self.inference_workers[worker_id]
        logger.error(
            "inference worker %d (pid %s) died with exit code %s; starting a replacement",
            worker_id, dead.pid, dead.exitcode,
        )  # fmt: skip
        return super().launch_single_inference_worker(lit_api, worker_id)

    def _perform_graceful_shutdown(
        self,
        manager: Any,
        uvicorn_workers: dict[int, BaseProcess | threading.Thread],
        shutdown_reason: str = "normal",
    ) -> None:
        # The signal usually interrupts the main thread inside a manager call (LitServe waits on
        # a manager Event), which leaves this thread's manager connection out of step: the next
        # call on it would block for ever. The drain runs on a thread with a connection of its own.
        api_servers = [w for w in uvicorn_workers.values() if isinstance(w, BaseProcess) and w.is_alive()]
        drain = threading.Thread(target=self._drain, args=(manager, api_servers), name="timmserve-shutdown")
        drain.start()
        try:
            drain.join()
        except KeyboardInterrupt:  # a second SIGINT/SIGTERM: stop now
            logger.warning("second stop signal: killing the server's processes")
            for process in [*api_servers, *self.inference_workers]:
                process.kill()
            drain.join()

    def _drain(self, manager: Any, api_servers: list[BaseProcess]) -> None:
        started = time.monotonic()
        logger.info("shutting down: draining in-flight requests", extra={"grace_period_s": self.grace_period})
        for sock in getattr(self, "_listening_sockets", []):
            sock.close()  # this process's copy: once the API servers close theirs, the port is free
        for process in api_servers:
            process.terminate()  # SIGTERM: uvicorn stops accepting, finishes in-flight requests
        _join_or_kill(api_servers, started + self.grace_period, "API server")
        drained = time.monotonic() - started
        # The monitor ran until now: a worker that died during the drain was replaced, and the API
        # servers sent its images to a live one. No more replacements from here on.
        internals.stop_monitor(self, timeout=5)
        stop_workers(self.transport_endpoints, len(self.inference_workers))
        _join_or_kill(self.inference_workers, time.monotonic() + 5, "inference worker")
        manager.shutdown()
        logger.info("stopped", extra={"drain_s": round(drained, 2), "total_s": round(time.monotonic() - started, 2)})


@dataclass(frozen=True)
class GrpcEndpoint:
    """What each API server needs to serve gRPC (http/grpc.py, imported there: gRPC's core must
    start after the fork). The port is checked free in the main process, so a port in use is one
    clear error at start-up rather than API servers that fail to start."""

    service: routes.InferenceService
    api_key: str | None
    host: str
    port: int

    def __post_init__(self) -> None:
        if any(importlib.util.find_spec(package) is None for package in ("grpc", "tritonclient")):  # not imported
            raise ConfigError("--grpc-port needs gRPC: pip install 'timmserve[grpc]'")
        with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET) as probe:
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise ConfigError(f"--grpc-port {self.port}: cannot listen on {self.host} ({exc.strerror})") from None

    async def start(self) -> Any:
        """The gRPC server of this API server process, serving."""
        from timmserve.http.grpc import GrpcServer

        server = GrpcServer(self.service, api_key=self.api_key, host=self.host, port=self.port)
        await server.start()
        return server


def _close_server_sockets() -> None:
    """Close every inherited TCP socket that is bound but not connected: a server's socket, listening
    or about to (uvicorn calls listen() only in the API servers). Linux: found through /proc."""
    fd_dir = "/proc/self/fd"
    if not os.path.isdir(fd_dir):
        return
    for name in os.listdir(fd_dir):
        try:
            sock = socket.socket(fileno=int(name))
        except OSError:  # not a socket, or the directory's own descriptor, gone already
            continue
        server_socket = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
        if server_socket:
            try:
                sock.getpeername()
                server_socket = False  # connected: not a server socket
            except OSError:
                pass
        fd = sock.detach()
        if server_socket:
            os.close(fd)


def _join_or_kill(processes: list[BaseProcess], deadline: float, kind: str) -> None:
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            logger.warning("%s %s did not stop in time; killing it", kind, process.pid)
            process.kill()
            process.join()


def build_server(config: ServeConfig, endpoints: Endpoints) -> TimmServer:
    """A server for the config, its processes connected through sockets in `endpoints`; raises
    ConfigError or ModelLoadError for anything wrong with the settings, the model or the labels."""
    api_key = config.api_key()
    prepared = prepare(config)
    config = prepared.config
    # Created here, in the main process: LitServe forks the API servers and hands the LitAPI to the
    # spawned workers, so all of them share the admission slots' memory.
    admission = Admission(config.queue_limit())
    inline_lane = InlineLane(config, prepared.labels, admission) if config.inline else None
    frontend = QueueFrontend(admission, endpoints, timeout=config.timeout, inline=inline_lane)
    server = TimmServer(
        ClassifierAPI(config, prepared.labels, frontend),
        accelerator=config.accelerator,
        devices=config.devices,
        workers_per_device=config.workers_per_device,
        timeout=False,  # QueueFrontend owns the end-to-end request timeout
        model_metadata=prepared.metadata,
        restart_workers=True,
    )
    server.grace_period = config.grace_period
    server.transport_endpoints = endpoints
    server.inline_lane = inline_lane
    # LitServe checks its workers every 2 s: /health said 200 for up to 2 s after a worker died.
    server.monitor_internal = 0.1
    service = routes.InferenceService(
        model_name=oip_model_name(prepared.info),
        limits=PayloadLimits.of(config, prepared.info.num_classes),
        classify=frontend.classify,
        ready=frontend.ready,
        metrics=lambda: metrics.render(admission),
    )
    routes.install(server.app, service, api_key=api_key, random_weights=prepared.info.random_weights)
    if config.grpc_port is not None:
        server.grpc_endpoint = GrpcEndpoint(service, api_key, config.host, config.grpc_port)
    return server


def run_server(config: ServeConfig) -> None:
    """Serve until SIGINT or SIGTERM, then drain (see TimmServer)."""
    log_config = configure_logging(config.log_level, config.log_format)
    with metrics.metrics_directory(), Endpoints.private() as endpoints:
        server = build_server(config, endpoints)
        # LitServe shuts down cleanly on KeyboardInterrupt only: without this, SIGTERM leaves the
        # API-server and worker processes alive, holding the port.
        stop_on_signals()
        try:
            server.run(
                host=config.host,
                port=config.port,
                num_api_servers=config.api_servers,
                log_level=config.log_level,
                generate_client_file=False,
                access_log=False,  # timmserve.access logs each request, with its request id
                log_config=log_config,
                http=limited_protocol(config.client_timeout),  # bounds on request heads (uvicorn keeps none)
                # No route speaks WebSocket, and uvicorn's WebSocket protocol is outside those bounds
                # (a held upgrade request ignored --client-timeout and made SIGTERM answer 500s).
                ws="none",
            )
        except RuntimeError as exc:
            if "workers failed to start" in str(exc):
                raise ModelLoadError("an inference worker failed to start; its error is in the log above") from None
            raise
