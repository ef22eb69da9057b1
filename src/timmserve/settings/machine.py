"""What this machine has — cores, a CPU quota, instruction sets, GPUs — and the rule that turns it
into the settings a config leaves unset (`resolve_machine`)."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

import torch

from timmserve.errors import ConfigError, ModelLoadError
from timmserve.settings.config import ServeConfig

# Instruction sets that decide CPU inference speed; bf16 is native with AVX-512 BF16 or AMX only
# (emulated, it ran the built-in model 14× slower than fp32 on an AVX2 EPYC).
_REPORTED_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
_NATIVE_BF16 = {"avx512_bf16", "amx_bf16"}
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_features() -> list[str]:
    """The instruction sets above that this CPU has; empty where /proc/cpuinfo cannot be read."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in _REPORTED_FEATURES if f in flags]


def cpu_name() -> str:
    """The CPU's model name, e.g. "AMD EPYC 9R14"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def usable_cores() -> int:
    """CPUs this process can use: its affinity mask (a container's cpuset), capped by a CPU quota
    (a Kubernetes CPU limit is a CFS quota), rounded up; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def cpu_quota(memberships_file: Path = Path("/proc/self/cgroup"), cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """This process's CPU quota in cores, from its own cgroup (v2 `cpu.max`, or v1
    `cpu.cfs_quota_us` ÷ `cpu.cfs_period_us`); None when unlimited or unknown."""
    try:
        memberships = memberships_file.read_text().splitlines()
    except OSError:
        return None
    for line in memberships:
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        try:
            if controllers == "":  # cgroup v2
                quota, period = (cgroup_root / relative / "cpu.max").read_text().split()[:2]
                return None if quota == "max" else int(quota) / int(period)
            if "cpu" in controllers.split(","):
                folder = next(p for p in (cgroup_root / "cpu", cgroup_root / controllers) if p.is_dir())
                quota_us = int((folder / relative / "cpu.cfs_quota_us").read_text())
                period_us = int((folder / relative / "cpu.cfs_period_us").read_text())
                return None if quota_us <= 0 else quota_us / period_us
        except (OSError, ValueError, StopIteration):
            continue
    return None


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, the CPU's otherwise."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def native_reduced_precision(device: torch.device) -> str | None:
    """The reduced precision this device runs natively: fp16 on CUDA, bf16 on a CPU with AVX-512
    BF16 or AMX, None elsewhere."""
    if device.type == "cuda":
        return "fp16"
    return "bf16" if _NATIVE_BF16 & set(cpu_features()) else None


def resolve_accelerator(config: ServeConfig) -> str:
    """ "cpu" or "cuda"; raises ModelLoadError when CUDA is asked for and torch sees none."""
    if config.accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if config.accelerator == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--accelerator cuda was asked for, but torch sees no CUDA device")
    return config.accelerator


# The machine rule for what the config leaves unset (docs/settings.md "Fast by default", measured there): on
# a CPU one single-threaded worker per usable core — the fastest per core here, and a single thread
# never waits in a parallel region for a thread that another process delayed, so throughput falls
# in proportion to the CPU that is left (docs/settings.md "Shared cores"); on a GPU two workers per device,
# so one decodes while the other's batch runs, with big batches and a decode pool.
CPU_MAX_WORKERS = 8
DEFAULTS = {
    "cpu": {"max_batch_size": 16, "decode_threads": 1},
    "cuda": {"workers_per_device": 2, "max_batch_size": 64, "decode_threads": 4},
}


def resolve_machine(config: ServeConfig) -> ServeConfig:
    """The config with everything left to the machine made explicit: `accelerator` ("cpu" or
    "cuda"), `devices` (every GPU unless given; 1 on the CPU), `workers_per_device`,
    `max_batch_size`, `decode_threads` (the machine rule above) and `torch_threads` (the usable
    cores shared out between all workers). Raises ModelLoadError when asked for more GPUs than torch
    sees, ConfigError for a replica bound below the replica count."""
    accelerator = resolve_accelerator(config)
    available = torch.cuda.device_count() if accelerator == "cuda" else 1
    devices = config.devices or available
    if devices > available:
        raise ModelLoadError(f"--devices {devices} was asked for, but torch sees {available} {accelerator} device(s)")
    cores = usable_cores()
    rule = {"workers_per_device": min(cores, CPU_MAX_WORKERS), **DEFAULTS["cpu"]}
    rule = DEFAULTS["cuda"] if accelerator == "cuda" else rule
    unset = {name: value for name, value in rule.items() if getattr(config, name) is None}
    resolved = config.replace(accelerator=accelerator, devices=devices, **unset)
    if resolved.torch_threads is None:
        resolved = resolved.replace(torch_threads=max(1, cores // resolved.worker_count()))
    resolved = resolve_inline(resolve_gpu_decode(resolved))
    if resolved.ray_max_replicas is not None and resolved.ray_max_replicas < resolved.worker_count():
        raise ConfigError(
            f"--ray-max-replicas {resolved.ray_max_replicas} is below the starting replica count "
            f"{resolved.worker_count()} (workers per device × devices)"
        )
    return resolved


def resolve_gpu_decode(config: ServeConfig) -> ServeConfig:
    """`gpu_decode` on where it can be, unless the config says otherwise: CUDA with fast decode (its
    resize is fast decode's tensor transform). Measured on an H200 (docs/gpu.md): 1.2–2.3×
    the requests per second of the CPU's decode on 4 threads, at every concurrency, for both models.
    Raises ConfigError when asked for where it cannot be."""
    if config.gpu_decode and config.accelerator != "cuda":
        raise ConfigError("--gpu-decode needs a CUDA device (nvJPEG); this config runs on the CPU")
    if config.gpu_decode and not config.fast_decode:
        raise ConfigError("--gpu-decode resizes with fast decode's tensor transform; drop --no-fast-decode")
    possible = config.accelerator == "cuda" and config.fast_decode
    return config.replace(gpu_decode=possible if config.gpu_decode is None else config.gpu_decode)


def resolve_inline(config: ServeConfig) -> ServeConfig:
    """`inline` (inline.py) on where it can be, unless the config says otherwise: the LitServe
    engine on the CPU with one intra-op thread per worker (a runtime's thread pool does not survive
    the fork that starts an API server). Raises ConfigError when asked for where it cannot be."""
    possible = config.engine == "litserve" and config.accelerator == "cpu" and config.torch_threads == 1
    if config.inline and not possible:
        raise ConfigError(
            f"--inline needs --engine litserve on the CPU with one thread per worker (this config: "
            f"{config.engine} on {config.accelerator}, {config.torch_threads} thread(s) per worker); "
            "drop --inline (on the CPU, or set --torch-threads 1)"
        )
    return config.replace(inline=possible if config.inline is None else config.inline)


def describe(config: ServeConfig) -> str:
    """A resolved config's serving choices in one line, for the start-up log."""
    return (
        f"{config.engine} on {config.devices} {config.accelerator} device(s): {config.workers_per_device} "
        f"worker(s) per device × {config.torch_threads} thread(s), backend {config.backend} {config.precision}, "
        f"max batch {config.max_batch_size} (wait {config.batch_timeout:g} s), decode {config.decode_threads} "
        f"thread(s){', fast' if config.fast_decode else ''}{', JPEGs on the GPU' if config.gpu_decode else ''}"
        f"{', decode overlapped' if config.overlap else ''}"
        f"{', inline when idle' if config.inline else ''}"
    )
