"""Which local folders callers may name: the setting, and the embedded loopback default."""

from __future__ import annotations

import tempfile
from pathlib import Path

from core.config import Settings


def test_roots_are_a_comma_separated_list() -> None:
    settings = Settings.from_env({"LORASERVE_ALLOWED_LOCAL_ROOTS": "/models, /srv/loras ,"})
    assert settings.local_roots == (Path("/models"), Path("/srv/loras"))
    assert Settings().local_roots == ()


def test_loopback_serve_allows_the_temp_folder_when_none_are_listed() -> None:
    assert Settings().with_embedded_local_roots().local_roots == (Path(tempfile.gettempdir()),)
    assert Settings(grpc_host="localhost", http_host="::1").with_embedded_local_roots().local_roots == (
        Path(tempfile.gettempdir()),
    )


def test_anything_reachable_from_elsewhere_gets_only_what_is_listed() -> None:
    for exposed in (Settings(grpc_host="0.0.0.0"), Settings(http_host="10.1.2.3"), Settings(grpc_host="images.internal")):
        assert exposed.with_embedded_local_roots().local_roots == ()
    listed = Settings(allowed_local_roots="/models")
    assert listed.with_embedded_local_roots().local_roots == (Path("/models"),)
