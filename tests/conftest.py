"""Shared fixtures: the real photos in tests/data, and real servers on 127.0.0.1."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from timmserve.bench.process import ServerProcess, free_port  # noqa: F401  (free_port: for tests)

DATA = Path(__file__).parent / "data"

# ImageNet-1k indices 281..285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
# Tests of queueing mechanics pin what they assume (the default is the fastest configuration the
# machine has): one worker, eager fp32, the slowest backend.
ONE_SLOW_WORKER = ("--workers-per-device", "1", "--backend", "eager", "--precision", "fp32")

CAT_LABELS = {"tabby, tabby cat", "tiger cat", "Persian cat", "Siamese cat, Siamese", "Egyptian cat"}


def slow_image(side: int) -> bytes:
    """A square lossless RGBA WebP: a 2 KB file whose decode takes time (about 1.5 s at 8000 here,
    Pillow's WebP decoder has no reduced-size decode)."""
    data = io.BytesIO()
    Image.new("RGBA", (side, side), (255, 255, 255, 128)).save(data, "WEBP", lossless=True)
    return data.getvalue()


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """name → JPEG bytes: cat, espresso, rocket, grace_hopper."""
    return {path.stem: path.read_bytes() for path in sorted(DATA.glob("*.jpg"))}


@pytest.fixture(scope="session")
def field_files() -> dict[str, bytes]:
    """file name → bytes: the field inputs in tests/data/field (tests/data/README.md says how each was made)."""
    return {path.name: path.read_bytes() for path in sorted((DATA / "field").iterdir())}


def _server_factory() -> tuple[Callable[..., ServerProcess], Callable[[], None]]:
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        server = ServerProcess(["--log-level", "warning", *args])  # args may override
        started.append(server)
        return server

    def stop_all() -> None:
        for server in started:
            server.stop()

    return start, stop_all


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    """Factory: start_server(*cli_args) → ServerProcess, stopped when the test ends (an idle server
    still costs CPU, and CI has two cores)."""
    start, stop_all = _server_factory()
    yield start
    stop_all()


@pytest.fixture(scope="module")
def start_module_server() -> Iterator[Callable[..., ServerProcess]]:
    """The same, for servers a whole module shares; stopped when the module ends."""
    start, stop_all = _server_factory()
    yield start
    stop_all()
