"""`timmserve serve | classify | bench | report`.

Known errors print one line and exit 1; set TIMMSERVE_DEBUG=1 for the traceback. torch and
LitServe are imported inside the commands that need them, so `--help` and `classify` stay quick.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from timmserve.bench.config import MODEL_SETTINGS, QUICK, BenchConfig
from timmserve.client import DEFAULT_URL
from timmserve.errors import ConfigError, TimmServeError
from timmserve.settings.config import ServeConfig, parse_setting, read_api_key, read_config_file
from timmserve.settings.options import options

# BenchConfig's settings that are bench options; the others only a config file sets.
BENCH_OPTIONS = (
    "concurrency",
    "rates",
    "duration",
    "warmup",
    "ceiling_duration",
    "ladder",
    "rounds",
    "images",
    "client_processes",
    "url",
    "out",
    "write_config",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="timmserve")
def cli() -> None:
    """Serve timm image classifiers over HTTP, and measure how well they are served."""


@cli.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML file with settings named like these options (flags given here win).",
)
@options(ServeConfig)
@click.pass_context
def serve(ctx: click.Context, config_file: Path | None, **settings: Any) -> None:
    """Serve a timm classifier: POST /predict, GET /health, GET /info."""
    config = _serve_config(ctx, config_file, settings)
    if config.engine == "ray":
        try:
            from timmserve.engines.ray import run_ray_server  # heavy: torch, timm, ray
        except ModuleNotFoundError as exc:
            if exc.name != "ray":
                raise
            raise ConfigError("--engine ray needs Ray Serve: pip install 'timmserve[ray]'") from None
        run_ray_server(config)
        return
    from timmserve.engines.litserve.server import run_server  # heavy: torch, timm, litserve

    run_server(config)


def _resolve(ctx: click.Context, given: dict[str, Any], *layers: dict[str, Any]) -> dict[str, Any]:
    """Settings by precedence, lowest first: each of `layers` (a preset, a config file's table),
    then those of the `given` options that the command line set. A setting in none of them keeps
    its schema default; a default shown in --help is not "set". Keys with dashes take underscores."""
    on_command_line = {
        name: value for name, value in given.items() if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT
    }
    merged: dict[str, Any] = {}
    for layer in (*layers, on_command_line):
        merged.update((key.replace("-", "_"), value) for key, value in layer.items())
    return merged


def _serve_config(ctx: click.Context, config_file: Path | None, settings: dict[str, Any]) -> ServeConfig:
    """Defaults < config file < flags given on the command line. Raises ConfigError."""
    return ServeConfig.from_mapping(_resolve(ctx, settings, read_config_file(config_file) if config_file else {}))


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


@cli.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML: bench settings at the top, [serve] knobs for every rung, [rungs.NAME] knobs per rung.",
)
@options(ServeConfig, MODEL_SETTINGS)
@options(BenchConfig, BENCH_OPTIONS)
@click.option(
    "--set",
    "knobs",
    multiple=True,
    metavar="KNOB=VALUE",
    help="A serve setting for every rung, e.g. --set torch_threads=1 (repeatable).",
)
@click.option("--quick", is_flag=True, help="baseline vs best, c=1,8, short timings: about two minutes.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.pass_context
def bench(ctx: click.Context, config_file: Path | None, knobs: tuple[str, ...], quick: bool, no_progress: bool,
          **settings: Any) -> None:  # fmt: skip
    """Measure ceilings and served throughput for a ladder of configurations; write results.json,
    results.md and plots to --out."""
    config = _bench_config(ctx, config_file, knobs, quick, settings)  # a bad setting fails before torch loads
    from timmserve.bench.ladder import run_bench  # heavy: torch, timm
    from timmserve.bench.report import render, write_results
    from timmserve.supervision import stop_on_signals

    stop_on_signals()  # an interrupted bench still stops the server it started
    results = run_bench(config, progress=not no_progress, log=lambda line: click.echo(line, err=True))
    path = write_results(results, config.out)
    written = render(path)
    click.echo(f"wrote {path} and {', '.join(str(p) for p in written)}")
    if config.write_config is not None:
        from timmserve.bench.winner import write_winner

        rung = write_winner(results, config.write_config)
        click.echo(f"wrote {config.write_config}: rung {rung}, for timmserve serve --config {config.write_config}")


def _bench_config(
    ctx: click.Context, config_file: Path | None, knobs: tuple[str, ...], quick: bool, settings: dict[str, Any]
) -> BenchConfig:
    """Defaults (or --quick's) < config file < flags given on the command line, for the bench
    settings and for the serve settings every rung starts from (the file's [serve] table, the
    model options and --set). Raises ConfigError."""
    file = read_config_file(config_file) if config_file else {}
    serve_table, rungs = file.pop("serve", {}), file.pop("rungs", {})
    model = {name: value for name, value in settings.items() if name in MODEL_SETTINGS}
    bench = {name: value for name, value in settings.items() if name not in MODEL_SETTINGS}
    serve = ServeConfig.from_mapping(_resolve(ctx, model, serve_table, dict(map(_parse_knob, knobs))))
    values = _resolve(ctx, bench, QUICK if quick else {}, file)
    return BenchConfig.from_mapping({**values, "serve": serve, "rung_overrides": rungs})


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
