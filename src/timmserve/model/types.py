"""The classifier's input and output, `ImageRequest` and `Prediction`: plain data without torch,
so that the HTTP layer and the client import them cheaply."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageRequest:
    """One image to classify: the encoded file bytes and how many classes to return."""

    data: bytes
    top_k: int


@dataclass(frozen=True)
class Prediction:
    """One row of an answer: `{"label": …, "probability": …}`."""

    label: str
    probability: float
