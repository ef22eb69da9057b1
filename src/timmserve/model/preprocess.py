"""Image bytes → model input tensor: decode.py's checked picture, resized and cropped per image,
normalised per batch.

The tensor transform is timm's own eval transform for the model's data config (input size,
interpolation, crop and mean/std come from the model, never from constants here), split in two:
per image, resize and crop the decoded 8-bit pixels as a uint8 CHW tensor (torchvision v2's uint8
kernels where timm's steps have a v2 twin, PIL otherwise; a quarter of the bytes of a float tensor,
and no float work per image); per batch, one normalise on the model's device (`Normalizer`).
With `fast_decode` (the default) a JPEG is also decoded straight at the smallest DCT scale (1/2,
1/4, 1/8) still at least the size timm resizes to (PIL's `draft`), so a 12-megapixel photo costs
about as much as a 1-megapixel one (a JPEG that fails to decode so, a lossless one, is decoded at
full size); without it, timm's PIL transform runs as is (the original deployment's path, the
benchmark's baseline).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from timm.data import create_transform
from timm.data.transforms import MaybePILToTensor
from torchvision import transforms as tv1
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from timmserve.errors import (
    RequestError,
)
from timmserve.model.decode import EXIF_ORIENTATION, decode_image, open_checked


class Preprocessor:
    """Bytes → uint8 CHW tensor, resized and cropped with timm's eval transform for the model's
    data config (see the module's docstring for `fast_decode`); `Normalizer` finishes the job per
    batch."""

    def __init__(
        self,
        data_config: dict[str, Any],
        *,
        max_pixels: int,
        max_aspect_ratio: float = float("inf"),
        fast_decode: bool = True,
    ) -> None:
        self.data_config = dict(data_config)
        self.max_pixels = max_pixels
        self.max_aspect_ratio = max_aspect_ratio
        self.transform = create_transform(**self.data_config, is_training=False, normalize=False)
        self.tensor_transform = uint8_tensor_transform(self.transform) if fast_decode else None
        _, height, width = self.data_config["input_size"]
        crop_pct = self.data_config.get("crop_pct") or 1.0
        # timm resizes to input / crop_pct before cropping: decoding any smaller would upsample.
        self.draft_size = (math.ceil(width / crop_pct), math.ceil(height / crop_pct)) if fast_decode else None

    def __call__(self, data: bytes) -> torch.Tensor:
        image = decode_image(
            data, max_pixels=self.max_pixels, max_aspect_ratio=self.max_aspect_ratio, draft_size=self.draft_size
        )
        if self.tensor_transform is None:
            return self.transform(image)
        return self.tensor_transform(torch.from_numpy(np.array(image)).permute(2, 0, 1))


def uint8_tensor_transform(transform: tv1.Compose) -> v2.Compose | None:
    """timm's eval transform as torchvision v2 ops on a uint8 CHW tensor, where every step has a
    v2 twin (resize + center crop: timm's crop modes center and squash); None otherwise, and PIL
    runs timm's transform as is. Same result to within one level (mean 0.002/255 on the cat photo),
    six times faster here (0.46 ms against 3.0 ms: v2 has SIMD uint8 kernels, Pillow does not)."""
    steps: list[Any] = []
    for step in transform.transforms:
        if isinstance(step, tv1.Resize):
            steps.append(v2.Resize(step.size, interpolation=step.interpolation, max_size=step.max_size, antialias=True))
        elif isinstance(step, tv1.CenterCrop):
            steps.append(v2.CenterCrop(step.size))
        elif not isinstance(step, MaybePILToTensor):  # already a tensor
            return None
    return v2.Compose(steps)


class DeviceJpegDecoder:
    """The JPEGs of a batch decoded on the model's device in one call — nvJPEG on CUDA, through
    torchvision.io.decode_jpeg given a list (torchvision's benchmark: over 8,000 img/s on one A100
    for ~550×680 photos) — then resized and cropped there on uint8 by the preprocessor's tensor
    transform, one call per group of same-sized images, so the CPU only reads headers. It takes
    only the JPEGs nvJPEG decodes as the CPU path would: YCbCr or grayscale, no EXIF rotation, not
    multi-picture (MPO); every other image, and every image of a batch whose decode call failed
    (the call returns nothing then), is left to the CPU path, which gives each broken image its own
    error. Unlike the CPU path's JPEG draft (decoding at a reduced DCT scale), it decodes at full
    size and resizes with antialiasing. torchvision deprecates its image decoders in 0.29 for
    TorchCodec's: where they move, this does."""

    def __init__(self, preprocessor: Preprocessor, device: torch.device) -> None:
        """`preprocessor` must have a tensor transform (fast decode, and a model whose eval
        transform has a v2 twin: classifier.build_classifier checks)."""
        self.preprocessor = preprocessor
        self.device = device

    def __call__(self, images: Sequence[bytes]) -> list[torch.Tensor | RequestError | None]:
        """Per image: its uint8 CHW tensor on the device, the RequestError its header earned, or
        None for the CPU path."""
        slots: list[torch.Tensor | RequestError | None] = [None] * len(images)
        chosen = []
        for index, data in enumerate(images):
            try:
                image = open_checked(
                    data, max_pixels=self.preprocessor.max_pixels, max_aspect_ratio=self.preprocessor.max_aspect_ratio
                ).image
            except RequestError as error:
                slots[index] = error
                continue
            if image.format == "JPEG" and image.mode in ("RGB", "L") and image.getexif().get(EXIF_ORIENTATION, 1) == 1:
                chosen.append(index)
        if not chosen:
            return slots
        encoded = [torch.frombuffer(bytearray(images[index]), dtype=torch.uint8) for index in chosen]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # see the class docstring
                decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # a corrupt JPEG among them: the CPU path names it
            return slots
        for group in same_size_groups(decoded, RESIZE_GROUP_PIXELS):
            resized = self.preprocessor.tensor_transform(torch.stack([decoded[i] for i in group]))
            for i, pixels in zip(group, resized):
                slots[chosen[i]] = pixels
        return slots


# The device decoder resizes each group of same-sized images in one call, not one call per image:
# a call is a few small kernels on the GPU and, measured here on the CPU, 225 µs of Python and
# dispatch for an 8×8 image — on the H200 the GPU-decode pipeline spent 0.35 ms per image more than
# the model alone, for both models (docs/gpu.md). A group's pixels are capped so the float
# copy inside the resize stays under 1 GB.
RESIZE_GROUP_PIXELS = 64 * 2**20


def same_size_groups(images: Sequence[torch.Tensor], max_pixels: int) -> list[list[int]]:
    """Indices of `images` (CHW tensors) grouped by (height, width), in order of first appearance;
    a group split where it would hold more than `max_pixels` pixels (one image at least)."""
    by_size: dict[tuple[int, int], list[list[int]]] = {}
    for index, image in enumerate(images):
        height, width = image.shape[-2:]
        chunks = by_size.setdefault((height, width), [[]])
        if chunks[-1] and (len(chunks[-1]) + 1) * height * width > max_pixels:
            chunks.append([])
        chunks[-1].append(index)
    return [chunk for chunks in by_size.values() for chunk in chunks]


class Normalizer:
    """uint8 NCHW batch → float, (x / 255 − mean) / std, on the batch's device, as one fused op."""

    def __init__(self, data_config: dict[str, Any], device: torch.device) -> None:
        mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(data_config["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = (1.0 / (255.0 * std)).to(device)
        self.shift = (-mean / std).to(device)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, batch.float(), self.scale)
