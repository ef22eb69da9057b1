"""Every serving knob in one validated object, passed down from the CLI (or a config file).

Precedence: command-line flag > config file (`--config FILE`, TOML) > the defaults below.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator, model_validator

from timmserve.errors import ConfigError
from timmserve.logs import LogFormat
from timmserve.settings.options import command_line
from timmserve.settings.schema import AnyPath, Settings, check, setting

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

Engine = Literal["litserve", "ray"]
# Inference backends (see backends.py); "auto" measures the installed ones on this machine at start.
Backend = Literal["eager", "compile", "onnxruntime", "openvino", "auto"]
# "auto": fp32 or the device's native reduced precision, whichever is faster and passes the guard.
Precision = Literal["auto", "fp32", "fp16", "bf16"]
Accelerator = Literal["auto", "cpu", "cuda"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
# LitServe binds only these addresses (LitServer.run checks it).
Host = Literal["127.0.0.1", "0.0.0.0", "::"]


class ServeConfig(Settings):
    """How to serve: the model, the engine, devices and workers, batching, HTTP limits, logging.

    Immutable and validated when built (`ServeConfig(...)`, `from_mapping`, `replace`): a bad value
    or a contradiction raises ConfigError, one line per problem. Each field's description is also
    its `timmserve serve` option's help. Durations are in seconds, sizes in bytes or pixels.
    """

    # --- model ---
    model: str | None = setting(
        None,
        "A timm model name (hub weights, e.g. resnet18.a1_in1k) or a timm model folder (config.json + weights).",
        default_text="built-in tf_efficientnet_lite0, offline",
    )
    checkpoint: AnyPath | None = setting(
        None,
        "Local weights for --model: .safetensors, or .pth/.pt loaded weights-only (never as a pickle).",
        metavar="FILE",
    )
    random_weights: bool = setting(
        False, "Serve the architecture with random weights: throughput studies only, flagged everywhere."
    )
    labels: AnyPath | None = setting(
        None,
        "Class names, one per line, for fine-tuned models; the count must equal the model's classes.",
        default_text="ImageNet names from timm",
        metavar="FILE",
    )
    precision: Precision = setting(
        "auto",
        "fp32, bf16 (CPU or GPU) or fp16 (CUDA only), under autocast; auto: fp32 or the device's native "
        "reduced precision (fp16 on CUDA, bf16 with AVX-512 BF16 or AMX), whichever is faster here and "
        "agrees with fp32 on the reference photos.",
    )
    channels_last: bool = setting(
        False,
        "NHWC memory format for the model and its inputs: often faster for convnets on CPU (oneDNN) "
        "and on tensor cores.",
    )
    backend: Backend = setting(
        "auto",
        "Inference backend; auto measures the installed ones here and keeps the fastest that agrees with eager "
        "(decided once per machine and model, then cached).",
    )
    cache_dir: AnyPath | None = setting(
        None,
        "Exported backend artifacts (ONNX files, OpenVINO IR); $XDG_CACHE_HOME/timmserve where that is set.",
        default_text="~/.cache/timmserve",
        metavar="DIR",
    )

    # --- engine: LitServe on one machine, or Ray Serve on one or many ---
    engine: Engine = setting(
        "litserve",
        "litserve: one machine. ray: Ray Serve replicas on one machine or a cluster (pip install 'timmserve[ray]').",
    )
    ray_address: str | None = setting(
        None, "Join this Ray cluster (e.g. ray://head:10001).", default_text="a local Ray instance"
    )
    ray_max_replicas: int | None = setting(
        None, "Ray: autoscale from the replica count up to this many.", default_text="a fixed count", ge=1
    )

    # --- devices and workers (Ray: replicas = workers per device × devices) ---
    accelerator: Accelerator = setting("auto", "cpu, cuda, or auto: CUDA where there is a GPU.")
    devices: int | None = setting(None, "Number of devices.", default_text="all of the accelerator's", ge=1)
    workers_per_device: int | None = setting(
        None,
        "Inference worker processes (Ray: replicas) per device.",
        default_text="CPU: one per usable core, at most 8; CUDA: 2",
        ge=1,
    )
    api_servers: int | None = setting(None, "HTTP server (uvicorn) processes.", default_text="one per worker", ge=1)
    inline: bool | None = setting(
        None,
        "A one-image request is classified in the API server's own process while nothing else is in flight "
        "(no hop to a worker where batching has nothing to gather); needs the CPU, one thread per worker and "
        "--engine litserve.",
        default_text="on where it can be",
    )
    torch_threads: int | None = setting(None, "Intra-op threads per worker.", default_text="cores ÷ workers", ge=1)
    decode_threads: int | None = setting(
        None,
        "Threads decoding and preprocessing the images of one batch in parallel (PIL frees the GIL).",
        default_text="CPU: 1 per worker; CUDA: 4",
        ge=1,
    )
    fast_decode: bool = setting(
        True,
        "JPEGs decoded at the smallest DCT scale still at least timm's resize size (PIL draft), resize and "
        "crop on uint8 tensors (torchvision v2); off: timm's PIL transform as is.",
    )
    overlap: bool = setting(
        False,
        "A worker decodes its next batch on a second thread while its current batch is on the model, so the "
        "GPU need not wait for the CPU (on a CPU the two share the worker's cores).",
    )
    gpu_decode: bool | None = setting(
        None,
        "CUDA: a batch's JPEGs decoded on the GPU in one nvJPEG call and resized there; other images, and "
        "JPEGs nvJPEG would not decode as the CPU does (CMYK, EXIF-rotated, multi-picture), on the CPU.",
        default_text="on with CUDA and fast decode",
    )

    # --- batching ---
    max_batch_size: int | None = setting(
        None,
        "Dynamic batching: most images per model call (1 turns batching off).",
        default_text="CPU: 16; CUDA: 64",
        ge=1,
    )
    batch_timeout: float = setting(
        0.0,
        "Seconds a batch may wait for more images once the queue is drained; 0: never wait, batches grow "
        "under load by themselves (measured best on CPU; a GPU may want a few ms).",
        ge=0,
        le=10,
    )

    # --- HTTP ---
    host: Host = setting("127.0.0.1", "Address to listen on (LitServe binds only these).")
    port: int = setting(8000, "Port to listen on.", ge=1024, le=65535)
    grpc_port: int | None = setting(
        None,
        "Also serve the Open Inference Protocol over gRPC (inference.GRPCInferenceService, tritonclient.grpc) "
        "on this port; needs pip install 'timmserve[grpc]' and --engine litserve.",
        default_text="off",
        ge=1024,
        le=65535,
    )
    top_k: int = setting(5, "Classes per answer unless a request asks otherwise.", ge=1)
    max_body_bytes: int = setting(20 * 1024 * 1024, "Largest request body, in bytes; larger: 413.", ge=1024)
    max_image_pixels: int = setting(
        64 * 1024 * 1024, "Largest image, in pixels, checked before decoding (decompression bombs); larger: 413.", ge=1
    )
    max_aspect_ratio: float = setting(
        32.0, "Longest side ÷ shortest side an image may have (bounds the resize's cost); more: 400.", ge=1
    )
    timeout: float = setting(
        30.0, "Seconds from admission to answer (queue wait and inference) before a 504 frees the slot.", gt=0
    )
    client_timeout: float = setting(
        30.0,
        "Seconds a client gets to send its request headers; each span this long must bring the body 500 "
        "bytes/s on average (none: a stall), or its end; past either: 408 and the connection closed.",
        gt=0,
    )
    max_queue: int | None = setting(
        None,
        "Images admitted and not yet answered, over all API servers; beyond it a 503 with Retry-After at "
        "once, instead of a queue that grows without bound.",
        default_text="4 batches per worker, ≥ 128",
        ge=1,
    )
    grace_period: float = setting(
        30.0,
        "On SIGTERM/SIGINT: seconds in-flight requests get to finish after the server stops accepting.",
        ge=0,
        le=3600,
    )
    api_key_env: str | None = setting(
        None,
        "Require the API key held in environment variable NAME (X-API-Key or Authorization: Bearer) "
        "everywhere but the health probes and the demo page. The name, never the key: argv is public.",
        metavar="NAME",
    )
    log_level: LogLevel = setting("info", "Least severe log records written, in every process.")
    log_format: LogFormat = setting("text", "text: for people; json: one object per line, for log pipelines.")

    @field_validator("api_key_env")
    @classmethod
    def _a_variable_name(cls, name: str | None) -> str | None:
        check(name is None or bool(name.strip()), "--api-key-env needs a variable name")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        """Rules over several settings; one ConfigError, naming the options, for the first broken.
        (What a backend, precision and device support together is checked where the device is
        known: backends.check_supported.)"""
        check(
            self.engine == "ray" or (self.ray_address is None and self.ray_max_replicas is None),
            "--ray-address and --ray-max-replicas need --engine ray",
        )
        check(self.grpc_port != self.port, "--grpc-port must differ from --port")
        check(
            self.checkpoint is None or self.model is not None,
            "--checkpoint needs the architecture it belongs to: --model ARCH --checkpoint FILE",
        )
        check(
            not (self.checkpoint is not None and self.random_weights),
            "--checkpoint and --random-weights contradict each other",
        )
        return self

    def queue_limit(self) -> int:
        """`max_queue`, or by default four full batches per worker, and at least 128 (so a
        benchmark's c=64 is never refused)."""
        if self.max_queue is not None:
            return self.max_queue
        return max(128, 4 * self.max_batch_size * self.worker_count())

    def worker_count(self) -> int:
        """Inference workers (LitServe) or replicas (Ray) in all: workers per device × devices. On a
        config resolved for the machine (machine.resolve_machine) only."""
        assert self.workers_per_device is not None and self.devices is not None, "resolve the config first"
        return self.workers_per_device * self.devices

    def api_key(self) -> str | None:
        """The API key from the variable `api_key_env` names; None when no key is asked for.
        Raises ConfigError when that variable is unset or empty."""
        return None if self.api_key_env is None else read_api_key(self.api_key_env)

    def artifact_cache(self) -> Path:
        """Where exported backend artifacts live (see `cache_dir`)."""
        if self.cache_dir is not None:
            return self.cache_dir
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "timmserve"

    def to_cli_args(self) -> list[str]:
        """`timmserve serve` flags that reproduce this config (unset values left out)."""
        return command_line(self)


def read_config_file(path: Path) -> dict[str, Any]:
    """The tables of a TOML file (`serve --config`: keys named like ServeConfig's fields; `bench
    --config`: see BenchConfig). Raises ConfigError when it cannot be read or is not TOML."""
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
