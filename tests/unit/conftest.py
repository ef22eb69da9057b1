"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest


class RecordingTransport:
    """The slice of LitServe's MessageTransport a worker's loop uses: `send(item, consumer_id)`."""

    def __init__(self) -> None:
        self.sent: list[tuple[object, int]] = []

    def send(self, item: object, consumer_id: int) -> None:
        self.sent.append((item, consumer_id))


@pytest.fixture
def transport() -> RecordingTransport:
    """A transport that keeps what a worker's loop sends to the API servers, in `.sent`."""
    return RecordingTransport()
