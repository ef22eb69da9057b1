"""http_protocol.py in a real uvicorn on 127.0.0.1, spoken to through raw sockets: the bounds on a
request's head (size, field count, time to arrive), each wait bounded."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tests.conftest import free_port
from timmserve.http.protocol import MAX_HEADER_BYTES, MAX_HEADERS, limited_protocol, with_root_path

TIMEOUT = 1.0  # the server's client_timeout, in seconds
SLACK = 2.0  # how much later than due an answer may come on a busy machine


async def ok(request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def body_length(request) -> PlainTextResponse:
    return PlainTextResponse(str(len(await request.body())))


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    port = free_port()
    app = Starlette(routes=[Route("/", ok), Route("/body", body_length, methods=["POST"])])
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", http=limited_protocol(TIMEOUT))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def read_until_closed(sock: socket.socket, wait: float) -> tuple[bytes, float | None]:
    """What the server sends within `wait` seconds, and how long until it closed (None: still open)."""
    started, received = time.monotonic(), b""
    while (left := started + wait - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:  # closed with bytes of ours unread: what came before still counts
            return received, time.monotonic() - started
        if not data:
            return received, time.monotonic() - started
        received += data
    return received, None


def exchange(port: int, data: bytes, wait: float = TIMEOUT + SLACK) -> tuple[bytes, float | None]:
    """Send `data` on a new connection, then `read_until_closed`."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        try:
            sock.sendall(data)
        except OSError:  # the server closed while we were still sending (a head over the limit)
            pass
        return read_until_closed(sock, wait)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def refusal(response: bytes) -> tuple[int, str]:
    """The status and `detail` of a refusal, checked to close the connection and carry a request id."""
    head, _, body = response.partition(b"\r\n\r\n")
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    assert headers[b"connection"] == b"close" and headers[b"content-type"] == b"application/json"
    assert len(headers[b"x-request-id"]) == 32
    return status_of(response), json.loads(body)["detail"]


def request_head(*headers: tuple[str, str], path: str = "/") -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: x", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_headers_that_stall_get_a_408_and_the_connection_closes(port):
    response, closed_after = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n")  # no blank line: unfinished
    assert closed_after is not None and TIMEOUT * 0.9 <= closed_after <= TIMEOUT + SLACK
    assert refusal(response) == (408, f"the request headers did not arrive within {TIMEOUT:g} s")


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(port):
    response, closed_after = exchange(port, b"")
    assert closed_after is not None and TIMEOUT * 0.9 <= closed_after <= TIMEOUT + SLACK
    assert response == b""


def test_each_later_request_on_a_kept_alive_connection_is_timed_from_its_first_byte(port):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request_head())
        sock.settimeout(TIMEOUT + SLACK)
        assert status_of(sock.recv(65536)) == 200
        time.sleep(TIMEOUT * 0.7)  # idle, within uvicorn's keep-alive (5 s)
        sock.sendall(b"GET / HTTP/1.1\r\n")
        response, closed_after = read_until_closed(sock, TIMEOUT + SLACK)
    assert closed_after is not None and closed_after >= TIMEOUT * 0.9
    assert refusal(response)[0] == 408


def test_a_head_sent_slowly_within_the_timeout_is_served(port):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for piece in (b"GET / HTTP/1.1\r\n", b"Host: x\r\n", b"X-Slow: yes\r\n", b"\r\n"):
            sock.sendall(piece)
            time.sleep(TIMEOUT / 5)
        sock.settimeout(TIMEOUT + SLACK)
        assert status_of(sock.recv(65536)) == 200


def test_header_fields_over_the_count_limit_get_a_431(port):
    fields = [(f"X-Field-{i}", "1") for i in range(MAX_HEADERS - 1)]  # and Host: the limit exactly
    assert status_of(exchange(port, request_head(*fields))[0]) == 200
    response, closed_after = exchange(port, request_head(*fields, ("X-One-More", "1")))
    assert closed_after is not None
    assert refusal(response) == (431, f"the request has {MAX_HEADERS + 1} header fields; the limit is {MAX_HEADERS}")


def test_a_head_over_the_size_limit_gets_a_431(port):
    # Counted: the URL ("/"), and each header's name and value ("host" "x", "x-big" and the value).
    value_at_limit = "v" * (MAX_HEADER_BYTES - len("/") - len("host") - len("x") - len("x-big"))
    assert status_of(exchange(port, request_head(("X-Big", value_at_limit)))[0]) == 200
    response, _ = exchange(port, request_head(("X-Big", value_at_limit + "v")))
    assert refusal(response) == (
        431,
        f"the request line and headers are {MAX_HEADER_BYTES + 1:,} bytes; the limit is {MAX_HEADER_BYTES:,}",
    )


def test_a_huge_header_value_is_refused_before_it_ends(port):
    """A 16 MiB value, sent in pieces: refused while it still streams in, not parsed to its end."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Huge: ")
        try:
            for _ in range(64):
                sock.sendall(b"v" * 256 * 1024)
        except OSError:  # the server answered and closed: it stopped reading
            pass
        response, closed_after = read_until_closed(sock, SLACK)
    assert closed_after is not None
    assert refusal(response) == (431, f"the request line and headers are over the limit of {MAX_HEADER_BYTES:,} bytes")


@pytest.mark.parametrize(
    ("fields", "protocol"),
    [
        (
            (
                ("Connection", "Upgrade, HTTP2-Settings"),
                ("Upgrade", "h2c"),
                ("HTTP2-Settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
            ),
            "h2c",
        ),
        # Found by the second hostile pass: Connection in two lines (uvicorn reads the last only), and
        # a WebSocket upgrade with a body, which uvicorn's WebSocket protocol then held for ever.
        ((("Connection", "Upgrade"), ("Connection", "keep-alive"), ("Upgrade", "h2c")), "h2c"),
        ((("Connection", "Upgrade"), ("Upgrade", "websocket")), "websocket"),
    ],
)
def test_a_body_that_asks_to_upgrade_is_refused_naming_the_fix(port, fields, protocol):
    # Found by the hostile-client pass: `curl --http2` on http:// sends Upgrade: h2c; httptools stops
    # at the upgrade, and the application got an empty body ("the image is empty").
    head = request_head(*fields, ("Content-Length", "5")).replace(b"GET", b"POST", 1)
    response, closed_after = exchange(port, head + b"hello", SLACK)
    assert closed_after is not None
    status, detail = refusal(response)
    assert status == 400 and detail.startswith(f"the request asks to switch to {protocol!r}") and "--http1.1" in detail
    if protocol == "h2c":
        assert status_of(exchange(port, request_head(*fields), SLACK)[0]) == 200  # no body: the upgrade is ignored


CHUNKED_HEAD = b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "flood",
    [
        b"X:a\r\n" * 52_000,  # many small trailer fields: uvicorn kept every one (GBs in seconds)
        b"X-Big: " + b"a" * 8 * 2**20,  # one huge trailer value: httptools joins its pieces, quadratic
        b";" + b"e" * 8 * 2**20,  # a chunk extension that never ends
    ],
)
def test_a_chunked_body_cannot_carry_more_than_a_head_besides_its_data(port, flood):
    # Found by the second hostile pass: trailers came after the head's bounds applied.
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(CHUNKED_HEAD + b"1\r\nA\r\n" + (b"1" if flood.startswith(b";") else b"0\r\n"))
        try:
            for start in range(0, len(flood), 2**16):
                sock.sendall(flood[start : start + 2**16])
        except OSError:  # the server answered and closed: it stopped reading
            pass
        response, closed_after = read_until_closed(sock, SLACK)
    assert closed_after is not None
    assert refusal(response)[0] == 431


def test_a_chunked_body_with_small_trailers_is_served(port):
    trailers = b"".join(b"X-T%d: v\r\n" % i for i in range(20))
    response, _ = exchange(port, CHUNKED_HEAD + b"3\r\nabc\r\n2\r\nde\r\n0\r\n" + trailers + b"\r\n", SLACK)
    assert status_of(response) == 200 and response.endswith(b"\r\n\r\n5")


@pytest.mark.parametrize(
    ("target", "served"),
    [
        (b"http://127.0.0.1:8000", b"http://127.0.0.1:8000/"),
        (b"http://127.0.0.1:8000?x=1", b"http://127.0.0.1:8000/?x=1"),
        (b"http://user@host?x=1", b"http://user@host/?x=1"),
        (b"http://127.0.0.1:8000/", b"http://127.0.0.1:8000/"),
        (b"http://host/health?x=1", b"http://host/health?x=1"),
        (b"/health?x=1", b"/health?x=1"),
        (b"*", b"*"),
    ],
)
def test_an_absolute_form_target_with_an_empty_path_means_the_root(target, served):
    assert with_root_path(target) == served


@pytest.mark.parametrize("query", ["", "?x=1"])
def test_an_absolute_form_request_with_an_empty_path_is_served_as_the_root(port, query):
    # RFC 9112, 3.2.2: was uvicorn's plain-text 400 "Invalid HTTP request received."
    head = f"GET http://127.0.0.1:{port}{query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    response, _ = exchange(port, head)
    assert status_of(response) == 200 and response.endswith(b"\r\n\r\nok"), response
