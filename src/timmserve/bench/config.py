"""`timmserve bench` settings: the ladder, the load and its timings, where results go."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from timmserve.settings.config import ServeConfig
from timmserve.settings.schema import AnyPath, ListOf, Settings, check, setting

LADDER: tuple[str, ...] = (
    "baseline",
    "batching",
    "workers",
    "precision",
    "backend",
    "decode",
    "gpu-decode",
    "reference",
    "best",
    "default",
)
# The serve settings that say which model a bench run serves: bench options too, and always in a
# config that `--write-config` writes.
MODEL_SETTINGS = ("model", "checkpoint", "random_weights", "labels")

# `--quick`, in place of the defaults below: about two minutes, baseline against best, short timings.
QUICK: dict[str, Any] = {
    "ladder": ("baseline", "best", "default"),
    "concurrency": (1, 8),
    "duration": 2.0,
    "warmup": 1.0,
    "ceiling_duration": 0.3,
    "ceiling_batch_sizes": (1, 8),
}


class BenchConfig(Settings):
    """What `timmserve bench` measures and how: the serve settings every rung starts from, the
    rungs, the closed- and open-loop levels, the timings (in seconds) and the output folder.

    Immutable and validated when built, as ServeConfig is: a bad value or a contradiction raises
    ConfigError, one line per problem. A config file (`bench --config`) has these settings at the
    top, a `[serve]` table for `serve` and `[rungs.NAME]` tables for `rung_overrides`.
    """

    serve: ServeConfig = Field(
        default_factory=ServeConfig,
        description="The model and any knobs shared by every rung; each rung then sets its own knobs on top.",
    )
    ladder: ListOf[str] = setting(LADDER, "Rungs to compare, in order.", metavar="RUNG,…", min_length=1)
    rounds: int = setting(2, "ABBA rounds over the ladder: odd rounds run it forward, even rounds backward.", ge=1)
    concurrency: ListOf[PositiveInt] = setting((1, 8, 32, 64), "Closed-loop levels: concurrent senders.")
    rates: ListOf[PositiveFloat] = setting((), "Open-loop levels, req/s with Poisson arrivals.", flag="rate")
    duration: float = setting(4.0, "Seconds measured per level.", gt=0)
    warmup: float = setting(1.0, "Seconds of the same load right before each level, not counted.", ge=0)
    ceiling_duration: float = setting(0.5, "Seconds per batch size for each ceiling measurement.", gt=0)
    ceiling_batch_sizes: ListOf[PositiveInt] = setting(
        (1, 8, 32, 64), "Batch sizes of the ceilings, capped by each rung's max batch size."
    )
    images: AnyPath | None = setting(
        None, "A photo, or a folder of photos the load cycles through.", default_text="a cat photo", flag="image"
    )
    out: AnyPath = setting(Path("results"), "Folder for results.json, results.md and the plots.", metavar="DIR")
    url: str | None = setting(None, "Measure this running server instead (no ladder; ceilings only with --model).")
    client_processes: int = setting(1, "Load-generator processes (when one cannot drive the server).", ge=1)
    request_timeout: float = setting(120.0, "Client-side seconds per request.", gt=0)
    write_config: AnyPath | None = setting(
        None,
        "Write the winning rung as a `timmserve serve --config` file: best, else the fastest rung not marked "
        "at the highest concurrency.",
        metavar="FILE",
    )
    rung_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Rung knobs from a config file's [rungs.NAME] tables: override a built-in rung or add one.",
    )

    @field_validator("ladder")
    @classmethod
    def _each_rung_once(cls, ladder: tuple[str, ...]) -> tuple[str, ...]:
        check(len(set(ladder)) == len(ladder), "a rung is named twice in the ladder")
        return ladder

    @field_validator("images")
    @classmethod
    def _images_exist(cls, images: AnyPath | None) -> AnyPath | None:
        check(images is None or images.exists(), f"no image or folder at {images}")
        return images

    @model_validator(mode="after")
    def _some_load(self) -> BenchConfig:
        check(bool(self.concurrency) or bool(self.rates), "give at least one concurrency or rate")
        check(self.write_config is None or self.url is None, "--write-config needs a ladder; --url measures no rung")
        return self
