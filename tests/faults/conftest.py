"""Fixtures of the fault tests: services started as processes are never left running."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.faultkit import kill_leftovers
from tests.integration.test_signals import Server


@pytest.fixture
def services() -> Iterator[list[Server]]:
    """Services a test starts; whatever of them still runs when it ends (it failed) gets SIGKILL."""
    started: list[Server] = []
    yield started
    kill_leftovers(started)
