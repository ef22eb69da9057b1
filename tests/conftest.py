"""Shared fixtures: the real photos in tests/data, and real servers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from timmserve.bench.process import ServerProcess, free_port  # noqa: F401  (free_port: for tests)

DATA = Path(__file__).parent / "data"

# ImageNet-1k indices 281..285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_LABELS = {"tabby, tabby cat", "tiger cat", "Persian cat", "Siamese cat, Siamese", "Egyptian cat"}


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """name → JPEG bytes: cat, espresso, rocket, grace_hopper."""
    return {path.stem: path.read_bytes() for path in sorted(DATA.glob("*.jpg"))}


@pytest.fixture(scope="session")
def start_server() -> Iterator:
    """Factory: start_server(*cli_args) → ServerProcess, all stopped at the end of the session."""
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        server = ServerProcess(["--log-level", "warning", *args])  # args may override
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
