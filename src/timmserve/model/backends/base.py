"""What every backend is: a callable from a normalised NCHW float batch on the device to fp32
logits, built for a `BackendSpec`; and how the registry describes one (`BackendKind`)."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

Backend = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BackendSpec:
    """What a backend is built for: the same in every worker of a server."""

    device: torch.device
    precision: str  # fp32 | fp16 | bf16
    channels_last: bool
    input_size: tuple[int, int, int]  # C, H, W
    threads: int  # intra-op threads of one worker
    max_batch_size: int
    cache_dir: Path


@dataclass(frozen=True)
class BackendKind:
    """One entry of the registry (`BACKENDS`): how a backend is built and where it can run."""

    name: str
    build: Callable[[torch.nn.Module, BackendSpec], Backend]
    devices: tuple[str, ...]  # device types it runs on
    precisions: tuple[str, ...]  # precisions it runs (fp16 needs CUDA whatever the backend)
    package: str | None = None  # the module it imports beyond torch; None: torch alone
    extra: str | None = None  # the pip extra of timmserve that installs `package`
    in_auto: bool = True  # a candidate of `--backend auto`
    exports: bool = False  # converts the model to an artifact first (conversion can fail per model)
    # Checks of this machine's libraries or CPU that the fields above cannot say; raise ModelLoadError.
    check_machine: Callable[[torch.device, str], None] | None = None

    def installed(self) -> bool:
        return self.package is None or importlib.util.find_spec(self.package) is not None


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for a precision; fp32 runs as is. Weights stay fp32; autocast keeps
    softmax and norms in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])
