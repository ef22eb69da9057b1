"""Four real photos with known ImageNet classes, shipped with the package: the benchmark's default
load, and the inputs on which `--backend auto` and the benchmark's accuracy guard compare every
backend and precision with eager fp32. Sources and licences: README.md in this folder."""

from __future__ import annotations

from functools import cache
from pathlib import Path

FOLDER = Path(__file__).parent
CAT = FOLDER / "cat.jpg"  # Chelsea the cat (scikit-image, CC0)


@cache
def reference_photos() -> dict[str, bytes]:
    """{name: JPEG bytes} for cat, espresso, grace_hopper and rocket."""
    return {path.stem: path.read_bytes() for path in sorted(FOLDER.glob("*.jpg"))}
