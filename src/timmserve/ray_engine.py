"""`timmserve serve --engine ray`: the same model code behind Ray Serve, for more than one machine.

Only the serving shell differs from the LitServe engine: the model, preprocessing, labels, the
batch function with its per-request errors (`Classifier.classify`), the body parsing and the
answers are the same code. Dynamic batching is Ray Serve's `@serve.batch` with the same max batch
size and wait; replicas take the place of workers (`--workers-per-device` × devices, or
autoscaling up to `--ray-max-replicas`); Ray's own queue bound (`max_queued_requests`) answers 503
beyond `--max-queue`. The HTTP layer is the LitServe engine's own (routes.py): `/predict`, the Open
Inference Protocol under `/v2`, the error bodies, the API key, request ids and the access log. Not
here: the LitServe engine's admission slots and the end-to-end `--timeout` (Ray's queue bound and
its own request timeout take their place), and `/metrics` (Ray Serve exports its own).
"""

# No `from __future__ import annotations` here: Ray pickles the deployment class by value.
import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse

from timmserve import routes
from timmserve.classifier import Result, start_worker_classifier
from timmserve.config import ServeConfig
from timmserve.errors import ConfigError, ModelLoadError
from timmserve.logs import configure_logging
from timmserve.middleware import ResponseHeaders
from timmserve.payload import ImageRequest, PayloadLimits
from timmserve.server import stop_on_signals
from timmserve.startup import Prepared, oip_model_name, prepare

logger = logging.getLogger(__name__)

REPLICA_HEADER = "X-Timmserve-Replica"
APP_NAME = "timmserve"


@serve.deployment
@serve.ingress()
class ClassifierReplica:
    """One replica: a copy of the model, its batcher, and timmserve's HTTP contract (routes.py)."""

    def __init__(self, prepared: Prepared, api_key: str | None) -> None:
        """`api_key` is read once, in the process that deploys (a replica may run on another machine)."""
        config = prepared.config
        configure_logging(config.log_level, config.log_format)
        self.prepared = prepared
        self.api_key = api_key
        self.classifier = start_worker_classifier(config, prepared.labels, prepared.device)
        self.classify_batch.set_max_batch_size(config.max_batch_size)
        self.classify_batch.set_batch_wait_timeout_s(config.batch_timeout)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The replica's FastAPI app (Ray calls this once the constructor has finished)."""
        config, info = self.prepared.config, self.prepared.info
        app = FastAPI(title="timmserve (Ray Serve)")
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
            limits=PayloadLimits(config.max_body_bytes, info.num_classes, config.top_k),
            classify=self.classify,
            ready=lambda: True,  # as /health
        )
        routes.install(app, service, api_key=self.api_key, random_weights=info.random_weights)
        app.add_middleware(ResponseHeaders, headers={REPLICA_HEADER: serve.get_replica_context().replica_id.unique_id})
        return app

    async def classify(self, images: Sequence[ImageRequest], request: Request) -> list[Result]:
        """routes.Classify: each image through the replica's batcher, concurrently."""
        return list(await asyncio.gather(*(self.classify_batch(image) for image in images)))

    @serve.batch
    async def classify_batch(self, requests: list[ImageRequest]) -> list[Result]:
        # Off the event loop, so requests keep arriving (and the next batch filling) meanwhile.
        return await asyncio.to_thread(self.classifier.classify, requests)


def build_app(config: ServeConfig) -> serve.Application:
    """The Ray Serve application for the config; the model is checked in this process first."""
    api_key = config.api_key()
    prepared = prepare(config)
    config = prepared.config
    options: dict[str, Any] = {
        "ray_actor_options": {
            "num_cpus": config.torch_threads,
            "num_gpus": 1 / config.workers_per_device if config.accelerator == "cuda" else 0,
        },
        "max_ongoing_requests": 2 * config.max_batch_size,  # one batch running, one filling
        "max_queued_requests": config.queue_limit(),
        "graceful_shutdown_timeout_s": config.grace_period,
        # Replicas log at --log-level too (Ray's access line per request is INFO).
        "logging_config": {"log_level": config.log_level.upper()},
    }
    replicas = config.worker_count()
    if config.ray_max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": config.ray_max_replicas}
    else:
        options["num_replicas"] = replicas
    # Ray sets CUDA_VISIBLE_DEVICES per replica: "cuda" is that replica's GPU.
    return ClassifierReplica.options(**options).bind(prepared, api_key)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For Ray's own tooling: `serve run timmserve.ray_engine:app_builder max_batch_size=16`, or a
    RayService's `import_path` with `args` (settings named as in ServeConfig)."""
    return build_app(ServeConfig.from_mapping({**args, "engine": "ray"}))


def run_ray_server(config: ServeConfig) -> None:
    """Serve on Ray until SIGINT or SIGTERM: a local Ray instance, or the cluster at `ray_address`."""
    configure_logging(config.log_level, config.log_format)
    application = build_app(config)
    deployed = False
    try:
        ray.init(address=config.ray_address, include_dashboard=False, logging_level=config.log_level.upper())
        # After ray.init, which installs a SIGTERM handler of its own that aborts the process.
        stop_on_signals()
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(application, name=APP_NAME, route_prefix="/")
        deployed = True
        logger.info("serving on Ray at http://%s:%d", config.host, config.port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("shutting down Ray Serve")
    except ConnectionError as exc:  # --ray-address: no cluster there, or it refused this process
        raise ConfigError(
            f"cannot join the Ray cluster at {config.ray_address} ({exc}); a cluster with token "
            "authentication also needs RAY_AUTH_MODE=token and its token here (see `ray get-auth-token`)"
        ) from None
    except RuntimeError as exc:
        raise ModelLoadError(f"Ray Serve could not start the application: {exc}") from None
    finally:
        if deployed:
            # Deleting the application first lets every replica finish the requests it holds (up
            # to --grace-period); serve.shutdown() alone stops the proxy with them in flight.
            serve.delete(APP_NAME)
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
