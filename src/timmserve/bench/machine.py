"""What this machine is: CPU, instruction sets, library versions (results.json's `env`)."""

from __future__ import annotations

import platform
import sys
from importlib.metadata import version
from typing import Any

import psutil
import torch

from timmserve.settings.machine import cpu_features, cpu_name


def environment(accelerator: str) -> dict[str, Any]:
    """results.json's `env`: versions, device name, CPU, `cpus` (logical cores), `memory_gb` (GiB)
    and the command line. `accelerator`: "cuda" names the first GPU as the device, else the CPU."""
    cpu = cpu_name()
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
