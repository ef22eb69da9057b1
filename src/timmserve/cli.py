"""`timmserve serve | classify`.

Known errors print one line and exit 1; set TIMMSERVE_DEBUG=1 for the traceback. torch and
LitServe are imported inside the commands that need them, so `--help` and `classify` stay quick.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from timmserve.client import DEFAULT_URL
from timmserve.config import (
    ACCELERATORS,
    BACKEND_CHOICES,
    ENGINES,
    HOSTS,
    LADDER,
    LOG_LEVELS,
    PRECISIONS,
    BenchConfig,
    ServeConfig,
    parse_setting,
    read_api_key,
    read_config_file,
)
from timmserve.errors import ConfigError, TimmServeError
from timmserve.logs import LOG_FORMATS

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServeConfig)}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="timmserve")
def cli() -> None:
    """Serve timm image classifiers over HTTP, and measure how well they are served."""


def model_options(command: Callable) -> Callable:
    """--model, --checkpoint, --random-weights, --labels: which model, for serve and bench alike."""
    options = [
        click.option(
            "--model",
            help="timm model name (hub weights), or a timm model folder. Default: the built-in "
            "tf_efficientnet_lite0 with ImageNet weights, offline.",
        ),
        click.option(
            "--checkpoint",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Weights for --model: .safetensors, or .pth/.pt (loaded weights-only, never as a pickle).",
        ),
        click.option("--random-weights", is_flag=True, help="The architecture untrained: throughput studies only."),
        click.option(
            "--labels",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Class names, one per line (default: ImageNet names from timm).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML file with settings named like these options (flags given here win).",
)
@model_options
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default=_DEFAULTS["engine"],
    show_default=True,
    help="litserve: one machine. ray: Ray Serve replicas on one machine or a cluster (pip install 'timmserve[ray]').",
)
@click.option("--ray-address", help="Join this Ray cluster (default: start a local Ray instance).")
@click.option("--ray-max-replicas", type=int, help="Ray: autoscale from the replica count up to this many.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=_DEFAULTS["precision"], show_default=True)
@click.option("--channels-last", is_flag=True, help="NHWC memory format for the model and its inputs.")
@click.option(
    "--backend",
    type=click.Choice(BACKEND_CHOICES),
    default=_DEFAULTS["backend"],
    show_default=True,
    help="Inference backend; auto measures the installed ones here and keeps the fastest that agrees with eager.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Exported backend artifacts.  [default: ~/.cache/timmserve]",
)
@click.option("--accelerator", type=click.Choice(ACCELERATORS), default=_DEFAULTS["accelerator"], show_default=True)
@click.option("--devices", type=int, help="Number of devices (default: all of the accelerator's).")
@click.option("--workers-per-device", type=int, default=_DEFAULTS["workers_per_device"], show_default=True)
@click.option("--api-servers", type=int, help="HTTP server processes (default: one per inference worker).")
@click.option("--torch-threads", type=int, help="Threads per worker (default: cores ÷ workers).")
@click.option(
    "--decode-threads",
    type=int,
    default=_DEFAULTS["decode_threads"],
    show_default=True,
    help="Threads decoding the images of a batch in parallel.",
)
@click.option(
    "--fast-decode/--no-fast-decode",
    default=_DEFAULTS["fast_decode"],
    show_default=True,
    help="JPEGs decoded at a reduced DCT scale, resize on uint8 tensors; off: timm's PIL transform.",
)
@click.option(
    "--max-batch-size",
    type=int,
    default=_DEFAULTS["max_batch_size"],
    show_default=True,
    help="Dynamic batching: most requests per model call (1 turns batching off).",
)
@click.option(
    "--batch-timeout",
    type=float,
    default=_DEFAULTS["batch_timeout"],
    show_default=True,
    help="Seconds a batch waits to fill.",
)
@click.option("--host", type=click.Choice(HOSTS), default=_DEFAULTS["host"], show_default=True)
@click.option("--port", type=int, default=_DEFAULTS["port"], show_default=True)
@click.option(
    "--top-k",
    type=int,
    default=_DEFAULTS["top_k"],
    show_default=True,
    help="Classes per answer unless a request asks otherwise.",
)
@click.option("--max-body-bytes", type=int, default=_DEFAULTS["max_body_bytes"], show_default=True)
@click.option("--max-image-pixels", type=int, default=_DEFAULTS["max_image_pixels"], show_default=True)
@click.option(
    "--timeout",
    type=float,
    default=_DEFAULTS["timeout"],
    show_default=True,
    help="Seconds from admission to answer (queue wait and inference) before a 504.",
)
@click.option(
    "--max-queue",
    type=int,
    help="Images queued and not yet answered, over all API servers, before new requests get 503 "
    "(default: 4 full batches per worker, at least 128).",
)
@click.option(
    "--grace-period",
    type=float,
    default=_DEFAULTS["grace_period"],
    show_default=True,
    help="On SIGTERM/SIGINT: seconds in-flight requests get to finish after the server stops accepting.",
)
@click.option(
    "--api-key-env",
    metavar="NAME",
    help="Require the API key held in environment variable NAME (X-API-Key or Authorization: Bearer) "
    "everywhere but the health probes and the demo page.",
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default=_DEFAULTS["log_level"], show_default=True)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default=_DEFAULTS["log_format"],
    show_default=True,
    help="json: one object per line, for log pipelines.",
)
@click.pass_context
def serve(ctx: click.Context, config_file: Path | None, **options: Any) -> None:
    """Serve a timm classifier: POST /predict, GET /health, GET /info."""
    config = _serve_config(ctx, config_file, options)
    if config.engine == "ray":
        try:
            from timmserve.ray_engine import run_ray_server  # heavy: torch, timm, ray
        except ModuleNotFoundError as exc:
            if exc.name != "ray":
                raise
            raise ConfigError("--engine ray needs Ray Serve: pip install 'timmserve[ray]'") from None
        run_ray_server(config)
        return
    from timmserve.server import run_server  # heavy: torch, timm, litserve

    run_server(config)


def _serve_config(ctx: click.Context, config_file: Path | None, options: dict[str, Any]) -> ServeConfig:
    """Defaults < config file < flags given on the command line."""
    values = read_config_file(config_file) if config_file else {}
    values = {key.replace("-", "_"): value for key, value in values.items()}
    for name, value in options.items():
        if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT or name not in values:
            values[name] = value
    return ServeConfig.from_mapping(values)


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--url", default=DEFAULT_URL, show_default=True, help="The server's base URL.")
@click.option("--top-k", type=click.IntRange(min=1), help="Classes per image (default: the server's).")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait per image.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image instead of a table.")
@click.option("--api-key-env", metavar="NAME", help="Send the API key held in environment variable NAME.")
def classify(
    images: tuple[Path, ...], url: str, top_k: int | None, timeout: float, as_json: bool, api_key_env: str | None
) -> None:
    """Classify image files with a running server."""
    from timmserve.client import Client

    api_key = read_api_key(api_key_env) if api_key_env else None
    with Client(url, timeout=timeout, api_key=api_key) as client:
        for path in images:
            predictions = client.classify(path, top_k=top_k)
            if as_json:
                rows = [dataclasses.asdict(p) for p in predictions]
                click.echo(json.dumps({"image": str(path), "predictions": rows}))
                continue
            click.echo(str(path))
            for prediction in predictions:
                click.echo(f"  {prediction.probability:7.2%}  {prediction.label}")


def _numbers(kind: type) -> Any:
    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple | None:
        if value is None:
            return None
        try:
            return tuple(kind(part) for part in value.split(",") if part.strip())
        except ValueError:
            raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None

    return parse


@cli.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML: bench settings at the top, [serve] knobs for every rung, [rungs.NAME] knobs per rung.",
)
@model_options
@click.option("--concurrency", callback=_numbers(int), help="Closed-loop levels.  [default: 1,8,32,64]")
@click.option("--rate", "rates", callback=_numbers(float), help="Open-loop levels, req/s with Poisson arrivals.")
@click.option("--duration", type=float, help="Seconds measured per level.  [default: 4]")
@click.option("--warmup", type=float, help="Seconds of warm-up load before each level.  [default: 1]")
@click.option("--ceiling-duration", type=float, help="Seconds per batch size for each ceiling.  [default: 0.5]")
@click.option(
    "--ladder",
    callback=lambda c, p, v: tuple(v.split(",")) if v else None,
    help=f"Rungs to compare, in order.  [default: {','.join(LADDER)}]",
)
@click.option("--rounds", type=int, help="ABBA rounds over the ladder.  [default: 2]")
@click.option(
    "--image",
    "images",
    type=click.Path(exists=True, path_type=Path),
    help="A photo, or a folder of photos the load cycles through (default: a cat photo).",
)
@click.option(
    "--set",
    "knobs",
    multiple=True,
    metavar="KNOB=VALUE",
    help="A serve setting for every rung, e.g. --set torch_threads=1 (repeatable).",
)
@click.option("--client-processes", type=int, help="Load-generator processes.  [default: 1]")
@click.option("--url", help="Measure this running server instead (no ladder; ceilings only with --model).")
@click.option("--quick", is_flag=True, help="baseline vs best, c=1,8, short timings: about two minutes.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("results"), show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.pass_context
def bench(ctx: click.Context, config_file: Path | None, knobs: tuple[str, ...], quick: bool, no_progress: bool,
          **options: Any) -> None:  # fmt: skip
    """Measure ceilings and served throughput for a ladder of configurations; write results.json,
    results.md and plots to --out."""
    from timmserve.bench.ladder import run_bench  # heavy: torch, timm
    from timmserve.bench.report import render, write_results
    from timmserve.server import stop_on_signals

    stop_on_signals()  # an interrupted bench still stops the server it started

    config = _bench_config(ctx, config_file, knobs, quick, options)
    results = run_bench(config, progress=not no_progress, log=lambda line: click.echo(line, err=True))
    path = write_results(results, config.out)
    written = render(path)
    click.echo(f"wrote {path} and {', '.join(str(p) for p in written)}")


_SERVE_KEYS = ("model", "checkpoint", "random_weights", "labels")


def _bench_config(
    ctx: click.Context, config_file: Path | None, knobs: tuple[str, ...], quick: bool, options: dict[str, Any]
) -> BenchConfig:
    """Defaults (or --quick's) < config file < flags; model flags and --set go to every rung's server."""
    values = {
        key.replace("-", "_"): value for key, value in (read_config_file(config_file) if config_file else {}).items()
    }
    serve = dict(values.pop("serve", {}))
    rungs = values.pop("rungs", {})
    for name, value in options.items():
        given = ctx.get_parameter_source(name) is not ParameterSource.DEFAULT or name == "out"
        if not given or value is None:
            continue
        if name in _SERVE_KEYS:
            serve[name] = value
        else:
            values[name] = value
    serve.update(_parse_knob(knob) for knob in knobs)
    for key in ("concurrency", "rates", "ladder", "ceiling_batch_sizes"):
        if key in values:
            values[key] = tuple(values[key])
    if "images" in values:
        values["images"] = Path(values["images"])
    values["out"] = Path(values.get("out", "results"))
    try:
        settings = {**values, "serve": ServeConfig.from_mapping(serve), "rung_overrides": rungs}
        return BenchConfig.quick(**settings) if quick else BenchConfig(**settings)
    except TypeError as exc:
        raise ConfigError(f"invalid bench setting: {exc}") from None


def _parse_knob(knob: str) -> tuple[str, Any]:
    name, sep, text = knob.partition("=")
    if not sep or not name:
        raise ConfigError(f"--set takes KNOB=VALUE, got {knob!r}")
    return name.replace("-", "_"), parse_setting(text)


@cli.command()
@click.argument("results", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def report(results: Path) -> None:
    """Re-render results.md and the plots from a results.json."""
    from timmserve.bench.report import render

    for path in render(results):
        click.echo(f"wrote {path}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except TimmServeError as exc:
        if os.environ.get("TIMMSERVE_DEBUG"):
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
