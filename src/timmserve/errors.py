"""timmserve's exceptions, in one small tree.

    TimmServeError                  anything timmserve raises on purpose
    ├── ConfigError                 a setting is invalid (CLI: one line, exit 1)
    ├── ModelLoadError              the model, its weights or its labels cannot be loaded
    ├── ClientError                 the client got no answer, or a non-200 answer, from a server
    └── RequestError                one request gets no answer; carries the HTTP status it maps to
        ├── InvalidRequestError     400: malformed body, missing field, bad top_k
        ├── InvalidImageError       400: the bytes are not a decodable image
        ├── UnauthorizedError       401: the API key is missing or wrong
        ├── PayloadTooLargeError    413: body or pixel count over the limit
        ├── RequestTimeoutError     408: the client stopped sending its body (the connection is closed)
        ├── UnknownModelError       404: no model of that name (Open Inference Protocol URLs)
        ├── UnsupportedMediaError   415: content type or image format not accepted
        ├── UnavailableError        503, with Retry-After
        │   ├── OverloadedError     the queue is at its limit
        │   └── WorkerLostError     the worker with the request died (it is being replaced)
        ├── AnswerTimeoutError      504: no answer within the request timeout
        ├── ClientGoneError         499: the client disconnected before its answer (never sent)
        └── InternalError           500: a bug, logged with its traceback and request id

A RequestError raised while handling one item of a batch is returned as a value for that item,
never raised across the batch, so one bad image costs only its own request.
"""

from __future__ import annotations

import copy


class TimmServeError(Exception):
    """Base class for every error timmserve raises on purpose."""


class ConfigError(TimmServeError):
    """A setting is invalid or settings contradict each other."""


class ModelLoadError(TimmServeError):
    """The model, its weights or its labels cannot be loaded."""


class ClientError(TimmServeError):
    """A request to a timmserve server failed; `status_code` is None when no answer came."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class RequestError(TimmServeError):
    """One request gets no answer: it is bad, or the server cannot serve it now. `detail` says why,
    in words meant for the client; `headers` go on the error response."""

    status_code = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers: dict[str, str] = {}

    def with_detail(self, detail: str) -> RequestError:
        """The same error (status, headers) with another detail, e.g. naming the image it is about."""
        other = copy.copy(self)
        other.detail = detail
        other.args = (detail,)
        return other


class InvalidRequestError(RequestError):
    status_code = 400


class UnauthorizedError(RequestError):
    status_code = 401


class InvalidImageError(RequestError):
    status_code = 400


class PayloadTooLargeError(RequestError):
    status_code = 413

    @classmethod
    def too_many_images(cls, count: int, limit: int) -> PayloadTooLargeError:
        """The answer to a request with more images than the server admits at once (`--max-queue`)."""
        return cls(
            f"the request has {count} images; this server admits at most {limit} at once (--max-queue): split it"
        )


class RequestTimeoutError(RequestError):
    """408: the client took too long sending its request (the connection is closed after the
    answer, as after any answer given before the body was read: middleware.CloseUnreadBody)."""

    status_code = 408


class UnknownModelError(RequestError):
    status_code = 404


class UnsupportedMediaError(RequestError):
    status_code = 415


class UnavailableError(RequestError):
    """503: the server cannot take this request now; Retry-After says when to try again."""

    status_code = 503

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail)
        self.headers["Retry-After"] = str(retry_after)


class OverloadedError(UnavailableError):
    pass


class WorkerLostError(UnavailableError):
    pass


class AnswerTimeoutError(RequestError):
    status_code = 504

    @classmethod
    def after(cls, timeout: float) -> AnswerTimeoutError:
        """The answer when the server's request timeout (`--timeout`, seconds) ran out."""
        return cls(f"no answer within the server's request timeout of {timeout:g} s")


class ClientGoneError(RequestError):
    status_code = 499  # nginx's "client closed request": only ever seen in logs and metrics


class InternalError(RequestError):
    """500: the server failed, not the request; the log has the traceback under the request id."""

    status_code = 500
