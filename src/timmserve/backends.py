"""Inference backends: one interface (normalised NCHW float batch on the device → fp32 logits) over
PyTorch eager, `torch.compile`, ONNX Runtime and OpenVINO.

The fastest backend depends on the machine (measured on a 2-core AVX2 EPYC, tf_efficientnet_lite0
fp32 img/s at batch 1/8/32: eager 32/32/16, compile 43/53/43, OpenVINO 90/83/92, ONNX Runtime
97/107/109), so `auto` measures the installed ones on this machine and keeps the fastest whose answers
agree with eager fp32 (see `choose_backend`).

Exported artifacts (ONNX files, OpenVINO IR) are cached on disk under a key made of the model's
architecture and weights fingerprint, the backend, its library version, the precision and the input
shape: the first start pays for the export (ONNX: ~20 s for the built-in model), later starts and
other workers load the file. Files are written under a temporary name and renamed, so a reader never
sees half a file. Nothing in the cache is a pickle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from timmserve.errors import ModelLoadError
from timmserve.machine import cpu_features, device_name, native_reduced_precision

logger = logging.getLogger(__name__)

AUTO_TIMING_SLICES = 4  # round-robin slices per candidate when `auto` times them
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


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for a precision; fp32 runs as is. Weights stay fp32; autocast keeps
    softmax and norms in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


class _EagerBackend:
    def __init__(self, model: torch.nn.Module, spec: BackendSpec) -> None:
        self.model, self.spec = model, spec

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with autocast(self.spec.device, self.spec.precision):
            return self.model(batch).float()


class _CompiledBackend:
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


class _OnnxRuntimeBackend:
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


class _OpenVinoBackend:
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


def _check_openvino_machine(device: torch.device, precision: str) -> None:
    if precision == "bf16" and "BF16" not in openvino_capabilities():
        raise ModelLoadError(
            "this CPU has no native bf16 for OpenVINO (needs AVX-512 BF16 or AMX); use --precision fp32"
        )


def _check_onnxruntime_machine(device: torch.device, precision: str) -> None:
    if device.type == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():  # before minutes of export
            raise ModelLoadError("this onnxruntime has no CUDA provider: pip install 'timmserve[tensorrt]'")


def openvino_capabilities() -> list[str]:
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


# The registry: every backend by name (config.Backend lists the same names, plus "auto").
BACKENDS: dict[str, BackendKind] = {
    kind.name: kind
    for kind in (
        BackendKind("eager", _EagerBackend, devices=("cpu", "cuda"), precisions=("fp32", "fp16", "bf16")),
        # Not in `auto`: minutes of compilation in every worker on every start.
        BackendKind(
            "compile", _CompiledBackend, devices=("cpu", "cuda"), precisions=("fp32", "fp16", "bf16"), in_auto=False
        ),
        BackendKind(
            "onnxruntime", _OnnxRuntimeBackend, devices=("cpu", "cuda"), precisions=("fp32", "fp16"),
            package="onnxruntime", extra="onnxruntime", exports=True, check_machine=_check_onnxruntime_machine,
        ),
        BackendKind(
            "openvino", _OpenVinoBackend, devices=("cpu",), precisions=("fp32", "bf16"),
            package="openvino", extra="openvino", exports=True, check_machine=_check_openvino_machine,
        ),
    )
}  # fmt: skip
AUTO_CANDIDATES: tuple[str, ...] = tuple(name for name, kind in BACKENDS.items() if kind.in_auto)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the architecture and every tensor's name, shape, dtype and bytes."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_artifact(
    model: torch.nn.Module, spec: BackendSpec, backend: str, suffix: str, export: Callable[[Path], None]
) -> Path:
    """The artifact's path in the cache, exported first when missing. The export writes into a
    private temporary folder; its files are renamed into place (the `suffix` file last), so a
    concurrent reader sees either nothing or complete files."""
    library = _library_version(BACKENDS[backend].package or "torch")
    key_text = "|".join(
        [weights_fingerprint(model), backend, library, torch.__version__, spec.precision, spec.device.type]
        + [str(d) for d in spec.input_size]
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    path = spec.cache_dir / f"{backend}-{key}{suffix}"
    if path.exists():
        logger.info("Loading the cached %s artifact %s", backend, path)
        return path
    spec.cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=spec.cache_dir, prefix=".export-") as folder:
        staged = Path(folder) / path.name
        export(staged)
        for file in sorted(Path(folder).iterdir(), key=lambda f: f.name == staged.name):
            os.replace(file, spec.cache_dir / file.name)
    logger.info("Exported the model for %s in %.1f s → %s", backend, time.perf_counter() - started, path)
    return path


def decision_key(model: torch.nn.Module, spec: BackendSpec, candidates: Sequence[tuple[str, str]]) -> str:
    """What an `auto` decision depends on, hashed: the weights, the machine (device name, CPU
    instruction sets), the libraries' versions, the threads, batch size (`timing_batch_size`),
    memory format and input shape it was timed with, and the candidates."""
    libraries = [
        f"{kind.package}={_library_version(kind.package)}"
        for kind in BACKENDS.values()
        if kind.package is not None and kind.installed()
    ]
    parts = [
        weights_fingerprint(model),
        device_name(spec.device),
        ",".join(cpu_features()),
        f"torch={torch.__version__}",
        *libraries,
        f"threads={spec.threads}",
        f"batch={timing_batch_size(spec)}",
        f"channels_last={spec.channels_last}",
        "x".join(map(str, spec.input_size)),
        *(f"{name}:{precision}" for name, precision in candidates),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def timing_batch_size(spec: BackendSpec) -> int:
    """The batch size `auto` times candidates at: what a busy server mostly runs, at most 8."""
    return min(8, spec.max_batch_size)


def write_atomically(path: Path, content: bytes) -> None:
    """Write a small cache file under a temporary name, then rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".", delete=False) as staged:
        staged.write(content)
    os.replace(staged.name, path)


def _library_version(package: str) -> str:
    # The module's own version: the onnxruntime-gpu distribution installs the same module.
    return importlib.import_module(package).__version__


@dataclass(frozen=True)
class Agreement:
    """How a backend's answers compare with eager fp32 on the same inputs."""

    top1_agree: int
    images: int
    max_prob_diff: float  # largest |Δ softmax probability| over all images and classes
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.top1_agree == self.images and self.max_prob_diff <= self.tolerance

    def as_dict(self) -> dict[str, Any]:
        return {
            "top1_agree": self.top1_agree,
            "images": self.images,
            "max_prob_diff": float(f"{self.max_prob_diff:.3g}"),
            "tolerance": self.tolerance,
            "ok": self.ok,
        }


# Largest |Δ probability| accepted against eager fp32: fp32 backends differ only in summation order
# (measured ≤ 1e-5 here); bf16 keeps 8 bits of mantissa and moves logits by up to a few percent.
PROBABILITY_TOLERANCE = {"fp32": 1e-3, "fp16": 0.02, "bf16": 0.05}
# A JPEG decoded at a reduced DCT scale (--fast-decode) is a slightly different picture: on the
# reference photos it moved one probability by 0.022 here, top-1 unchanged.
FAST_DECODE_TOLERANCE = 0.05


def probability_tolerance(precision: str, fast_decode: bool = False) -> float:
    return PROBABILITY_TOLERANCE[precision] + (FAST_DECODE_TOLERANCE if fast_decode else 0.0)


def agreement(reference_logits: torch.Tensor, logits: torch.Tensor, tolerance: float) -> Agreement:
    reference, probs = reference_logits.float().softmax(1), logits.float().softmax(1)
    return Agreement(
        top1_agree=int((reference.argmax(1) == probs.argmax(1)).sum()),
        images=reference.shape[0],
        max_prob_diff=float((reference - probs).abs().max()),
        tolerance=tolerance,
    )


@dataclass(frozen=True)
class BackendTrial:
    name: str
    precision: str
    img_per_s: float | None  # None: could not run here
    agreement: Agreement | None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        agreed = self.agreement.as_dict() if self.agreement is not None else None
        return {"backend": self.name, "precision": self.precision, "img_per_s": self.img_per_s,
                "agreement": agreed, "error": self.error}  # fmt: skip


def auto_candidates(backend: str, precision: str, device: torch.device) -> list[tuple[str, str]]:
    """The (backend, precision) pairs `auto` measures: every `auto` backend where `backend` is
    "auto", and fp32 plus the device's native reduced precision (machine.native_reduced_precision)
    where `precision` is "auto"; a pinned value is the only candidate of its kind."""
    names = AUTO_CANDIDATES if backend == "auto" else (backend,)
    reduced = native_reduced_precision(device)
    precisions = (precision,) if precision != "auto" else ("fp32", reduced) if reduced else ("fp32",)
    return [(name, p) for name in names for p in precisions]


def choose_backend(
    model: torch.nn.Module,
    spec: BackendSpec,
    inputs: torch.Tensor,
    candidates: Sequence[tuple[str, str]],
    *,
    seconds: float = 1.0,
) -> tuple[BackendTrial, list[BackendTrial]]:
    """`auto`: build every candidate (backend, precision), check its answers on `inputs`
    (normalised photos) against eager fp32 within that precision's tolerance, time it at the batch
    size the server will mostly see, keep the fastest that agrees. The timing interleaves the
    candidates in short slices (each keeps its best slice), so a machine whose speed drifts favours
    none of them. Returns (the chosen trial, every trial); raises ModelLoadError when none runs and
    agrees."""
    with torch.inference_mode():
        reference = model.float().eval()(inputs.to(torch.float32)).float()
    batch_size = timing_batch_size(spec)
    timing_batch = inputs[torch.arange(batch_size) % inputs.shape[0]].to(spec.device)
    built: dict[tuple[str, str], tuple[Backend, Agreement]] = {}
    errors: dict[tuple[str, str], str] = {}
    for name, precision in candidates:
        try:
            backend = create_backend(name, model, dataclasses.replace(spec, precision=precision))
        except ModelLoadError as exc:
            errors[name, precision] = str(exc)
            continue
        logits = backend(inputs.to(spec.device)).cpu()
        built[name, precision] = (backend, agreement(reference, logits, probability_tolerance(precision)))
    rates = dict.fromkeys(built, 0.0)
    for _ in range(AUTO_TIMING_SLICES):
        for key, (backend, _agreed) in built.items():
            rates[key] = max(rates[key], _images_per_second(backend, timing_batch, seconds / AUTO_TIMING_SLICES))
    trials = [
        BackendTrial(name, precision, rates[name, precision], built[name, precision][1])
        if (name, precision) in built
        else BackendTrial(name, precision, None, None, errors[name, precision])
        for name, precision in candidates
    ]
    usable = [t for t in trials if t.img_per_s is not None and t.agreement is not None and t.agreement.ok]
    if not usable:
        raise ModelLoadError(f"no candidate backend runs here and agrees with eager fp32: {describe_trials(trials)}")
    return max(usable, key=lambda t: t.img_per_s or 0.0), trials


def _images_per_second(backend: Backend, batch: torch.Tensor, seconds: float) -> float:
    backend(batch)  # warm-up
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        backend(batch)
        calls += 1
    return calls * batch.shape[0] / (time.perf_counter() - start)


def describe_trials(trials: Sequence[BackendTrial]) -> str:
    """One line per trial for the start-up log."""
    lines = []
    for trial in trials:
        label = f"{trial.name} {trial.precision}"
        if trial.img_per_s is None:
            lines.append(f"{label}: not available ({trial.error})")
        else:
            agreed = trial.agreement
            verdict = "agrees" if agreed and agreed.ok else "DISAGREES"
            detail = f"top-1 {agreed.top1_agree}/{agreed.images}, max Δp {agreed.max_prob_diff:.1e}" if agreed else ""
            lines.append(f"{label}: {trial.img_per_s:.1f} img/s, {verdict} with eager fp32 ({detail})")
    return "; ".join(lines)
