"""The on-disk cache of exported artifacts (ONNX files, OpenVINO IR) and `auto`'s decisions.

An artifact's key is made of the model's architecture and weights fingerprint, the backend, its
library version, the precision and the input shape: the first start pays for the export (ONNX:
~20 s for the built-in model), later starts and other workers load the file. Files are written
under a temporary name and renamed, so a reader never sees half a file. Nothing in the cache is a
pickle.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from timmserve.model.backends.base import BackendSpec

logger = logging.getLogger(__name__)


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
    """The artifact's path in the cache, exported first when missing; `backend` names the library
    too (its module: onnxruntime, openvino), whose version is part of the key. The export writes into a
    private temporary folder; its files are renamed into place (the `suffix` file last), so a
    concurrent reader sees either nothing or complete files."""
    library = library_version(backend)
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


def write_atomically(path: Path, content: bytes) -> None:
    """Write a small cache file under a temporary name, then rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".", delete=False) as staged:
        staged.write(content)
    os.replace(staged.name, path)


def library_version(package: str) -> str:
    # The module's own version: the onnxruntime-gpu distribution installs the same module.
    return importlib.import_module(package).__version__
