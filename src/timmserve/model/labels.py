"""Class names: a label file, the model's own label names, or timm's ImageNet info (offline).

Whatever the source, the count must equal the model's classes, or start-up fails: a label list that
is off by one silently mislabels every prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from timm.data import ImageNetInfo, infer_imagenet_subset

from timmserve.errors import ModelLoadError


def load_labels(
    num_classes: int, *, label_file: Path | None = None, model_label_names: Sequence[str] | None = None
) -> list[str]:
    """Names for class indices 0..num_classes-1, by precedence: label file > the model's own
    label names (WordNet synsets become readable ImageNet names) > ImageNet by class count."""
    if label_file is not None:
        labels, source = read_label_file(label_file), str(label_file)
    elif model_label_names:
        labels, source = _describe_synsets(list(model_label_names)), "the model's config"
    else:
        subset = infer_imagenet_subset({"num_classes": num_classes})
        if subset is None:
            raise ModelLoadError(
                f"the model has {num_classes} classes and no label names; pass --labels FILE (one name per line)"
            )
        labels, source = ImageNetInfo(subset).label_descriptions(), f"timm's {subset} info"
    if len(labels) != num_classes:
        raise ModelLoadError(f"{source} has {len(labels)} labels but the model has {num_classes} classes")
    return labels


def read_label_file(path: Path) -> list[str]:
    """One label per line, in class-index order; trailing blank lines are ignored, others are an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read label file {path}: {exc}") from None
    lines = [line.strip() for line in text.rstrip().splitlines()]
    for number, line in enumerate(lines, start=1):
        if not line:
            raise ModelLoadError(f"label file {path} has an empty label on line {number}")
    return lines


def _describe_synsets(names: list[str]) -> list[str]:
    """ImageNet models list WordNet ids (n01440764 …); show their words instead."""
    info = ImageNetInfo("imagenet-22k")
    known = set(info.label_names())
    if all(name in known for name in names):
        return [info.label_name_to_description(name) for name in names]
    return names
