"""What this machine is: CPU, instruction sets, library versions (results.json's `env`)."""

from __future__ import annotations

import platform
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
import torch


def environment(accelerator: str) -> dict[str, Any]:
    """results.json's `env`: versions, device name, CPU, `cpus` (logical cores), `memory_gb` (GiB)
    and the command line. `accelerator`: "cuda" names the first GPU as the device, else the CPU."""
    cpu = _cpu_name()
    device = torch.cuda.get_device_name(0) if accelerator == "cuda" else cpu
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": version("timm"),
        "litserve": version("litserve"),
        "device": device,
        "cpu": cpu,
        "cpu_features": cpu_features(),
        "cpus": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "command": " ".join(["timmserve", *sys.argv[1:]]),
    }


def cpu_features() -> list[str]:
    """The instruction sets that decide CPU inference speed (bf16 needs AVX-512 BF16 or AMX);
    empty where /proc/cpuinfo cannot be read."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
