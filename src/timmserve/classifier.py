"""A batch of ImageRequests → one result per request, in order: its top-k predictions, or the
RequestError that explains why that one image could not be classified.

This is the batch function the LitAPI adapts. It never lets one request's bad bytes fail the
batch: decoding happens per item (in a thread pool: PIL releases the GIL while decoding), the
good tensors go through the model as one batch with one host→device copy, and failures travel
back as values in their own slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from timmserve.config import ServeConfig
from timmserve.errors import ModelLoadError, RequestError
from timmserve.model import ModelInfo, autocast, check_precision_supported, load_model, prepare_for_inference
from timmserve.payload import ImageRequest, Prediction
from timmserve.preprocess import Preprocessor

Result = list[Prediction] | RequestError


class Classifier:
    def __init__(
        self,
        model: torch.nn.Module,
        preprocessor: Preprocessor,
        labels: Sequence[str],
        *,
        device: torch.device,
        precision: str = "fp32",
        channels_last: bool = False,
        decode_threads: int = 1,
    ) -> None:
        self.model = model
        self.preprocessor = preprocessor
        self.labels = list(labels)
        self.device = device
        self.precision = precision
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._decode_pool = (
            ThreadPoolExecutor(decode_threads, thread_name_prefix="decode") if decode_threads > 1 else None
        )

    def classify(self, requests: Sequence[ImageRequest]) -> list[Result]:
        """One result per request, in order."""
        results: list[Result | torch.Tensor] = list(self._map(self._preprocess, requests))
        good = [i for i, item in enumerate(results) if isinstance(item, torch.Tensor)]
        if good:
            probabilities = self.probabilities(torch.stack([results[i] for i in good]))
            max_k = max(requests[i].top_k for i in good)
            top_probs, top_indices = probabilities.topk(max_k, dim=1)
            for row, i in enumerate(good):
                k = requests[i].top_k
                results[i] = [
                    Prediction(self.labels[index], probability)
                    for index, probability in zip(top_indices[row, :k].tolist(), top_probs[row, :k].tolist())
                ]
        return results  # type: ignore[return-value]  # every tensor slot was replaced above

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax over classes for a preprocessed batch, as fp32 on the CPU."""
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        with autocast(self.device, self.precision):
            logits = self.model(batch)
        return logits.float().softmax(dim=1).cpu()

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run the model once per batch size so the first real request does not pay for kernel
        selection and allocator growth."""
        channels, height, width = self.preprocessor.data_config["input_size"]
        for batch_size in batch_sizes:
            self.probabilities(torch.zeros(batch_size, channels, height, width))

    def close(self) -> None:
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False)

    def _preprocess(self, request: ImageRequest) -> torch.Tensor | RequestError:
        try:
            return self.preprocessor(request.data)
        except RequestError as error:
            return error

    def _map(self, fn, items):  # noqa: ANN001, ANN202 - thin wrapper over Executor.map
        if self._decode_pool is None or len(items) < 2:
            return map(fn, items)
        return self._decode_pool.map(fn, items)


def build_classifier(config: ServeConfig, labels: Sequence[str], device: torch.device) -> tuple[Classifier, ModelInfo]:
    """The configured model on `device`, ready to classify: what each server worker runs, and what
    the benchmark's ceilings measure."""
    check_precision_supported(device, config.precision)
    loaded = load_model(config)
    if loaded.info.num_classes != len(labels):
        raise ModelLoadError(f"the model has {loaded.info.num_classes} classes but {len(labels)} labels were given")
    classifier = Classifier(
        prepare_for_inference(loaded.model, device, config.channels_last),
        Preprocessor(loaded.info.data_config, max_pixels=config.max_image_pixels),
        labels,
        device=device,
        precision=config.precision,
        channels_last=config.channels_last,
        decode_threads=config.decode_threads,
    )
    return classifier, loaded.info


def start_worker_classifier(
    config: ServeConfig, labels: Sequence[str], device: torch.device, workers: int
) -> tuple[Classifier, ModelInfo]:
    """What a server worker (LitServe) or replica (Ray) runs at start-up: its share of the cores as
    intra-op threads, the model loaded, one warm-up call per batch size it will see first."""
    # CPU workers share the cores; GPU workers barely use intra-op threads, so one rule serves both.
    torch.set_num_threads(config.torch_threads_per_worker(workers))
    classifier, info = build_classifier(config, labels, device)
    classifier.warm_up(sorted({1, config.max_batch_size}))
    return classifier, info
