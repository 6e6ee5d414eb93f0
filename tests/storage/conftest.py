"""Real servers on loopback for the storage tests: a scriptable HTTP file server and moto's S3."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from storage_testkit import FileServer

from storage.fetch import FetchPolicy


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    server = FileServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def loopback_policy() -> FetchPolicy:
    """Private networks stay refused; only the test server's literal address is allowed."""
    return FetchPolicy(
        max_bytes=1_000_000,
        timeout_seconds=0.5,
        total_timeout_seconds=5.0,
        allowed_hosts=frozenset({"127.0.0.1"}),
        max_redirects=3,
        max_image_pixels=256 * 256,
    )

