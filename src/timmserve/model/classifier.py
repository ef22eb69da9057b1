"""A batch of ImageRequests → one result per request, in order: its top-k predictions, or the
RequestError that explains why that one image could not be classified.

This is the batch function the LitAPI adapts. It never lets one request's bad bytes fail the
batch: decoding happens per item (in a thread pool: PIL releases the GIL while decoding; or, with
`--gpu-decode`, the batch's JPEGs in one call on the GPU, preprocess.DeviceJpegDecoder) into
uint8 tensors; the good ones go to the device as one batch (one host→device copy, from pinned memory
on CUDA), are normalised there in one op, and run through the inference backend; failures travel
back as values in their own slots.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from timmserve.errors import InternalError, ModelLoadError, RequestError
from timmserve.model.backends import (
    Backend,
    BackendSpec,
    auto_candidates,
    choose_backend,
    create_backend,
    decision_key,
    describe_trials,
    write_atomically,
)
from timmserve.model.factory import LoadedModel, ModelInfo, load_model
from timmserve.model.photos import reference_photos
from timmserve.model.preprocess import DeviceJpegDecoder, Normalizer, Preprocessor
from timmserve.model.types import ImageRequest, Prediction
from timmserve.settings.config import ServeConfig
from timmserve.settings.machine import device_name, resolve_machine

Result = list[Prediction] | RequestError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodedBatch:
    """A batch between the classifier's two stages (`Classifier.decode`, `Classifier.finish`)."""

    requests: Sequence[ImageRequest]
    slots: list  # per request: its uint8 CHW tensor, or the RequestError that is its answer
    good: list[int]  # the requests whose tensors are in `batch`, in order
    batch: torch.Tensor | None  # (len(good), C, H, W) uint8; None when no image decoded


class Classifier:
    """The batch function: encoded images in, one result per image out (see the module's doc).
    Holds the backend, the preprocessor, the labels and a decode thread pool (`close` it)."""

    def __init__(
        self,
        backend: Backend,
        preprocessor: Preprocessor,
        labels: Sequence[str],
        *,
        device: torch.device,
        channels_last: bool = False,
        decode_threads: int = 1,
        device_decoder: DeviceJpegDecoder | None = None,
    ) -> None:
        self.backend = backend
        self.preprocessor = preprocessor
        self.normalizer = Normalizer(preprocessor.data_config, device)
        self.labels = list(labels)
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._decode_pool = (
            ThreadPoolExecutor(decode_threads, thread_name_prefix="decode") if decode_threads > 1 else None
        )
        self.device_decoder = device_decoder  # JPEGs on the device; the rest in the decode pool

    def classify(self, requests: Sequence[ImageRequest]) -> list[Result]:
        """One result per request, in order: its top-k predictions (descending probability), or
        the RequestError that is that image's answer. Raises only when the model call itself fails
        (that fails the whole batch: a bug, or the device). The two stages below, in turn."""
        return self.finish(self.decode(requests))

    def decode(self, requests: Sequence[ImageRequest]) -> DecodedBatch:
        """Stage 1, the CPU's part (a worker with `--overlap` runs it for its next batch while
        stage 2 runs the current one): each image decoded and resized to its uint8 tensor, or its
        RequestError; the good ones stacked, in pinned memory on CUDA."""
        slots: list[Result | torch.Tensor | None] = (
            self.device_decoder([request.data for request in requests])
            if self.device_decoder is not None
            else [None] * len(requests)
        )
        on_cpu = [i for i, item in enumerate(slots) if item is None]
        for i, item in zip(on_cpu, self._map(self._preprocess, [requests[i] for i in on_cpu])):
            slots[i] = item
        good = [i for i, item in enumerate(slots) if isinstance(item, torch.Tensor)]
        batch = None
        if good:
            tensors = [slots[i] for i in good]
            if any(tensor.device != tensors[0].device for tensor in tensors):  # some decoded on the GPU
                tensors = [tensor.to(self.device) for tensor in tensors]
            batch = torch.stack(tensors)
            if self.device.type == "cuda" and batch.device.type == "cpu":
                batch = batch.pin_memory()  # so the copy in stage 2 is one asynchronous copy
        return DecodedBatch(requests, slots, good, batch)

    def finish(self, decoded: DecodedBatch) -> list[Result]:
        """Stage 2, the model's part: one result per request of a decoded batch, in order."""
        results = list(decoded.slots)
        if decoded.batch is not None:
            probabilities = self.probabilities(decoded.batch)
            max_k = max(decoded.requests[i].top_k for i in decoded.good)
            top_probs, top_indices = probabilities.topk(max_k, dim=1)
            for row, i in enumerate(decoded.good):
                k = decoded.requests[i].top_k
                results[i] = [
                    Prediction(self.labels[index], probability)
                    for index, probability in zip(top_indices[row, :k].tolist(), top_probs[row, :k].tolist())
                ]
        return results  # type: ignore[return-value]  # every tensor slot was replaced above

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax over classes for a batch of uint8 images (N, C, H, W), as fp32 on the CPU."""
        return self._logits(batch).softmax(dim=1).cpu()

    @torch.inference_mode()
    def logits(self, images: Sequence[bytes]) -> torch.Tensor:
        """Raw fp32 logits for good images (the accuracy guard compares these across backends)."""
        return self._logits(torch.stack([self.preprocessor(data) for data in images])).cpu()

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()  # so the copy below is asynchronous (no copy if pinned already)
        batch = self.normalizer(batch.to(self.device, non_blocking=True)).contiguous(memory_format=self.memory_format)
        return self.backend(batch).float()

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run the model once per batch size, then the reference photos through the whole path
        once, so the first real request pays neither kernel selection and allocator growth nor the
        decode path's one-off set-up (the decode threads; with GPU decode, nvJPEG's decoder, which
        torchvision creates on its first call)."""
        channels, height, width = self.preprocessor.data_config["input_size"]
        for batch_size in batch_sizes:
            self.probabilities(torch.zeros(batch_size, channels, height, width, dtype=torch.uint8))
        self.classify([ImageRequest(data, 1) for data in reference_photos().values()])

    def close(self) -> None:
        """Stop the decode threads (the bench builds and drops classifiers; a worker keeps its own)."""
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False)

    def _preprocess(self, request: ImageRequest) -> torch.Tensor | RequestError:
        """The image's uint8 tensor, or the error that is this image's own answer: whatever goes
        wrong with one image (even an error nobody anticipated, or running out of memory) must
        not fail the images batched with it."""
        try:
            return self.preprocessor(request.data)
        except RequestError as error:
            return error
        except Exception:  # a bug or a resource failure on this image alone: a 500 for it only
            logger.exception("preprocessing an image failed")
            return InternalError("the server failed while reading this image; the server log has the traceback")

    def _map(self, fn, items):  # noqa: ANN001, ANN202 - thin wrapper over Executor.map
        if self._decode_pool is None or len(items) < 2:
            return map(fn, items)
        return self._decode_pool.map(fn, items)


def build_classifier(config: ServeConfig, labels: Sequence[str], device: torch.device) -> tuple[Classifier, ModelInfo]:
    """The configured model on `device`, ready to classify: what each server worker runs, and what
    the benchmark's ceilings measure. What the config leaves to the machine is resolved first
    (machine.resolve_machine; `auto` by classifier.resolve_auto). Backends use the calling
    thread's torch thread count. Raises ModelLoadError for a model, weights or labels that do not
    load, or a backend that cannot run here."""
    config = resolve_machine(config)
    loaded = load_model(config)
    if loaded.info.num_classes != len(labels):
        raise ModelLoadError(f"the model has {loaded.info.num_classes} classes but {len(labels)} labels were given")
    preprocessor = Preprocessor(
        loaded.info.data_config,
        max_pixels=config.max_image_pixels,
        max_aspect_ratio=config.max_aspect_ratio,
        fast_decode=config.fast_decode,
    )
    spec = backend_spec(config, loaded.info, device)
    if "auto" in (config.backend, config.precision):
        config, _built = resolve_auto(config, loaded, device)
    name = config.backend
    classifier = Classifier(
        create_backend(name, loaded.model, spec),
        preprocessor,
        labels,
        device=device,
        channels_last=config.channels_last,
        decode_threads=config.decode_threads,
        device_decoder=_device_decoder(config, preprocessor, device),
    )
    return classifier, loaded.info


def _device_decoder(config: ServeConfig, preprocessor: Preprocessor, device: torch.device) -> DeviceJpegDecoder | None:
    """With `gpu_decode`, the device's JPEG decoder; none (the CPU path, logged) where the model's
    eval transform has no tensor twin to resize with on the GPU, as fast decode keeps PIL there."""
    if not config.gpu_decode:
        return None
    if preprocessor.tensor_transform is None:
        logger.warning("--gpu-decode: this model's eval transform has no tensor twin; JPEGs are decoded on the CPU")
        return None
    return DeviceJpegDecoder(preprocessor, device)


def backend_spec(config: ServeConfig, info: ModelInfo, device: torch.device) -> BackendSpec:
    return BackendSpec(
        device=device,
        precision=config.precision,
        channels_last=config.channels_last,
        input_size=tuple(info.data_config["input_size"]),
        threads=torch.get_num_threads(),
        max_batch_size=config.max_batch_size,
        cache_dir=config.artifact_cache(),
    )


def resolve_auto(config: ServeConfig, loaded: LoadedModel, device: torch.device) -> tuple[ServeConfig, bool]:
    """`--backend auto` and/or `--precision auto`: the fastest (backend, precision) on this machine
    whose answers on the reference photos agree with eager fp32 (backends.choose_backend), timed
    with the calling thread's torch threads (set them as a worker's first). The decision is cached
    beside the artifacts, keyed by everything it depends on (weights, machine, library versions,
    threads, batch size), so a second start reuses it. Logged in one line either way. Returns the
    config with both resolved, and whether the candidates were built here just now (their
    artifacts exported and proven to run). Raises ModelLoadError when no candidate runs and agrees."""
    candidates = auto_candidates(config.backend, config.precision, device)
    spec = backend_spec(config.replace(precision="fp32"), loaded.info, device)
    key = decision_key(loaded.model, spec, candidates)
    path = config.artifact_cache() / "decisions" / f"{key}.json"
    try:
        decision = json.loads(path.read_text())
        how, built = f"decided {decision['decided_at']}, cached in {path}", False
    except (OSError, ValueError):
        preprocessor = Preprocessor(loaded.info.data_config, max_pixels=config.max_image_pixels)
        photos = torch.stack([preprocessor(data) for data in reference_photos().values()])
        inputs = Normalizer(loaded.info.data_config, torch.device("cpu"))(photos)
        chosen, trials = choose_backend(loaded.model, spec, inputs, candidates)
        decision = {
            "backend": chosen.name,
            "precision": chosen.precision,
            "decided_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "trials": [trial.as_dict() for trial in trials],
        }
        write_atomically(path, json.dumps(decision, indent=1).encode())
        how, built = describe_trials(trials), True
    logger.info(
        "auto chose --backend %s --precision %s on %s with %d thread(s) (%s)",
        decision["backend"], decision["precision"], device_name(device), spec.threads, how,
    )  # fmt: skip
    return config.replace(backend=decision["backend"], precision=decision["precision"]), built


def needs_preparing(config: ServeConfig) -> bool:
    """Whether `prepare_backend` has work: `auto` to resolve or an artifact to export."""
    return "auto" in (config.backend, config.precision) or config.backend not in ("eager", "compile")


def prepare_backend(config: ServeConfig, loaded: LoadedModel, device: torch.device) -> ServeConfig:
    """Run once before any worker starts (startup.prepare runs it in a child process): resolve
    `auto` (backend and precision) and export the backend's artifact into the cache (and prove it
    runs), so every worker only loads it; the config returned names what the workers build. `auto`
    is timed with the workers' own thread count (`config.torch_threads`, machine.resolve_machine)."""
    if not needs_preparing(config):
        return config
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)  # measure as a worker runs
    built = False
    if "auto" in (config.backend, config.precision):
        config, built = resolve_auto(config, loaded, device)
    if not built and config.backend not in ("eager", "compile"):  # auto's trials built it just now
        create_backend(config.backend, loaded.model, backend_spec(config, loaded.info, device))
    return config


def start_worker_classifier(config: ServeConfig, labels: Sequence[str], device: torch.device) -> Classifier:
    """What a server worker (LitServe) or replica (Ray) runs at start-up: its share of the cores as
    intra-op threads (`config.torch_threads`, resolved once by machine.resolve_machine), the model
    loaded, warm-up calls at the batch sizes it will see."""
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    classifier, _info = build_classifier(config, labels, device)
    classifier.warm_up(warm_up_batch_sizes(classifier.backend, device, config.max_batch_size))
    return classifier


def warm_up_batch_sizes(backend: Backend, device: torch.device, max_batch_size: int) -> list[int]:
    """`compile` builds one graph per padded batch size: all of them, not on first requests. On
    CUDA the first call at each new batch size chooses and builds its kernels, and the batcher forms
    every size up to the maximum: all of them too (a fraction of a second each on the GPU). On the
    CPU a call at the largest size is what costs: the two ends."""
    buckets = getattr(backend, "buckets", None)
    if buckets:
        return list(buckets)
    if device.type == "cuda":
        return list(range(1, max_batch_size + 1))
    return sorted({1, max_batch_size})
