"""ONNX Runtime: the model exported with torch's dynamo exporter (cached), CPU or CUDA (TensorRT
where the tensorrt extra installs its provider)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from timmserve.errors import ModelLoadError
from timmserve.model.backends.base import BackendSpec
from timmserve.model.backends.cache import cached_artifact


class OnnxRuntimeBackend:
    def __init__(self, model: torch.nn.Module, spec: BackendSpec) -> None:
        import onnxruntime as ort

        dtype = torch.float16 if spec.precision == "fp16" else torch.float32
        path = cached_artifact(model, spec, "onnxruntime", ".onnx", lambda target: _export_onnx(model, spec, target))
        options = ort.SessionOptions()
        options.intra_op_num_threads = spec.threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=_ort_providers(spec, ort))
        self.input_name = self.session.get_inputs()[0].name
        self.dtype = dtype

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        # On CUDA the batch goes through host memory and ORT copies it back to the device: one
        # extra copy per batch, kept for simplicity until IO binding can be measured on a GPU.
        array = batch.to(self.dtype).contiguous().cpu().numpy()
        (logits,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(logits).float()


def _ort_providers(spec: BackendSpec, ort: Any) -> list[Any]:
    available = ort.get_available_providers()
    if spec.device.type != "cuda":
        return ["CPUExecutionProvider"]
    providers: list[Any] = [("CUDAExecutionProvider", {"device_id": spec.device.index or 0})]
    if "TensorrtExecutionProvider" in available:  # the TensorRT extra: ORT builds and caches engines
        trt = {"trt_fp16_enable": spec.precision == "fp16", "trt_engine_cache_enable": True}
        providers.insert(0, ("TensorrtExecutionProvider", {**trt, "trt_engine_cache_path": str(spec.cache_dir)}))
    return providers


def _export_onnx(model: torch.nn.Module, spec: BackendSpec, target: Path) -> None:
    dtype = torch.float16 if spec.precision == "fp16" else torch.float32
    # Batch 2, not 1: torch.export specialises dimensions of size 1, and the batch must stay dynamic.
    example = torch.zeros(2, *spec.input_size, dtype=dtype, device=spec.device)
    exported = model.to(dtype)
    torch.onnx.export(
        exported,
        (example,),
        str(target),
        dynamo=True,
        verbose=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
    )
    model.float()


def check_onnxruntime_machine(device: torch.device, precision: str) -> None:
    if device.type == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():  # before minutes of export
            raise ModelLoadError("this onnxruntime has no CUDA provider: pip install 'timmserve[tensorrt]'")
