"""Every serving knob in one validated object, passed down from the CLI (or a config file).

Precedence: command-line flag > config file (`--config FILE`, TOML) > the defaults below.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from timmserve.errors import ConfigError
from timmserve.logs import LOG_FORMATS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ENGINES: tuple[str, ...] = ("litserve", "ray")
# Inference backends (see backends.py); "auto" measures the installed ones on this machine at start.
BACKEND_CHOICES: tuple[str, ...] = ("eager", "compile", "onnxruntime", "openvino", "auto")
Precision = Literal["fp32", "fp16", "bf16"]
Accelerator = Literal["auto", "cpu", "cuda"]

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
ACCELERATORS: tuple[str, ...] = ("auto", "cpu", "cuda")
LOG_LEVELS: tuple[str, ...] = ("critical", "error", "warning", "info", "debug")
# LitServe binds only these addresses (LitServer.run checks it).
HOSTS: tuple[str, ...] = ("127.0.0.1", "0.0.0.0", "::")


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    # --- model ---
    # A timm model name (hub weights, e.g. "resnet18.a1_in1k"), a timm model folder
    # (config.json + weights), or None for the built-in offline default.
    model: str | None = None
    # Local weights for `model` (.safetensors, or .pth/.pt loaded with weights_only=True).
    checkpoint: Path | None = None
    # Serve the architecture with random weights: throughput studies only, flagged everywhere.
    random_weights: bool = False
    # Class names, one per line, for fine-tuned models; count must equal the model's classes.
    labels: Path | None = None
    precision: Precision = "fp32"
    # NHWC memory format: often faster for convnets on CPU (oneDNN) and on tensor cores.
    channels_last: bool = False
    backend: str = "eager"
    # Exported backend artifacts (ONNX files, OpenVINO IR); None: $XDG_CACHE_HOME/timmserve or
    # ~/.cache/timmserve.
    cache_dir: Path | None = None

    # --- engine: LitServe on one machine, or Ray Serve on one or many ---
    engine: str = "litserve"
    ray_address: str | None = None  # join this Ray cluster (e.g. "ray://head:10001"); None: start one
    ray_max_replicas: int | None = None  # autoscale from the replica count up to this; None: fixed

    # --- devices and workers (Ray: replicas = workers per device × devices) ---
    accelerator: Accelerator = "auto"
    devices: int | None = None  # None: every device of the accelerator
    workers_per_device: int = 1
    api_servers: int | None = None  # uvicorn processes; None: one per inference worker
    # Intra-op threads per worker; None: the machine's cores shared out between workers.
    torch_threads: int | None = None
    # Threads that decode and preprocess the images of one batch in parallel (PIL frees the GIL).
    decode_threads: int = 2
    # Fast decode path: JPEGs at the smallest DCT scale still at least timm's resize size (PIL
    # draft), resize and crop with torchvision v2's uint8 kernels. Off: timm's PIL transform as is.
    fast_decode: bool = True

    # --- batching ---
    max_batch_size: int = 8
    # Seconds a batch may wait for more images once the queue is drained (batching.py); 0: never
    # wait, batches grow under load by themselves (measured best on CPU; a GPU may want a few ms).
    batch_timeout: float = 0.0

    # --- HTTP ---
    host: str = "127.0.0.1"
    port: int = 8000
    top_k: int = 5
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 64 * 1024 * 1024  # decompression-bomb guard, checked before decoding
    # Seconds from admission to answer (queue wait + inference) before a 504 frees the slot.
    timeout: float = 30.0
    # Images admitted and not yet answered, over all API servers; beyond it: 503 + Retry-After at
    # once instead of a queue that grows without bound. None: see `queue_limit`.
    max_queue: int | None = None
    # SIGTERM/SIGINT: seconds in-flight requests get to finish after the server stops accepting.
    grace_period: float = 30.0
    # Name of the environment variable holding the API key (never the key itself: argv is public).
    api_key_env: str | None = None
    log_level: str = "info"
    log_format: str = "text"

    def __post_init__(self) -> None:
        _check(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}")
        _check(self.accelerator in ACCELERATORS, f"accelerator must be one of {', '.join(ACCELERATORS)}")
        _check(self.log_level in LOG_LEVELS, f"log level must be one of {', '.join(LOG_LEVELS)}")
        _check(self.log_format in LOG_FORMATS, f"log format must be one of {', '.join(LOG_FORMATS)}")
        _check(self.engine in ENGINES, f"engine must be one of {', '.join(ENGINES)}")
        _check(self.backend in BACKEND_CHOICES, f"backend must be one of {', '.join(BACKEND_CHOICES)}")
        _check(
            not (self.backend == "openvino" and self.accelerator == "cuda"),
            "--backend openvino runs on the CPU; on CUDA use eager, compile or onnxruntime",
        )
        _check(
            self.ray_max_replicas is None or self.ray_max_replicas >= self.worker_count(),
            "--ray-max-replicas must be at least the starting replica count (workers per device × devices)",
        )
        _check(
            self.engine == "ray" or (self.ray_address is None and self.ray_max_replicas is None),
            "--ray-address and --ray-max-replicas need --engine ray",
        )
        _check(self.host in HOSTS, f"host must be one of {', '.join(HOSTS)} (LitServe binds only these)")
        _check(1024 <= self.port <= 65535, "port must be between 1024 and 65535")
        _check(self.max_batch_size >= 1, "max batch size must be at least 1")
        _check(0 <= self.batch_timeout <= 10, "batch timeout must be between 0 and 10 seconds")
        _check(self.workers_per_device >= 1, "workers per device must be at least 1")
        _check(self.devices is None or self.devices >= 1, "devices must be at least 1")
        _check(self.api_servers is None or self.api_servers >= 1, "api servers must be at least 1")
        _check(self.torch_threads is None or self.torch_threads >= 1, "torch threads must be at least 1")
        _check(self.decode_threads >= 1, "decode threads must be at least 1")
        _check(self.top_k >= 1, "top-k must be at least 1")
        _check(self.max_body_bytes >= 1024, "max body bytes must be at least 1024")
        _check(self.max_image_pixels >= 1, "max image pixels must be at least 1")
        _check(self.timeout > 0, "timeout must be positive")
        _check(self.max_queue is None or self.max_queue >= 1, "max queue must be at least 1")
        _check(0 <= self.grace_period <= 3600, "grace period must be between 0 and 3600 seconds")
        _check(self.api_key_env is None or bool(self.api_key_env.strip()), "--api-key-env needs a variable name")
        _check(
            self.checkpoint is None or self.model is not None,
            "--checkpoint needs the architecture it belongs to: --model ARCH --checkpoint FILE",
        )
        _check(
            not (self.checkpoint is not None and self.random_weights),
            "--checkpoint and --random-weights contradict each other",
        )
        _check(
            not (self.precision == "fp16" and self.accelerator == "cpu"),
            "fp16 needs a CUDA device; on CPU use --precision bf16 or fp32",
        )

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> ServeConfig:
        """Build from a mapping with the field names (dashes allowed); unknown keys are an error."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown setting {key!r}; known: {', '.join(sorted(known))}")
            if name in ("checkpoint", "labels", "cache_dir") and value is not None:
                value = Path(value)
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a value of the wrong type reached a comparison
            raise ConfigError(f"invalid setting: {exc}") from None

    def queue_limit(self) -> int:
        """`max_queue`, or by default four full batches per worker, and at least 128 (so a
        benchmark's c=64 is never refused)."""
        if self.max_queue is not None:
            return self.max_queue
        return max(128, 4 * self.max_batch_size * self.worker_count())

    def worker_count(self) -> int:
        """Inference workers (LitServe) or replicas (Ray) in all: workers per device × devices."""
        return self.workers_per_device * (self.devices or 1)

    def api_key(self) -> str | None:
        """The API key from the variable `api_key_env` names; None when no key is asked for."""
        return None if self.api_key_env is None else read_api_key(self.api_key_env)

    def artifact_cache(self) -> Path:
        """Where exported backend artifacts live (see `cache_dir`)."""
        if self.cache_dir is not None:
            return self.cache_dir
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "timmserve"

    def torch_threads_per_worker(self, workers: int) -> int:
        """Threads for one worker's torch ops: explicit, or the cores shared out between workers."""
        if self.torch_threads is not None:
            return self.torch_threads
        return max(1, (os.cpu_count() or 1) // workers)

    def to_cli_args(self) -> list[str]:
        """`timmserve serve` flags that reproduce this config (unset values left out)."""
        args: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if value is None or (value is False and f.default is False):
                continue
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
            else:
                args += [flag, str(value)]
        return args

    def replace(self, **changes: Any) -> ServeConfig:
        """A copy with some settings changed, validated again."""
        return ServeConfig.from_mapping({**dataclasses.asdict(self), **changes})

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view (for /info and results files)."""
        return _json_ready(dataclasses.asdict(self))


LADDER: tuple[str, ...] = ("baseline", "batching", "workers", "precision", "backend", "decode", "best")


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    # The model and any knobs shared by every rung; each rung then sets its own knobs on top.
    serve: ServeConfig = dataclasses.field(default_factory=ServeConfig)
    ladder: tuple[str, ...] = LADDER
    rounds: int = 2  # ABBA: odd rounds run the ladder forward, even rounds backward
    concurrency: tuple[int, ...] = (1, 8, 32, 64)  # closed-loop levels
    rates: tuple[float, ...] = ()  # open-loop levels (req/s, Poisson arrivals); none by default
    duration: float = 4.0  # seconds measured per level
    warmup: float = 1.0  # seconds of the same load right before each level, not counted
    ceiling_duration: float = 0.5  # seconds per batch size for each ceiling measurement
    ceiling_batch_sizes: tuple[int, ...] = (1, 8, 32, 64)  # capped by each rung's max batch size
    images: Path | None = None  # a photo or a folder of photos (cycled); default: the cat photo
    out: Path = Path("results")
    url: str | None = None  # measure this running server instead of starting a ladder
    client_processes: int = 1  # load-generator processes (when one cannot drive the server)
    request_timeout: float = 120.0  # client-side, per request
    # Rung knobs from a config file's [rungs.NAME] tables: override a built-in rung or add one.
    rung_overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(len(self.ladder) >= 1, "the ladder needs at least one rung")
        _check(len(set(self.ladder)) == len(self.ladder), "a rung is named twice in the ladder")
        _check(self.rounds >= 1, "rounds must be at least 1")
        _check(bool(self.concurrency) or bool(self.rates), "give at least one concurrency or rate")
        _check(all(c >= 1 for c in self.concurrency), "concurrency levels must be at least 1")
        _check(all(r > 0 for r in self.rates), "open-loop rates must be positive")
        _check(self.duration > 0 and self.warmup >= 0, "duration must be positive, warm-up not negative")
        _check(self.ceiling_duration > 0, "ceiling duration must be positive")
        _check(all(b >= 1 for b in self.ceiling_batch_sizes), "ceiling batch sizes must be at least 1")
        _check(self.client_processes >= 1, "client processes must be at least 1")
        _check(self.images is None or self.images.exists(), f"no image or folder at {self.images}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view (for results files)."""
        return {**_json_ready(dataclasses.asdict(self)), "serve": self.serve.as_dict()}

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """A run of about two minutes: baseline against best, two levels, short timings."""
        settings: dict[str, Any] = dict(
            ladder=("baseline", "best"),
            concurrency=(1, 8),
            duration=2.0,
            warmup=1.0,
            ceiling_duration=0.3,
            ceiling_batch_sizes=(1, 8),
        )
        return cls(**{**settings, **overrides})


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings from a TOML file: top-level keys named like ServeConfig fields."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def read_api_key(variable: str) -> str:
    """An API key from the environment: keys stay out of argv, which every user of the machine sees."""
    key = os.environ.get(variable, "").strip()
    if not key:
        raise ConfigError(f"--api-key-env {variable}: that environment variable is unset or empty")
    return key


def parse_setting(text: str) -> Any:
    """A setting's value written on the command line: TOML literal syntax (1, 0.5, true, "x"),
    or else the text itself."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def _json_ready(values: dict[str, Any]) -> dict[str, Any]:
    def convert(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple):
            return list(value)
        return value

    return {key: convert(value) for key, value in values.items()}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
