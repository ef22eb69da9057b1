"""Assemble and run the LitServer: the model is checked in this process first, so a bad name, file
or label list is one clear error before any worker starts; then the workers load it for real."""

from __future__ import annotations

import logging
import os
import signal
from importlib.resources import files
from types import FrameType
from typing import Any

import litserve as ls
import torch
from starlette.responses import HTMLResponse

from timmserve import openapi
from timmserve.api import ClassifierAPI
from timmserve.config import ServeConfig
from timmserve.errors import ModelLoadError
from timmserve.labels import load_labels
from timmserve.model import check_precision_supported, load_model

logger = logging.getLogger(__name__)


def resolve_accelerator(config: ServeConfig) -> str:
    if config.accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if config.accelerator == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--accelerator cuda was asked for, but torch sees no CUDA device")
    return config.accelerator


def build_server(config: ServeConfig) -> ls.LitServer:
    """A LitServer for the config; raises ModelLoadError for anything wrong with model or labels."""
    accelerator = resolve_accelerator(config)
    check_precision_supported(torch.device(accelerator), config.precision)
    loaded = load_model(config)
    info = loaded.info
    del loaded  # the workers load their own copy; this one only proved that loading works
    labels = load_labels(info.num_classes, label_file=config.labels, model_label_names=info.label_names)
    metadata: dict[str, Any] = {**info.as_dict(), "labels": len(labels), "config": config.as_dict()}
    server = ls.LitServer(
        ClassifierAPI(config, info, labels),
        accelerator=accelerator,
        devices=config.devices or "auto",
        workers_per_device=config.workers_per_device,
        timeout=config.timeout,
        model_metadata=metadata,
    )
    _serve_demo_page(server)
    openapi.document(server.app)
    return server


def _serve_demo_page(server: ls.LitServer) -> None:
    """The browser page at `/`, in place of LitServe's plain-text index."""
    page = (files("timmserve") / "static" / "index.html").read_text(encoding="utf-8")

    async def demo_page() -> HTMLResponse:
        return HTMLResponse(page)

    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) != "/"]
    server.app.add_api_route("/", demo_page, methods=["GET"], include_in_schema=False)


def run_server(config: ServeConfig) -> None:
    """Serve until SIGINT or SIGTERM."""
    server = build_server(config)
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
        )
    except RuntimeError as exc:
        if "workers failed to start" in str(exc):
            raise ModelLoadError("an inference worker failed to start; its error is in the log above") from None
        raise


def stop_on_signals() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt in this process, so `finally` blocks and context
    managers clean up. SIGINT is set too because a shell starts background jobs with SIGINT
    ignored. Forked children (LitServe's API servers) get the defaults back, so uvicorn's own
    graceful shutdown runs there."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _raise_keyboard_interrupt)
    os.register_at_fork(after_in_child=_restore_default_signals)


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _restore_default_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
