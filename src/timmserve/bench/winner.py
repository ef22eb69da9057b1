"""A bench run's winning rung, written as a `timmserve serve --config` file (TOML).

The winner is `best` when the run measured it. Otherwise it is the fastest rung at the highest
closed-loop concurrency where some rung's level is not marked (aggregate.flags: client-bound,
foreign load, too few completions), among the rungs `timmserve serve` runs (not `reference`).
The file holds the settings that differ from ServeConfig's defaults, plus the model settings, so
that it names its model even where that is a default (`random_weights = false`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from timmserve.bench.aggregate import flags
from timmserve.bench.config import MODEL_SETTINGS
from timmserve.bench.rungs import BEST, REFERENCE
from timmserve.errors import TimmServeError
from timmserve.settings.config import ServeConfig


def write_winner(results: dict[str, Any], path: Path) -> str:
    """Write the winning run's serve config to `path` and return the rung's name. Raises
    TimmServeError when no rung wins (every closed-loop level marked, or none measured)."""
    run = winning_run(results)
    lines = [
        f"# timmserve serve --config {path.name}: rung {run['name']} of the bench run started "
        f"{results['env']['started']}; settings not written here are the defaults.",
        # ServeConfig's values are strings, numbers and booleans, which JSON and TOML write alike.
        *(f"{name} = {json.dumps(value)}" for name, value in serve_settings(run["config"]).items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return run["name"]


def winning_run(results: dict[str, Any]) -> dict[str, Any]:
    """`best` if measured, else the fastest unmarked rung at the highest concurrency that has one."""
    runs = [run for run in results["runs"] if run["name"] != REFERENCE]
    for run in runs:
        if run["name"] == BEST:
            return run
    levels = [(level, run) for run in runs for level in run["levels"] if level["mode"] == "closed"]
    unmarked = [(level, run) for level, run in levels if not flags(level)]
    if not unmarked:
        raise TimmServeError(
            "no winner to write: every closed-loop level is marked (client-bound, foreign load or too few "
            "completions); measure longer or on a quiet machine, or put best in the ladder"
        )
    _, run = max(unmarked, key=lambda pair: (pair[0]["concurrency"], pair[0]["req_per_s"]))
    return run


def serve_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config (ServeConfig.as_dict) reduced to what a config file needs: the settings off
    their defaults and the model settings, None left out (TOML has no null; None is a default)."""
    defaults = ServeConfig().as_dict()
    return {
        name: value
        for name, value in config.items()
        if value is not None and (name in MODEL_SETTINGS or value != defaults[name])
    }
