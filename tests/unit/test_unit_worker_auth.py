"""core.worker_auth: the secret the gateway shows the workers."""

from __future__ import annotations

import asyncio

from core.config import Settings
from entrypoints.embedded import EmbeddedService
from core.worker_auth import METADATA_KEY, caller_secret, secret_matches, with_generated_secret


def test_a_secret_is_made_only_when_none_is_set() -> None:
    made = with_generated_secret(Settings())
    assert len(made.worker_shared_secret) >= 32
    assert with_generated_secret(Settings()).worker_shared_secret != made.worker_shared_secret
    assert with_generated_secret(Settings(worker_shared_secret="set")).worker_shared_secret == "set"


def test_the_embedded_service_gives_its_gateway_and_workers_one_secret(tmp_path: object) -> None:
    async def build() -> EmbeddedService:
        """Built on a loop, as the CLI does: the gateway's gRPC server belongs to one."""
        return EmbeddedService(Settings(data_dir=tmp_path))  # type: ignore[arg-type]

    service = asyncio.run(build())
    assert service.settings.worker_shared_secret
    assert service.gateway.settings.worker_shared_secret == service.settings.worker_shared_secret


def test_the_secret_is_read_from_the_calls_metadata() -> None:
    assert caller_secret([("application", "x"), (METADATA_KEY, "s")]) == "s"
    assert caller_secret([(METADATA_KEY.upper(), b"b")]) == "b"
    assert caller_secret([("application", "x")]) == ""


def test_only_the_same_secret_matches_and_an_unset_one_matches_all() -> None:
    assert secret_matches("abc", "abc")
    assert not secret_matches("abc", "")
    assert not secret_matches("abc", "abd")
    assert not secret_matches("abc", "abcd")
    assert secret_matches("", "anything")

