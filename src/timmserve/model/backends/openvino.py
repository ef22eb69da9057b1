"""OpenVINO (CPU): the model converted to OpenVINO IR (cached); bf16 where the CPU has it natively."""

from __future__ import annotations

from pathlib import Path

import torch

from timmserve.errors import ModelLoadError
from timmserve.model.backends.base import BackendSpec
from timmserve.model.backends.cache import cached_artifact


class OpenVinoBackend:
    def __init__(self, model: torch.nn.Module, spec: BackendSpec) -> None:
        import openvino as ov

        core = ov.Core()
        path = cached_artifact(model, spec, "openvino", ".xml", lambda target: _convert_openvino(model, spec, target))
        config = {
            "PERFORMANCE_HINT": "LATENCY",  # one stream: the server batches, workers share the cores
            "INFERENCE_NUM_THREADS": spec.threads,
            # Each worker process would pin its threads to the same first cores (measured here: two
            # single-thread workers served half of what ONNX Runtime did); the OS spreads them.
            "ENABLE_CPU_PINNING": False,
            "INFERENCE_PRECISION_HINT": "bf16" if spec.precision == "bf16" else "f32",
        }
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        result = self.request.infer({0: batch.contiguous().numpy()}, share_inputs=True)
        return torch.from_numpy(result[0].copy())


def _convert_openvino(model: torch.nn.Module, spec: BackendSpec, target: Path) -> None:
    import openvino as ov

    example = torch.zeros(1, *spec.input_size)
    converted = ov.convert_model(model, example_input=example, input=[(-1, *spec.input_size)])
    bin_path = target.with_suffix(".bin")
    # save_model writes NAME.xml + NAME.bin; weights stay fp32 (its default compresses them to fp16).
    ov.save_model(converted, str(target), compress_to_fp16=False)
    assert bin_path.exists()


def check_openvino_machine(device: torch.device, precision: str) -> None:
    if precision == "bf16" and "BF16" not in openvino_capabilities():
        raise ModelLoadError(
            "this CPU has no native bf16 for OpenVINO (needs AVX-512 BF16 or AMX); use --precision fp32"
        )


def openvino_capabilities() -> list[str]:
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
