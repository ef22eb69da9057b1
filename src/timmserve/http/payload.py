"""What travels through `POST /predict`: bodies → ImageRequest (in the API server process), and
the Prediction rows that come back.

Three body forms are accepted (DESIGN.md, HTTP contract):
- `application/json`: `{"image": "<base64 of an image file>", "top_k": 5}` (top_k optional);
- `image/*` or `application/octet-stream`: the image file itself; `?top_k=` in the query;
- `multipart/form-data`: a file field `image`, and an optional field (or query) `top_k`.

Any body may come gzip- or deflate-compressed (`Content-Encoding`), as Triton's client sends it with
`request_compression_algorithm`; it is inflated here, and the size limit holds after inflating.
Base64, here and in the Open Inference Protocol's JSON, is read by one rule (`decode_base64`).

Only the encoded bytes travel on to the inference workers: base64 is undone here, and the image is
decoded there, where a bad one fails only its own request.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request

from timmserve.errors import (
    ClientGoneError,
    InvalidRequestError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnsupportedMediaError,
)
from timmserve.model.types import ImageRequest, Prediction
from timmserve.settings.config import ServeConfig

ACCEPTED_CONTENT_TYPES = "application/json, image/*, application/octet-stream or multipart/form-data"


def predictions_body(predictions: list[Prediction]) -> dict[str, Any]:
    """The 200 answer of `POST /predict`."""
    return {"predictions": [{"label": p.label, "probability": p.probability} for p in predictions]}


@dataclass(frozen=True)
class PayloadLimits:
    max_body_bytes: int  # as sent and once inflated
    num_classes: int  # top_k may not exceed it
    default_top_k: int
    max_images: int  # in one request: the most the server ever admits at once (--max-queue)
    body_timeout: float | None = None  # seconds in which a body must bring 500 B/s (_received); None: no limit

    @classmethod
    def of(cls, config: ServeConfig, num_classes: int) -> PayloadLimits:
        """The limits a server with this config applies to a model with `num_classes` classes."""
        return cls(config.max_body_bytes, num_classes, config.top_k, config.queue_limit(), config.client_timeout)


async def parse_predict_request(request: Request, limits: PayloadLimits) -> ImageRequest:
    """Read and check one /predict request; raises a RequestError subclass that names the problem."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        body = await read_body(request, limits)
        return _from_json(body, limits)
    if media_type.startswith("image/") or media_type == "application/octet-stream":
        body = await read_body(request, limits)
        return ImageRequest(_nonempty(body), check_top_k(request.query_params.get("top_k"), limits))
    if media_type == "multipart/form-data":
        body = await read_body(request, limits)
        return await _from_multipart(request, body, limits)
    shown = media_type or "none"
    raise UnsupportedMediaError(f"content type {shown!r} is not accepted; send {ACCEPTED_CONTENT_TYPES}")


async def read_body(request: Request, limits: PayloadLimits) -> bytes:
    """The whole body, inflated when it says `Content-Encoding: gzip` or `deflate`.

    Raises PayloadTooLargeError (413) as soon as the body, as sent or inflated, is known to exceed
    `limits.max_body_bytes`; UnsupportedMediaError (415) for another content coding;
    InvalidRequestError (400) for a compressed body that does not inflate; RequestTimeoutError
    (408) when a window of `limits.body_timeout` seconds brings none of it, or less than
    MIN_BODY_BYTES_PER_SECOND on average; ClientGoneError when the client disconnects first."""
    max_bytes = limits.max_body_bytes
    inflater = _inflater_for(request.headers.get("content-encoding", ""), max_bytes)
    declared = decimal_int(request.headers.get("content-length", ""))
    if declared is not None and declared > max_bytes:
        raise PayloadTooLargeError(f"the body is {declared:,} bytes; the limit is {max_bytes:,}")
    chunks, size = [], 0
    async for chunk in _received(request, limits.body_timeout):
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLargeError(f"the body is over the limit of {max_bytes:,} bytes")
        chunks.append(chunk if inflater is None else inflater.inflate(chunk))
    if inflater is not None:
        inflater.finish()
    return b"".join(chunks)


# In every `stall_timeout` seconds a body must bring at least this many bytes a second times those
# seconds (or end): Apache httpd's mod_reqtimeout default rate (body=20,MinRate=500), counted per
# window rather than over the whole body, so an early burst buys no stalling later. Without it a
# client sending a byte now and then held its connection, and its buffered body, for ever.
MIN_BODY_BYTES_PER_SECOND = 500


async def _received(request: Request, stall_timeout: float | None) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive; RequestTimeoutError when a window of `stall_timeout`
    seconds brings fewer than MIN_BODY_BYTES_PER_SECOND × `stall_timeout` bytes (none: a stall) and
    the body has not ended (a stalled or trickling client would otherwise hold its connection and
    buffered body for ever)."""
    stream = request.stream()
    window_start, window_bytes = time.monotonic(), 0
    while True:
        wait = None if stall_timeout is None else window_start + stall_timeout - time.monotonic()
        try:
            chunk = await asyncio.wait_for(anext(stream), wait)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            if window_bytes:
                raise RequestTimeoutError(
                    f"the body came slower than {MIN_BODY_BYTES_PER_SECOND} bytes/s over {stall_timeout:g} s"
                ) from None
            raise RequestTimeoutError(f"no byte of the body arrived for {stall_timeout:g} s") from None
        except ClientDisconnect:
            raise ClientGoneError("the client disconnected while sending its body") from None
        window_bytes += len(chunk)
        if stall_timeout is not None and window_bytes >= MIN_BODY_BYTES_PER_SECOND * stall_timeout:
            window_start, window_bytes = time.monotonic(), 0
        yield chunk


# Content-Encoding → zlib's window bits for it: gzip (RFC 1952) and deflate, which HTTP defines as the
# zlib format (RFC 1950).
_INFLATE_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _inflater_for(content_encoding: str, max_bytes: int) -> _Inflater | None:
    """The inflater a `Content-Encoding` header asks for; None for none (or identity). Raises
    UnsupportedMediaError (415) naming any other coding, or more than one."""
    coding = content_encoding.strip().lower()
    if coding in ("", "identity"):
        return None
    if coding not in _INFLATE_WBITS:
        raise UnsupportedMediaError(
            f"content encoding {content_encoding.strip()!r} is not accepted; send gzip, deflate or none"
        )
    return _Inflater(coding, max_bytes)


# Gzip members in one body: a client compresses its body as one; a few concatenated files are
# still fine. Each member costs a new decompressor: 20 MB of empty members (a million) took an API
# server's loop 4.4 s (the hostile-client pass).
MAX_GZIP_MEMBERS = 64


class _Inflater:
    """A compressed body, inflated as it streams in. Its output is bounded, not its input: a few
    kilobytes of gzip can inflate to gigabytes (a decompression bomb)."""

    def __init__(self, coding: str, max_bytes: int) -> None:
        self.coding = coding
        self.max_bytes = max_bytes
        self.size = 0  # bytes inflated so far
        self.members = 1
        self._stream = zlib.decompressobj(_INFLATE_WBITS[coding])

    def inflate(self, data: bytes) -> bytes:
        """The bytes `data` inflates to. Raises PayloadTooLargeError once the output passes
        max_bytes, InvalidRequestError when `data` is not of this coding."""
        pieces = []
        while data:
            if self._stream.eof:  # a gzip body may be several members, one after another (RFC 1952)
                if self.coding == "deflate":
                    raise InvalidRequestError("the deflate body has data after its end")
                self.members += 1
                if self.members > MAX_GZIP_MEMBERS:
                    raise InvalidRequestError(f"the gzip body has more than {MAX_GZIP_MEMBERS} members")
                self._stream = zlib.decompressobj(_INFLATE_WBITS[self.coding])
            try:
                piece = self._stream.decompress(data, self.max_bytes - self.size + 1)
            except zlib.error as exc:
                raise InvalidRequestError(f"the body is not valid {self.coding} data ({exc})") from None
            self.size += len(piece)
            if self.size > self.max_bytes:
                raise PayloadTooLargeError(f"the body inflates to over the limit of {self.max_bytes:,} bytes")
            pieces.append(piece)
            data = self._stream.unused_data if self._stream.eof else self._stream.unconsumed_tail
        return b"".join(pieces)

    def finish(self) -> None:
        """Raises InvalidRequestError when the compressed stream stopped before its end."""
        if not self._stream.eof:
            raise InvalidRequestError(f"the {self.coding} body is truncated")


def _from_json(body: bytes, limits: PayloadLimits) -> ImageRequest:
    if not body:
        raise InvalidRequestError('the body is empty; send {"image": "<base64 of an image file>"}')
    try:
        document = json.loads(body, parse_int=_json_integer)
    except (ValueError, RecursionError):
        raise InvalidRequestError("the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidRequestError('the JSON body must be an object: {"image": "<base64 of an image file>"}')
    if "image" not in document:
        raise InvalidRequestError('the JSON body has no "image" field (base64 of an image file)')
    encoded = document["image"]
    if not isinstance(encoded, str):
        raise InvalidRequestError(f'"image" must be a base64 string, not {_json_type(encoded)}')
    return ImageRequest(_nonempty(decode_base64(encoded, '"image"')), check_top_k(document.get("top_k"), limits))


async def _from_multipart(request: Request, body: bytes, limits: PayloadLimits) -> ImageRequest:
    async def replay_body() -> dict[str, Any]:  # the body was already read (with its size limit)
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay_body).form(max_files=1, max_fields=10)
    except Exception as exc:  # python-multipart's parse errors, starlette's limit errors (an HTTPException)
        raise InvalidRequestError(f"the multipart body cannot be parsed ({getattr(exc, 'detail', exc)})") from None
    try:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise InvalidRequestError('the multipart body has no file field "image"')
        data = await upload.read()
        top_k = form.get("top_k", request.query_params.get("top_k"))
        return ImageRequest(_nonempty(data), check_top_k(top_k if isinstance(top_k, str) else None, limits))
    finally:
        await form.close()


_BASE64_ALPHABETS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_="  # standard and URL-safe
_BASE64_WHITESPACE = b" \t\r\n"  # line-wrapped base64: `base64` without -w0, base64.encodebytes, MIME
_URL_SAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


def decode_base64(text: str, what: str) -> bytes:
    """The bytes `text` encodes in base64, read by one rule wherever base64 comes in (`/predict`'s
    "image", the Open Inference Protocol's BYTES in JSON). Accepted, as nothing else could be
    meant: a `data:…;base64,` URI prefix (as browsers make), line breaks and spaces, the URL-safe
    alphabet (`-_`), missing `=` padding. Raises InvalidRequestError naming `what` and the cause:
    the first character outside base64 and its position in `text`, misplaced padding, or a length
    no bytes encode."""
    start = _data_uri_payload_start(text, what)
    try:
        raw = text[start:].encode("ascii")
    except UnicodeEncodeError as exc:
        position = start + exc.start
        raise _not_base64(what, f"invalid character {text[position]!r} at position {position}") from None
    invalid = raw.translate(None, _BASE64_ALPHABETS + _BASE64_WHITESPACE)
    if invalid:
        position = start + raw.index(invalid[:1])
        raise _not_base64(what, f"invalid character {text[position]!r} at position {position}")
    digits = raw.translate(_URL_SAFE_TO_STANDARD, _BASE64_WHITESPACE).rstrip(b"=")
    if b"=" in digits:
        raise _not_base64(what, f"padding '=' at position {start + raw.index(b'=')} comes before the end")
    if len(digits) % 4 == 1:  # 6 bits over: a truncated or corrupted text, not a missing '='
        raise _not_base64(what, f"{len(digits):,} base64 characters do not make whole bytes (cut short?)")
    return binascii.a2b_base64(digits + b"=" * (-len(digits) % 4))


def _data_uri_payload_start(text: str, what: str) -> int:
    """Where the base64 starts in `text`: after a `data:[<media type>];base64,` prefix, else 0."""
    if not text.startswith("data:"):
        return 0
    comma = text.find(",")
    if comma < 0 or not text[:comma].lower().endswith(";base64"):
        raise _not_base64(what, 'a data: URI must say ";base64," before its data')
    return comma + 1


def _not_base64(what: str, cause: str) -> InvalidRequestError:
    return InvalidRequestError(f"{what} is not valid base64: {cause}")


def _nonempty(data: bytes) -> bytes:
    if not data:
        raise InvalidRequestError("the image is empty (0 bytes)")
    return data


def check_top_k(value: Any, limits: PayloadLimits) -> int:
    """top_k from JSON (an int) or a query or form field (a str); absent means the server's
    default. Raises InvalidRequestError (400) naming top_k for anything but an integer from 1 to
    the number of classes."""
    if value is None:
        return min(limits.default_top_k, limits.num_classes)
    number = decimal_int(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= limits.num_classes:
        raise InvalidRequestError(f"top_k must be an integer from 1 to {limits.num_classes}, got {_shown(value)}")
    return number


def decimal_int(text: str) -> int | None:
    """The non-negative integer `text` writes in decimal (surrounding whitespace, a leading '+' and
    leading zeros allowed), or None when it is anything else or has over 18 significant digits
    (more than any limit here, and far below Python's 4,300-digit int-string limit: a ValueError)."""
    digits = text.strip().removeprefix("+")
    # ASCII only: str.isdigit() also says yes to '²', which int() refuses, and to '٣', which it reads.
    if not (digits.isascii() and digits.isdigit()):
        return None
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= 18 else None


def _json_integer(text: str) -> int | float:
    """json's reading of an integer: one over Python's 4,300-digit int-string limit becomes ±inf
    (out of every range here, and named by the check of its field) instead of a ValueError."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _shown(value: Any, limit: int = 40) -> str:
    """`repr(value)`, cut to `limit` characters: a detail echoes what was sent, not 5,000 digits of it."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def _json_type(value: Any) -> str:
    names = {
        dict: "an object",
        list: "an array",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
    }
    return names.get(type(value), "null")  # what json.loads makes: these types and None
