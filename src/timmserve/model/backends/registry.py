"""Inference backends: one interface (base.Backend) over PyTorch eager, `torch.compile`, ONNX
Runtime and OpenVINO, one module each, and this registry of them (`BACKENDS`), where the rules of
what runs where (precision × backend × device × installed library) live."""

from __future__ import annotations

import torch

from timmserve.errors import ModelLoadError
from timmserve.model.backends.base import Backend, BackendKind, BackendSpec
from timmserve.model.backends.eager import CompiledBackend, EagerBackend
from timmserve.model.backends.onnxruntime import OnnxRuntimeBackend, check_onnxruntime_machine
from timmserve.model.backends.openvino import OpenVinoBackend, check_openvino_machine


def check_supported(name: str, device: torch.device, precision: str) -> None:
    """The one place the support rules live (precision × backend × device); raises ModelLoadError
    with one line that names the fix. "auto" for either checks only what is pinned (auto then
    measures the candidates that pass the rest)."""
    if precision == "fp16" and device.type != "cuda":
        raise ModelLoadError("fp16 needs a CUDA device; on CPU use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelLoadError(f"{torch.cuda.get_device_name(device)} does not support bf16; use fp16")
    if name == "auto":
        return
    kind = BACKENDS[name]
    if not kind.installed():
        raise ModelLoadError(f"--backend {name} needs {kind.package}: pip install 'timmserve[{kind.extra}]'")
    if device.type not in kind.devices:
        others = ", ".join(n for n, k in BACKENDS.items() if device.type in k.devices)
        raise ModelLoadError(f"--backend {name} runs on {' or '.join(kind.devices)}; on {device.type} use {others}")
    if precision != "auto" and precision not in kind.precisions:
        others = ", ".join(n for n, k in BACKENDS.items() if precision in k.precisions)
        raise ModelLoadError(f"--backend {name} runs {' or '.join(kind.precisions)}; for {precision} use {others}")
    if kind.check_machine is not None:
        kind.check_machine(device, precision)


def create_backend(name: str, model: torch.nn.Module, spec: BackendSpec) -> Backend:
    """The model as a callable for one backend; exported artifacts come from (or go to) the cache.
    Raises ModelLoadError where the backend cannot run here or cannot convert the model."""
    check_supported(name, spec.device, spec.precision)
    kind = BACKENDS[name]
    model = model.to(spec.device).eval()
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not kind.exports:
        return kind.build(model, spec)
    try:
        return kind.build(model, spec)
    except ModelLoadError:
        raise
    except Exception as exc:  # an operator the exporter or converter does not support, …
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ModelLoadError(f"cannot convert the model for {name} ({type(exc).__name__}: {first_line})") from None


# The registry: every backend by name (config.Backend lists the same names, plus "auto").
BACKENDS: dict[str, BackendKind] = {
    kind.name: kind
    for kind in (
        BackendKind("eager", EagerBackend, devices=("cpu", "cuda"), precisions=("fp32", "fp16", "bf16")),
        # Not in `auto`: minutes of compilation in every worker on every start.
        BackendKind(
            "compile", CompiledBackend, devices=("cpu", "cuda"), precisions=("fp32", "fp16", "bf16"), in_auto=False
        ),
        BackendKind(
            "onnxruntime", OnnxRuntimeBackend, devices=("cpu", "cuda"), precisions=("fp32", "fp16"),
            package="onnxruntime", extra="onnxruntime", exports=True, check_machine=check_onnxruntime_machine,
        ),
        BackendKind(
            "openvino", OpenVinoBackend, devices=("cpu",), precisions=("fp32", "bf16"),
            package="openvino", extra="openvino", exports=True, check_machine=check_openvino_machine,
        ),
    )
}  # fmt: skip
AUTO_CANDIDATES: tuple[str, ...] = tuple(name for name, kind in BACKENDS.items() if kind.in_auto)
