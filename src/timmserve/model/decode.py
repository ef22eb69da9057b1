"""Image bytes → a checked RGB picture (PIL), or the RequestError that says why not.

Decoding is defensive. Before any pixel is decoded: the format's family is checked against the
accepted ones (a phone's MPO is a JPEG), the pixel count against its limit (a 50 KB PNG can claim
100k × 100k), the aspect ratio against its limit (the resized image grows with the long side: a
102-byte 1×4000 PNG cost 20 photos' time and 0.75 GB), and a JPEG's scan count (each progressive
scan re-reads the whole image: 1,000 scans in 367 KB held a worker for 40 s); the same walk over
the markers reads the JPEG's frame header, so a JPEG variant Pillow cannot read (12-bit,
hierarchical …) is named in its error. Then EXIF orientation is applied, a BMP's alpha that is 0
everywhere is dropped, and every mode (L, LA, P, RGBA, CMYK, 16-bit …) becomes RGB. Each failure
is a typed RequestError, so the API answers 400/413/415 with a message that says what was wrong.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from timmserve.errors import (
    InvalidImageError,
    PayloadTooLargeError,
    UnsupportedMediaError,
)

# Pillow's format names → the accepted family they belong to (every other format Pillow can open,
# e.g. TIFF, JPEG 2000, PSD, ICO, PPM: 415).
FORMAT_FAMILIES: dict[str, str] = {
    "JPEG": "JPEG",
    "MPO": "JPEG",  # multi-picture JPEG (phones' depth/HDR images): the first picture is a JPEG
    "PNG": "PNG",  # APNG too (Pillow says PNG): its first frame
    "WEBP": "WEBP",
    "BMP": "BMP",
    "DIB": "BMP",
    "GIF": "GIF",
}
_SUPPORTED_NAMES = "JPEG, PNG, WebP, BMP or GIF"
# Baseline JPEGs have 1 scan per component; libjpeg's standard progressive script has 10; encoders
# that tune scans (mozjpeg) stay far below this. Each scan costs a pass over the whole image.
MAX_JPEG_SCANS = 64
# A photo's header holds a few dozen segments (a 1 MB ICC profile is 16 APP2 segments), and no stray
# bytes but a few of padding.
MAX_JPEG_SEGMENTS = 1024
MAX_JPEG_STRAY_BYTES = 4096
# The configured pixel limit (open_checked, from the header) replaces Pillow's own, a process-wide
# setting: Pillow refused any image over 179 MP with its own message, whatever the configured limit.
Image.MAX_IMAGE_PIXELS = None
# A marker: 0xFF, then neither 0x00 (a 0xFF byte of entropy-coded data, stuffed), nor a restart
# marker (0xD0-0xD7, part of a scan's data), nor 0xFF (fill before a marker).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# Start-of-frame markers SOF0-SOF15 (0xC4, 0xC8 and 0xCC are other segments): the second byte says
# the coding process; SOF0-2 at 8 bits (baseline, extended, progressive, Huffman) is what any decoder reads.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_DHP = 0xDE  # define hierarchical progression: the frames after it make a hierarchical JPEG
# Modes whose pixels Pillow's reduce can average (palette indices cannot be averaged).
_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
EXIF_ORIENTATION = 0x0112
# Transparent pixels are composited onto white, as a browser shows them on a default page.
_BACKGROUND = (255, 255, 255, 255)


@dataclass(frozen=True)
class JpegFrame:
    """What a JPEG's first frame header says about how its pixels are coded."""

    marker: int  # the SOFn marker's second byte, 0xC0 + n
    precision: int  # bits per sample: 8, or 12 or 16 (2-16 for lossless)
    hierarchical: bool  # a DHP marker came before the frame

    @property
    def variant(self) -> str | None:
        """The coding in words, e.g. "12-bit", "lossless", "hierarchical arithmetic-coded", where it
        is not 8-bit baseline, extended or progressive Huffman (SOF0-2, read everywhere); else None."""
        n = self.marker - 0xC0
        words = [f"{self.precision}-bit"] if self.precision != 8 else []
        if self.hierarchical or n in (5, 6, 7, 13, 14, 15):
            words.append("hierarchical")
        if n in (3, 7, 11, 15):
            words.append("lossless")
        if n >= 9:
            words.append("arithmetic-coded")
        return " ".join(words) or None

    def named(self) -> str:
        """E.g. "12-bit JPEG (SOF1)": the variant and its marker, for an error's detail."""
        return f"{self.variant or '8-bit'} JPEG (SOF{self.marker - 0xC0})"


class OpenedImage(NamedTuple):
    image: Image.Image  # opened lazily: its header read, no pixel decoded
    family: str  # its accepted family (FORMAT_FAMILIES' values)
    jpeg_frame: JpegFrame | None  # a JPEG's first frame header (from the marker walk); else None


def open_checked(data: bytes, *, max_pixels: int, max_aspect_ratio: float = float("inf")) -> OpenedImage:
    """The image opened lazily, after every check that needs no pixel: a JPEG's markers (before
    Pillow reads them), format, pixel count, aspect ratio.
    Raises InvalidImageError (400), PayloadTooLargeError (413) or UnsupportedMediaError (415)."""
    if not data:
        raise InvalidImageError("the image is empty (0 bytes)")
    # A JPEG (or MPO): its markers before Pillow reads them.
    frame = check_jpeg_markers(data) if data.startswith(b"\xff\xd8") else None
    image = _open(data, frame)
    family = FORMAT_FAMILIES.get(image.format or "")
    if family is None:
        raise UnsupportedMediaError(f"{image.format} images are not accepted; send {_SUPPORTED_NAMES}")
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImageError(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise PayloadTooLargeError(
            f"the image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}"
        )
    if max(width, height) > max_aspect_ratio * min(width, height):
        raise InvalidImageError(
            f"the image is {width}x{height}, an aspect ratio over the limit of {max_aspect_ratio:g}:1; crop it"
        )
    return OpenedImage(image, family, frame)


def check_jpeg_markers(data: bytes) -> JpegFrame | None:
    """The first picture's frame header (None if it has none), read on the way; raises
    InvalidImageError for a JPEG whose first picture would cost a decoder too long before a
    pixel: more than MAX_JPEG_SCANS scans (each a pass over the whole image), more than
    MAX_JPEG_SEGMENTS marker segments, or more than MAX_JPEG_STRAY_BYTES bytes outside any segment
    before the first scan (Pillow reads a JPEG's header in Python, byte by byte where no segment
    is: 20 MB of tiny segments or of stray bytes cost it 9 s; the second hostile-client pass).
    It goes from marker to marker as a decoder does: over each segment by its length (so bytes in
    an APPn payload, an EXIF thumbnail or an MPO index, are not markers), over a scan's
    entropy-coded data to the next marker, and stops at the first end of image (an MPO's later
    pictures are never decoded). 14 µs for the cat photo here."""
    scans = segments = stray = 0
    frame: JpegFrame | None = None
    hierarchical = False
    position = 2  # after the start of image
    while (found := _JPEG_MARKER.search(data, position)) is not None:
        if scans == 0:  # after the first scan, what lies between markers is its entropy-coded data
            stray += found.start() - position
        position = found.start()
        segments += 1
        if stray > MAX_JPEG_STRAY_BYTES:
            raise InvalidImageError(f"the JPEG has over {MAX_JPEG_STRAY_BYTES:,} stray bytes before its first scan")
        if segments > MAX_JPEG_SEGMENTS:
            raise InvalidImageError(f"the JPEG has more than {MAX_JPEG_SEGMENTS:,} marker segments, the limit")
        kind = data[position + 1]
        if kind == 0xD9:  # end of image
            return frame
        if kind == _DHP:
            hierarchical = True
        elif kind in _SOF_MARKERS and frame is None and position + 5 <= len(data):
            frame = JpegFrame(kind, data[position + 4], hierarchical)  # after the length: the precision
        if kind in (0x01, 0xD8) or position + 4 > len(data):  # no length field
            position += 2
            continue
        if kind == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise InvalidImageError(f"the JPEG has more than {MAX_JPEG_SCANS} scans, the limit")
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return frame


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    max_aspect_ratio: float = float("inf"),
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode an image file's bytes to an RGB PIL image (first frame, EXIF orientation applied).
    `draft_size` (width, height): the image may come back downscaled by an integer factor (a JPEG
    by its decoder's DCT scaling, any other by a box filter), never below that size. Raises
    InvalidImageError (400), PayloadTooLargeError (413) or UnsupportedMediaError (415)."""
    opened = open_checked(data, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
    image = _load(data, opened, draft_size)
    if opened.family == "BMP":
        image = _without_unused_alpha(image)
    if draft_size is not None:
        image = _reduce(image, draft_size)
    return to_rgb(_apply_exif_orientation(image))


def _load(data: bytes, opened: OpenedImage, draft_size: tuple[int, int] | None) -> Image.Image:
    """The opened image's pixels (the first frame of a GIF, animated WebP or MPO); a JPEG at the
    smallest DCT scale `draft_size` allows. A reduced decode that fails is retried at full size
    (libjpeg-turbo decodes a lossless JPEG only at full size: the draft of a 768x512 one failed);
    only the full decode's failure is the image's."""
    image = opened.image
    if opened.family == "JPEG" and draft_size is not None:
        full_size = image.size
        image.draft("RGB", draft_size)
        if image.size != full_size:
            try:
                image.load()
                return image
            except Exception:  # Pillow's image is spent: a new one from the same bytes
                image = _open(data, opened.jpeg_frame)
    try:
        image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError … for bad pixel data
        raise _undecodable(opened, exc) from None
    return image


def _undecodable(opened: OpenedImage, exc: Exception) -> InvalidImageError:
    """The 400 for pixel data the decoder could not read; it names a JPEG's variant, the likelier
    cause then (a hierarchical JPEG's header opens, and no libjpeg decodes its frames)."""
    frame = opened.jpeg_frame
    if frame is not None and frame.variant is not None:
        return InvalidImageError(
            f"the {frame.named()} could not be decoded: its data is corrupt or truncated, or it is a variant "
            f"this server cannot decode; send an 8-bit baseline or progressive JPEG ({exc})"
        )
    return InvalidImageError(f"the {opened.family} data is corrupt or truncated ({exc})")


def _without_unused_alpha(image: Image.Image) -> Image.Image:
    """A BMP's alpha channel that is 0 everywhere is not used: many writers leave the fourth byte of
    a 32-bit pixel 0 under an alpha mask (BI_BITFIELDS), and viewers show the file opaque (composited
    it was a blank page). Not so for PNG or WebP, whose alpha is always meant: a PNG transparent
    everywhere is shown transparent."""
    if image.mode == "RGBA" and image.getchannel("A").getextrema() == (0, 0):
        return image.convert("RGB")
    return image


def _reduce(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Shrink by the largest integer factor that keeps both sides at least `size` (box filter,
    as a JPEG decoder's DCT scaling does), before any full-size copy is made: the mode conversion
    and resize then work on the small image. (Pillow's reduce weights colours by alpha itself, so
    transparent pixels' colours do not bleed in: tested.)"""
    factor = min(image.width // size[0], image.height // size[1])
    if factor < 2:
        return image
    if image.mode in ("P", "PA"):  # palette indices cannot be averaged: to colours first
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    if image.mode in _SIXTEEN_BIT_MODES:  # reduce cannot read them; "I" can, but loses their scale
        return _sixteen_bit_to_rgb(image.convert("I").reduce(factor), full_scale=65535.0)
    if image.mode not in _REDUCIBLE_MODES:
        return image
    return image.reduce(factor)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB; alpha is composited onto white, 16-bit values are scaled, not clipped."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return _sixteen_bit_to_rgb(image)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _open(data: bytes, jpeg_frame: JpegFrame | None) -> Image.Image:
    """Pillow's lazily opened image. A JPEG whose header Pillow refuses while its frame is a variant
    (Pillow reads only 8-bit frames: a 12-bit one was "not an image") is a 415 naming the variant."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception as exc:
        if jpeg_frame is not None and jpeg_frame.variant is not None:
            raise UnsupportedMediaError(
                f"{jpeg_frame.named()} is not supported; send an 8-bit JPEG (baseline or progressive)"
            ) from None
        if isinstance(exc, UnidentifiedImageError):
            raise InvalidImageError(f"the bytes are not an image ({_SUPPORTED_NAMES} accepted)") from None
        # a header that starts right and then breaks
        raise InvalidImageError(f"cannot read the image header ({exc})") from None


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # broken EXIF: the pixels are fine, serve them unrotated
        return image


def _sixteen_bit_to_rgb(image: Image.Image, full_scale: float | None = None) -> Image.Image:
    values = np.asarray(image, dtype=np.float32)
    # 16-bit sources span 0..65535; a 32-bit "I" image holding 8-bit data keeps its scale.
    if full_scale is None:
        full_scale = 65535.0 if image.mode in _SIXTEEN_BIT_MODES or values.max(initial=0) > 255 else 255.0
    scaled = np.clip(values * (255.0 / full_scale), 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled).convert("RGB")  # 2-D uint8 → mode L
