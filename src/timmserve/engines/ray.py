"""`timmserve serve --engine ray`: the same model code behind Ray Serve, for more than one machine.

Only the serving shell differs from the LitServe engine: the model, preprocessing, labels, the
batch function with its per-request errors (`Classifier.classify`), the HTTP layer (routes.py:
`/predict`, `/v2`, the error bodies, the API key, request ids, the access log, the demo page) and
the metrics are the same code. Dynamic batching is Ray Serve's `@serve.batch` with the same max
batch size and wait; replicas take the place of workers (`--workers-per-device` × devices, or
autoscaling up to `--ray-max-replicas`).

What Ray does with each setting (docs/engines.md's engine table says the same):
- `--max-queue`: Ray's own queue bound at the proxy (`max_queued_requests`), 503 with
  `Retry-After: 1` beyond it; each replica also holds up to two batches (`max_ongoing_requests`).
  A request with more images than it gets 413, as on the LitServe engine.
- `--timeout`: 504 from the replica, counted from when a replica takes the request (the time it
  waited in Ray's proxy for a free replica is not counted).
- `--grace-period`: the drain below, and Ray's `graceful_shutdown_timeout_s`.
- `/metrics`: the replicas record timmserve's metrics, under the same names, into one directory;
  a scrape merges them (prometheus-client's multi-process mode). Only on a local Ray instance:
  replicas on other machines cannot share a directory, so with `--ray-address` there is none.
- `--api-servers`, `--inline` and `--overlap`: refused (`check_supported`): Ray runs one HTTP
  proxy per node, every request goes from it to a replica, and its batcher runs one function per
  batch.

Drain (SIGTERM/SIGINT): Ray's proxy owns the port until Serve stops, so instead of closing it
first, every replica answers new requests 503 with `Retry-After` while it finishes the ones it
holds (at most `--grace-period`); then Serve and Ray stop.
"""

# No `from __future__ import annotations` here: Ray pickles the deployment class by value.
import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse

from timmserve.errors import AnswerTimeoutError, ConfigError, ModelLoadError, PayloadTooLargeError, UnavailableError
from timmserve.http import metrics, routes
from timmserve.http.middleware import ASGIApp, Receive, ResponseHeaders, Scope, Send
from timmserve.http.payload import PayloadLimits
from timmserve.http.routes import Call
from timmserve.logs import configure_logging
from timmserve.model.classifier import Result, start_worker_classifier
from timmserve.model.prepare import Prepared, oip_model_name, prepare
from timmserve.model.types import ImageRequest
from timmserve.settings.config import ServeConfig
from timmserve.supervision import stop_on_signals

logger = logging.getLogger(__name__)

REPLICA_HEADER = "X-Timmserve-Replica"
APP_NAME = "timmserve"
DRAIN_ACTOR = "timmserve-drain"  # in the namespace APP_NAME
# Settings this engine cannot honour, and why: set to anything but their default, they are refused.
UNSUPPORTED = {
    "api_servers": "Ray Serve runs one HTTP proxy per node",
    "inline": "a replica is its own process behind Ray's proxy, so every request makes that hop",
    "overlap": "Ray Serve's batcher runs one function per batch",
    "grpc_port": "Ray Serve's gRPC proxy serves its own service definitions, not the inference protocol's",
}


def check_supported(config: ServeConfig) -> None:
    """Raises ConfigError, one line naming the option, for a setting this engine does not honour."""
    for name, reason in UNSUPPORTED.items():
        if getattr(config, name) != ServeConfig.model_fields[name].default:
            raise ConfigError(f"--{name.replace('_', '-')} is not supported by --engine ray: {reason}")


@ray.remote(num_cpus=0)
class DrainSignal:
    """Tells every replica that the server drains, and counts those that have finished."""

    def __init__(self) -> None:
        self._draining = asyncio.Event()
        self._watching = 0
        self._finished = 0

    async def wait(self) -> None:
        """A replica's call, from its start: returns once the drain begins."""
        self._watching += 1
        await self._draining.wait()

    async def drain(self) -> int:
        """Begins the drain; the number of replicas told."""
        self._draining.set()
        return self._watching

    async def finished(self) -> None:
        """A replica's call once it has answered what it held."""
        self._finished += 1

    async def finished_count(self) -> int:
        return self._finished


@dataclass
class DrainState:
    """One replica's side of the drain: requests inside its app, and whether the server drains."""

    draining: bool = False
    in_flight: int = 0


class DrainGate:
    """ASGI middleware, innermost: counts the requests it lets through; once the server drains,
    answers new ones 503 with Retry-After (the error path's own body, logged and counted)."""

    def __init__(self, app: ASGIApp, state: DrainState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif self.state.draining:
            error = UnavailableError("the server is shutting down; retry later", retry_after=1)
            response = await routes.error_response(Request(scope), error)
            await response(scope, receive, send)
        else:
            self.state.in_flight += 1
            try:
                await self.app(scope, receive, send)
            finally:
                self.state.in_flight -= 1


@dataclass(frozen=True)
class ReceivedImage:
    """An image on its way through a replica's batcher (metrics.Admitted)."""

    image: ImageRequest
    request_id: str
    admitted_at: float  # time.monotonic(), when the replica took the request


@serve.deployment
@serve.ingress()
class ClassifierReplica:
    """One replica: a copy of the model, its batcher, and timmserve's HTTP contract (routes.py)."""

    def __init__(self, prepared: Prepared, api_key: str | None) -> None:
        """`api_key` is read once, in the process that deploys (a replica may run on another machine)."""
        started = time.monotonic()
        config = prepared.config
        configure_logging(config.log_level, config.log_format)
        self.prepared = prepared
        self.api_key = api_key
        self.drain = DrainState()
        self.classifier = start_worker_classifier(config, prepared.labels, prepared.device)
        self.classify_batch.set_max_batch_size(config.max_batch_size)
        self.classify_batch.set_batch_wait_timeout_s(config.batch_timeout)
        metrics.load_metrics().queue_limit.set(config.queue_limit())
        metrics.worker_metrics().model_load.set(time.monotonic() - started)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The replica's FastAPI app (Ray calls this once the constructor has finished)."""
        config, info = self.prepared.config, self.prepared.info
        app = FastAPI(title="timmserve (Ray Serve)", lifespan=self._lifespan)
        server = {"engine": "ray", "devices": [str(self.classifier.device)]}
        metadata = {"model": self.prepared.metadata, "server": server}

        @app.get("/health")
        async def health() -> PlainTextResponse:
            return PlainTextResponse("ok")  # Ray routes only to replicas whose constructor finished

        @app.get("/info")
        async def info_endpoint() -> JSONResponse:
            return JSONResponse(metadata)

        service = routes.InferenceService(
            model_name=oip_model_name(info),
            limits=PayloadLimits.of(config, info.num_classes),
            classify=self.classify,
            ready=lambda: True,  # as /health
            # Set by build_app where the replicas share a directory: every scrape merges them all.
            metrics=(lambda: metrics.render(None)) if metrics.MULTIPROC_ENV in os.environ else None,
        )
        app.add_middleware(DrainGate, state=self.drain)  # first, so innermost: 503s are logged and counted
        routes.install(
            app, service, api_key=self.api_key, random_weights=info.random_weights, proxy_sets_request_id=True
        )
        app.add_middleware(ResponseHeaders, headers={REPLICA_HEADER: serve.get_replica_context().replica_id.unique_id})
        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        follower = asyncio.create_task(self._follow_drain())
        yield
        follower.cancel()

    async def _follow_drain(self) -> None:
        """Once run_ray_server drains: new requests get 503 (DrainGate), and the signal hears when
        this replica has answered the requests it held, or its grace period ran out."""
        try:
            signal = ray.get_actor(DRAIN_ACTOR, namespace=APP_NAME)
        except ValueError:  # deployed by Ray's own tooling (serve run, a RayService), which drains its own way
            return
        await signal.wait.remote()
        self.drain.draining = True
        deadline = time.monotonic() + self.prepared.config.grace_period
        while self.drain.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await signal.finished.remote()

    async def classify(self, images: Sequence[ImageRequest], call: Call) -> list[Result]:
        """routes.Classify: each image through the replica's batcher, concurrently, within the
        request timeout (504; the images not yet in a batch leave the batcher's queue). A request
        with more images than --max-queue is refused as the LitServe engine refuses it (413)."""
        limit = self.prepared.config.queue_limit()
        if len(images) > limit:
            raise PayloadTooLargeError.too_many_images(len(images), limit)
        request_id = call.request_id
        received = [ReceivedImage(image, request_id, time.monotonic()) for image in images]
        in_flight = metrics.load_metrics().in_flight
        in_flight.inc(len(received))
        try:
            return await asyncio.wait_for(self._through_batcher(received), self.prepared.config.timeout)
        except asyncio.TimeoutError:
            raise AnswerTimeoutError.after(self.prepared.config.timeout) from None
        finally:
            in_flight.dec(len(received))

    async def _through_batcher(self, received: list[ReceivedImage]) -> list[Result]:
        # A task of its own (wait_for's), which takes gather's outcome even when cancelled.
        return list(await asyncio.gather(*(self.classify_batch(item) for item in received)))

    @serve.batch
    async def classify_batch(self, batch: list[ReceivedImage]) -> list[Result]:
        # Off the event loop, so requests keep arriving (and the next batch filling) meanwhile.
        return await asyncio.to_thread(self._classify, batch)

    def _classify(self, batch: list[ReceivedImage]) -> list[Result]:
        started = time.monotonic()
        answers = self.classifier.classify([item.image for item in batch])
        metrics.record_batch(started, batch, answers)
        return answers


def build_app(config: ServeConfig, metrics_dir: Path | None = None) -> serve.Application:
    """The Ray Serve application for the config; the settings and the model are checked in this
    process first (ConfigError, ModelLoadError). `metrics_dir`: a directory every replica can
    write (all on this machine), merged by `/metrics`; None: no `/metrics`."""
    check_supported(config)
    api_key = config.api_key()
    prepared = prepare(config)
    config = prepared.config
    actor_options: dict[str, Any] = {
        "num_cpus": config.torch_threads,
        "num_gpus": 1 / config.workers_per_device if config.accelerator == "cuda" else 0,
    }
    if metrics_dir is not None:  # in the environment before anything imports prometheus-client
        actor_options["runtime_env"] = {"env_vars": {metrics.MULTIPROC_ENV: str(metrics_dir)}}
    options: dict[str, Any] = {
        "ray_actor_options": actor_options,
        "max_ongoing_requests": 2 * config.max_batch_size,  # one batch running, one filling
        "max_queued_requests": config.queue_limit(),
        "backpressure_config": {"retry_after_s": 1},  # as the LitServe engine's 503 when full
        "graceful_shutdown_timeout_s": config.grace_period,
        "logging_config": serve_logging(config),
    }
    replicas = config.worker_count()
    if config.ray_max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": config.ray_max_replicas}
    else:
        options["num_replicas"] = replicas
    # Ray sets CUDA_VISIBLE_DEVICES per replica: "cuda" is that replica's GPU.
    return ClassifierReplica.options(**options).bind(prepared, api_key)


def serve_logging(config: ServeConfig) -> dict[str, Any]:
    """Ray Serve's own log lines at --log-level and in --log-format; its access line per request
    is off (timmserve.access writes one, with the request id)."""
    encoding = "JSON" if config.log_format == "json" else "TEXT"
    return {"log_level": config.log_level.upper(), "encoding": encoding, "enable_access_log": False}


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For Ray's own tooling: `serve run timmserve.engines.ray:app_builder max_batch_size=16`, or a
    RayService's `import_path` with `args` (settings named as in ServeConfig)."""
    return build_app(ServeConfig.from_mapping({**args, "engine": "ray"}))


def run_ray_server(config: ServeConfig) -> None:
    """Serve on Ray until SIGINT or SIGTERM, then drain: a local Ray instance, or the cluster at `ray_address`."""
    configure_logging(config.log_level, config.log_format)
    with tempfile.TemporaryDirectory(prefix="timmserve-metrics-") as directory:
        # Not in this process's environment: Ray's own processes would inherit it.
        application = build_app(config, Path(directory) if config.ray_address is None else None)
        _serve(config, application)


def _serve(config: ServeConfig, application: serve.Application) -> None:
    deployed = False
    try:
        # JSON: Ray's own lines too, and the lines it forwards from replicas without its "(pid=…)" prefix.
        logging_config = ray.LoggingConfig(encoding="JSON", log_level=config.log_level.upper())
        ray.init(
            address=config.ray_address,
            include_dashboard=False,
            logging_level=config.log_level.upper(),
            logging_config=logging_config if config.log_format == "json" else None,
        )
        # After ray.init, which installs a SIGTERM handler of its own that aborts the process.
        stop_on_signals()
        drain_signal = DrainSignal.options(name=DRAIN_ACTOR, namespace=APP_NAME).remote()
        serve.start(http_options={"host": config.host, "port": config.port}, logging_config=serve_logging(config))
        serve.run(application, name=APP_NAME, route_prefix="/")
        deployed = True
        logger.info("serving on Ray at http://%s:%d", config.host, config.port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("shutting down: draining in-flight requests", extra={"grace_period_s": config.grace_period})
    except ConnectionError as exc:  # --ray-address: no cluster there, or it refused this process
        raise ConfigError(
            f"cannot join the Ray cluster at {config.ray_address} ({exc}); a cluster with token "
            "authentication also needs RAY_AUTH_MODE=token and its token here (see `ray get-auth-token`)"
        ) from None
    except RuntimeError as exc:
        raise ModelLoadError(f"Ray Serve could not start the application: {exc}") from None
    finally:
        if deployed:
            drain(drain_signal, config.grace_period)
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()


def drain(signal: Any, grace_period: float) -> None:
    """Every replica answers new requests 503 from now on; wait until each has answered what it
    held (each gives up after `grace_period`). The port stays Ray's until Serve stops, after this:
    deleting the application first would answer Ray's 404 meanwhile. A second signal ends the wait."""
    started = time.monotonic()
    try:
        told = ray.get(signal.drain.remote())
        # A replica that died without saying so holds the wait to the grace period (and the replies' round trip).
        deadline = started + grace_period + 5
        while ray.get(signal.finished_count.remote()) < told and time.monotonic() < deadline:
            time.sleep(0.05)
    except KeyboardInterrupt:
        logger.warning("second stop signal: stopping now")
    logger.info("drained", extra={"drain_s": round(time.monotonic() - started, 2)})
