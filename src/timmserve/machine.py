"""What this machine has that decides how to serve on it: cores, CPU instruction sets, GPUs."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

import torch

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
