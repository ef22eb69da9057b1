"""PyTorch itself: eager, and `torch.compile` for fixed shapes."""

from __future__ import annotations

import torch

from timmserve.model.backends.base import BackendSpec, autocast


class EagerBackend:
    def __init__(self, model: torch.nn.Module, spec: BackendSpec) -> None:
        self.model, self.spec = model, spec

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with autocast(self.spec.device, self.spec.precision):
            return self.model(batch).float()


class CompiledBackend:
    """`torch.compile` for fixed shapes: each batch is padded up to a power-of-two bucket (at most
    log2(max batch) + 1 compiled graphs, each warmed once). On CUDA, mode "reduce-overhead" replays
    CUDA graphs, which is what makes small batches cheap there."""

    def __init__(self, model: torch.nn.Module, spec: BackendSpec) -> None:
        self.spec = spec
        mode = "reduce-overhead" if spec.device.type == "cuda" else None
        self.model = torch.compile(model, mode=mode, dynamic=False)
        self.buckets = sorted({min(2**i, spec.max_batch_size) for i in range(spec.max_batch_size.bit_length() + 1)})

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        size = batch.shape[0]
        bucket = next((b for b in self.buckets if b >= size), size)
        if bucket > size:
            batch = torch.cat([batch, batch.new_zeros((bucket - size, *batch.shape[1:]))])
        with autocast(self.spec.device, self.spec.precision):
            # A CUDA graph's output is a static buffer that its next replay overwrites: clone it.
            return self.model(batch)[:size].float().clone()
