"""Limits on a request's head (request line and headers), where uvicorn keeps none: the LitServe
engine's API servers speak HTTP/1.1 through `LimitedHttpProtocol`, uvicorn's httptools protocol
with the bounds nginx keeps too.

Without them a client that never finishes its headers holds its connection for ever, and one
128 MiB header value costs an API server seconds of CPU (httptools joins a value's pieces one by
one) while every other request on it waits. Here:

- the head may be at most MAX_HEADER_BYTES long and carry MAX_HEADERS fields: else 431; so may
  what a chunked body carries between two of its data bytes (chunk-size lines, extensions, trailer
  fields, which uvicorn adds to the request's headers without a bound);
- it must arrive within `client_timeout` seconds, counted from the connection's start for its first
  request and from the first byte of each later one: else 408. A connection that sends nothing
  in that time is closed without an answer, as uvicorn closes an idle kept-alive one.

Each answer is `{"detail": …}` with `Connection: close`, and the connection closes: the rest of what
the client sent cannot be told apart from a next request. A body that stalls is payload.read_body's
to answer (408, through the app), the application having started by then.

A request with a body that asks to upgrade to another protocol (`curl --http2` sends `Upgrade: h2c`
on http:// URLs) is refused (400, naming the fix): httptools stops parsing at the upgrade, so
uvicorn handed the application an empty body and took the body's bytes for a next request. Without
a body the upgrade is ignored (RFC 9110, 7.8); the server runs with `ws="none"`, so no request
leaves HTTP/1.1 (and these bounds) for uvicorn's WebSocket protocol.

A request target in absolute form with an empty path (`GET http://host:8000 HTTP/1.1`, or
`http://host:8000?x=1`) means the path "/" (RFC 9112, 3.2.2): it is served as "/" (uvicorn read
the target's path, found none, and answered its plain-text 400); one with a path is served at that
path, as uvicorn does.

One more thing uvicorn leaves out: when a client closes a connection, uvicorn tells only its
newest request. A client that pipelines a second request behind the first and leaves would keep
the first one waiting for an answer nobody reads (its admission slot held, its images classified);
here every request of the connection that is not answered yet is told (`http.disconnect`).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

MAX_HEADER_BYTES = 32 * 1024  # nginx's default: 4 buffers of 8 KiB
MAX_HEADERS = 100  # Apache's default (LimitRequestFields)


class _HeadRefused(Exception):
    """Raised in a parser callback to stop parsing a request that was answered already."""


def announces_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request's head (lower-case names, as httptools and ASGI give them) says a body
    follows it (RFC 9112, 6.3)."""
    return any(
        (name == b"content-length" and value.strip() != b"0") or name == b"transfer-encoding" for name, value in headers
    )


def with_root_path(target: bytes) -> bytes:
    """The request target with the path "/" where it is in absolute form with an empty path
    (`http://host:port`, `http://host:port?x=1`: RFC 9112, 3.2.2); any other target as it is."""
    if target.startswith(b"/"):  # origin form, nearly every request
        return target
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        return target  # uvicorn answers it as before
    if url.schema is None or url.path is not None:
        return target
    end = min((at for at in (target.find(b"?"), target.find(b"#")) if at >= 0), default=len(target))
    return target[:end] + b"/" + target[end:]


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits on each request's head (see the module doc)."""

    client_timeout: float  # seconds, given by `limited_protocol` (--client-timeout)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._receiving_head = False  # between a request's first byte and the end of its headers
        self._head_bytes = 0  # read while the head was incomplete, the read that began it not counted
        self._head_timer: asyncio.TimerHandle | None = None
        self._cycles: list[RequestResponseCycle] = []  # this connection's requests, answered ones dropped
        self._in_body = False  # between a request's end of headers and its end
        self._bytes_without_body = 0  # read in the body since its last body byte: framing, trailers

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.client_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        for cycle in self._cycles:  # uvicorn marks the newest only (`self.cycle`)
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._receiving_head:
            self._head_bytes += len(data)
        if self._in_body:
            self._bytes_without_body += len(data)  # back to 0 at the next body byte (on_body)
        super().data_received(data)
        # httptools reports a header only once it is whole: a head still incomplete after this
        # many bytes is refused here, before the parser is fed more of it.
        if self._receiving_head and self._head_bytes > MAX_HEADER_BYTES:
            self._refuse(431, f"the request line and headers are over the limit of {MAX_HEADER_BYTES:,} bytes")
        # The same bound for what a chunked body carries besides its data: chunk-size lines, their
        # extensions, trailer fields (parsed like headers: uvicorn kept every one).
        elif self._in_body and self._bytes_without_body > MAX_HEADER_BYTES:
            self._refuse(
                431, f"the chunked body's framing and trailers are over the limit of {MAX_HEADER_BYTES:,} bytes"
            )

    def on_body(self, body: bytes) -> None:
        self._bytes_without_body = 0
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._receiving_head = True
        self._head_bytes = 0
        if self._head_timer is None:  # a later request on a kept-alive connection
            self._head_timer = self.loop.call_later(self.client_timeout, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._receiving_head = False
        self._stop_head_timer()
        size = len(self.url) + sum(len(name) + len(value) for name, value in self.headers)
        upgrade = self._upgrade_asked()
        if len(self.headers) > MAX_HEADERS:
            self._refuse(431, f"the request has {len(self.headers):,} header fields; the limit is {MAX_HEADERS}")
        elif size > MAX_HEADER_BYTES:
            self._refuse(431, f"the request line and headers are {size:,} bytes; the limit is {MAX_HEADER_BYTES:,}")
        elif upgrade is not None and announces_body(self.headers):
            self._refuse(
                400,
                f"the request asks to switch to {upgrade.decode('latin-1')[:40]!r}, which this HTTP/1.1 server "
                "does not speak, and its body would be lost: send it without Upgrade (curl: --http1.1)",
            )
        else:
            self.url = with_root_path(self.url)
            super().on_headers_complete()  # starts the application, or queues it behind the one running
            self._in_body, self._bytes_without_body = True, 0
            self._cycles = [cycle for cycle in self._cycles if not cycle.response_complete]
            if self.cycle is not None and self.cycle not in self._cycles:  # none for an upgrade
                self._cycles.append(self.cycle)
            return
        # The parser stops: no application, nothing after the head read. uvicorn takes this for a
        # parse error: it logs "Invalid HTTP request received." and its 400 goes nowhere (closed).
        raise _HeadRefused

    def _upgrade_asked(self) -> bytes | None:
        """The protocol the request asks to switch to, as llhttp sees it: an `upgrade` token in any
        `Connection` line (uvicorn's `_get_upgrade` reads the last line only) and an `Upgrade` field."""
        connection = b",".join(value for name, value in self.headers if name == b"connection")
        upgrade = [value for name, value in self.headers if name == b"upgrade"]
        asked = b"upgrade" in (token.strip().lower() for token in connection.split(b","))
        return upgrade[-1] if asked and upgrade else None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._receiving_head:
            self._refuse(408, f"the request headers did not arrive within {self.client_timeout:g} s")
        else:
            self.transport.close()  # the connection sent nothing: there is no request to answer

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, detail: str) -> None:
        """Answer `status` with `detail`, then close the connection (only close it when the
        application has begun its own answer)."""
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete:
            self.logger.warning("closed the connection: %s", detail)
            self.transport.close()
            return
        self._stop_head_timer()
        self.logger.warning("answered %d and closed the connection: %s", status, detail)
        body = json.dumps({"detail": detail}).encode()
        headers = [
            *self.server_state.default_headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"x-request-id", uuid.uuid4().hex.encode()),  # every response carries one (DESIGN.md)
        ]
        head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        self.transport.write(STATUS_LINE[status] + head + b"\r\n" + body)
        self.transport.close()


def limited_protocol(client_timeout: float) -> type[LimitedHttpProtocol]:
    """uvicorn's `http=` argument: LimitedHttpProtocol with `client_timeout` (seconds)."""
    return type(LimitedHttpProtocol.__name__, (LimitedHttpProtocol,), {"client_timeout": client_timeout})
