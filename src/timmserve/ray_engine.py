"""`timmserve serve --engine ray`: the same model code behind Ray Serve, for more than one machine.

Only the serving shell differs from the LitServe engine: the model, preprocessing, labels, the
batch function with its per-request errors (`Classifier.classify`), the body parsing and the
answers are the same code. Dynamic batching is Ray Serve's `@serve.batch` with the same max batch
size and wait; replicas take the place of workers (`--workers-per-device` × devices, or
autoscaling up to `--ray-max-replicas`); Ray's own queue bound (`max_queued_requests`) answers 503
beyond `--max-queue`. Ray Serve brings its own metrics, health checking and rolling updates; the
LitServe engine's admission slots, `/metrics`, API key and request ids are not part of this shell.
"""

# No `from __future__ import annotations` here: Ray pickles the deployment class by value, and
# FastAPI must still resolve `request: Request` to a type, not a string, in the replica.
import asyncio
import logging
import time
from typing import Any

import ray
import torch
from fastapi import FastAPI, Request
from ray import serve
from starlette.responses import JSONResponse, PlainTextResponse

from timmserve.api import RANDOM_WEIGHTS_HEADER
from timmserve.classifier import Result, start_worker_classifier
from timmserve.config import ServeConfig
from timmserve.errors import ConfigError, ModelLoadError, RequestError
from timmserve.logs import configure_logging
from timmserve.payload import ImageRequest, PayloadLimits, parse_predict_request, predictions_body
from timmserve.server import check_model, resolve_accelerator, stop_on_signals

logger = logging.getLogger(__name__)

REPLICA_HEADER = "X-Timmserve-Replica"
APP_NAME = "timmserve"

app = FastAPI(title="timmserve (Ray Serve)")


@serve.deployment
@serve.ingress(app)
class ClassifierReplica:
    """One replica: a copy of the model, its batcher, and the HTTP contract of `POST /predict`."""

    def __init__(self, config: ServeConfig, labels: list[str], metadata: dict[str, Any], device: str) -> None:
        configure_logging(config.log_level, config.log_format)
        self.classifier, info = start_worker_classifier(config, labels, torch.device(device), config.worker_count())
        self.limits = PayloadLimits(config.max_body_bytes, info.num_classes, config.top_k)
        self.metadata = metadata
        self.device = str(self.classifier.device)
        replica = serve.get_replica_context().replica_id.unique_id
        self.headers = {REPLICA_HEADER: replica}
        if info.random_weights:
            self.headers[RANDOM_WEIGHTS_HEADER] = "true; throughput studies only"
        self.classify_batch.set_max_batch_size(config.max_batch_size)
        self.classify_batch.set_batch_wait_timeout_s(config.batch_timeout)

    @serve.batch
    async def classify_batch(self, requests: list[ImageRequest]) -> list[Result]:
        # Off the event loop, so requests keep arriving (and the next batch filling) meanwhile.
        return await asyncio.to_thread(self.classifier.classify, requests)

    @app.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        try:
            result = await self.classify_batch(await parse_predict_request(request, self.limits))
            if isinstance(result, RequestError):
                raise result
        except RequestError as error:
            headers = {**self.headers, **error.headers}
            return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=headers)
        return JSONResponse(predictions_body(result), headers=self.headers)

    @app.get("/health")
    async def health(self) -> PlainTextResponse:
        return PlainTextResponse("ok")  # Ray routes only to replicas whose constructor finished

    @app.get("/info")
    async def info(self) -> JSONResponse:
        return JSONResponse({"model": self.metadata, "server": {"engine": "ray", "devices": [self.device]}})


def build_app(config: ServeConfig) -> serve.Application:
    """The Ray Serve application for the config; the model is checked in this process first."""
    accelerator = resolve_accelerator(config)
    config, _info, labels, metadata = check_model(config, accelerator)
    replicas = config.worker_count()
    threads = config.torch_threads_per_worker(replicas)
    options: dict[str, Any] = {
        "ray_actor_options": {
            "num_cpus": threads,
            "num_gpus": 1 / config.workers_per_device if accelerator == "cuda" else 0,
        },
        "max_ongoing_requests": 2 * config.max_batch_size,  # one batch running, one filling
        "max_queued_requests": config.queue_limit(),
        "graceful_shutdown_timeout_s": config.grace_period,
        # Replicas log at --log-level too (Ray's access line per request is INFO).
        "logging_config": {"log_level": config.log_level.upper()},
    }
    if config.ray_max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": config.ray_max_replicas}
    else:
        options["num_replicas"] = replicas
    device = "cuda" if accelerator == "cuda" else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES per replica
    return ClassifierReplica.options(**options).bind(config, labels, metadata, device)


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
