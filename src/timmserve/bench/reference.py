"""The `reference` rung's server: the naive way to serve a model, to see whether timmserve's serving
design pays for itself on this machine. FastAPI + uvicorn with the model called in the request
handler: one image per model call, no batching, no queue between processes; `uvicorn --workers N`
for N = the rung's workers per device, each process loading the model with the rung's backend,
precision and threads, all on the first device (a naive server does not spread over GPUs).

Everything but the serving design is timmserve's own: the start-up checks (startup.prepare), the
classifier and its warm-up (classifier.start_worker_classifier), request parsing, answers and
errors (routes.install), so a comparison measures the design, not different code. It takes
`timmserve serve`'s flags; those of the queue, batching and engines do nothing here:

    python -m timmserve.bench.reference --model resnet18.a1_in1k --workers-per-device 2 --port 8001
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import uvicorn
from fastapi import FastAPI
from starlette.responses import PlainTextResponse

from timmserve.http import routes
from timmserve.http.payload import PayloadLimits
from timmserve.logs import configure_logging
from timmserve.model.classifier import Result, start_worker_classifier
from timmserve.model.prepare import Prepared, oip_model_name, prepare
from timmserve.model.types import ImageRequest
from timmserve.settings.config import ServeConfig
from timmserve.settings.options import options

# The folder the workers start from: prepared.pickle, written before they start, and a ready-PID
# file from each worker once its model is loaded.
STATE_ENV = "TIMMSERVE_REFERENCE_STATE"


WORKER_HEALTHCHECK_S = 120.0


@click.command()
@options(ServeConfig)
def main(**settings: Any) -> None:
    """Check the model once, then serve it from uvicorn's workers until SIGINT or SIGTERM."""
    config = ServeConfig.from_mapping({name: value for name, value in settings.items() if value is not None})
    log_config = configure_logging(config.log_level, config.log_format)
    prepared = prepare(config.replace(devices=1))  # threads: the cores shared between its workers
    with tempfile.TemporaryDirectory(prefix="timmserve-reference-") as state:
        with open(Path(state, "prepared.pickle"), "wb") as f:
            pickle.dump(prepared, f)
        os.environ[STATE_ENV] = state  # the workers uvicorn starts inherit it
        uvicorn.run(
            "timmserve.bench.reference:create_app",  # imported by each worker (not __main__)
            factory=True,
            host=config.host,
            port=config.port,
            workers=config.workers_per_device,
            log_level=config.log_level,
            log_config=log_config,
            access_log=False,
            # uvicorn kills a worker that misses its 5 s ping; a worker importing torch and loading
            # the model misses it on a busy machine, and was killed and restarted for ever.
            timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
        )


def create_app() -> FastAPI:
    """One uvicorn worker's app, made before the worker accepts a connection: its own model,
    loaded and warmed up. `/health` answers 200 once every worker has loaded its model."""
    state = Path(os.environ[STATE_ENV])
    with open(state / "prepared.pickle", "rb") as f:
        prepared: Prepared = pickle.load(f)  # written by `main` in a folder only this user can read
    config = prepared.config
    classifier = start_worker_classifier(config, prepared.labels, prepared.device)
    (state / f"ready-{os.getpid()}").touch()

    def ready() -> bool:
        return len(list(state.glob("ready-*"))) >= config.workers_per_device

    async def classify(images: Sequence[ImageRequest], call: routes.Call) -> list[Result]:
        # The naive design: the model runs in the handler and holds this worker's event loop, so
        # each worker serves one request at a time.
        return classifier.classify(images)

    app = FastAPI(title="timmserve reference server")

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("ok") if ready() else PlainTextResponse("loading", status_code=503)

    service = routes.InferenceService(
        model_name=oip_model_name(prepared.info),
        limits=PayloadLimits.of(config, prepared.info.num_classes),
        classify=classify,
        ready=ready,
    )
    routes.install(app, service, api_key=config.api_key(), random_weights=prepared.info.random_weights)
    return app


if __name__ == "__main__":
    main()
