"""core.config.Settings: env vars, CLI flags over them, typed parsing, derived values."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from core import config
from loraserve.cli import build_parser
from core.config import Settings

# (env var, raw value, attribute, parsed value, type)
ENV_CASES: list[tuple[str, str, str, Any, type]] = [
    ("LORASERVE_GRPC_PORT", "6000", "grpc_port", 6000, int),
    ("LORASERVE_MAX_REPLICAS", " 4 ", "max_replicas", 4, int),
    ("LORASERVE_REPLICA_NUM_GPUS", "0.5", "replica_num_gpus", 0.5, float),
    ("LORASERVE_REPLICA_NUM_CPUS", "2", "replica_num_cpus", 2.0, float),
    ("LORASERVE_DOWNSCALE_DELAY_SECONDS", "1e2", "downscale_delay_seconds", 100.0, float),
    ("LORASERVE_DATA_DIR", "/srv/loraserve", "data_dir", Path("/srv/loraserve"), Path),
    ("LORASERVE_DATA_DIR", "relative/dir", "data_dir", Path("relative/dir"), Path),
    ("LORASERVE_LOG_LEVEL", "DEBUG", "log_level", "DEBUG", str),
    ("LORASERVE_PUBLIC_URL", "https://cdn.example.com/", "public_url", "https://cdn.example.com/", str),
]


@pytest.mark.parametrize(("var", "raw", "attr", "value", "kind"), ENV_CASES, ids=[f"{c[0]}={c[1]!r}" for c in ENV_CASES])
def test_env_var_is_parsed_with_the_settings_type(var: str, raw: str, attr: str, value: Any, kind: type) -> None:
    settings = Settings.from_env({var: raw})
    assert getattr(settings, attr) == value
    assert isinstance(getattr(settings, attr), kind)
    if kind is float:
        assert type(getattr(settings, attr)) is float


def test_unset_empty_and_foreign_env_vars_keep_defaults() -> None:
    env = {"LORASERVE_GRPC_PORT": "", "GRPC_PORT": "1", "loraserve_http_port": "2", "LORASERVE_NOT_A_SETTING": "x"}
    assert Settings.from_env(env) == Settings()
    assert Settings.from_env({}) == Settings()


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASERVE_HTTP_PORT", "9999")
    monkeypatch.setenv("LORASERVE_DEVICE", "cpu")
    settings = Settings.from_env()
    assert (settings.http_port, settings.device) == (9999, "cpu")


def test_overrides_beat_env_and_none_overrides_are_ignored() -> None:
    env = {"LORASERVE_GRPC_PORT": "6000", "LORASERVE_HTTP_PORT": "6001"}
    settings = Settings.from_env(env, grpc_port=7000, http_port=None)
    assert (settings.grpc_port, settings.http_port) == (7000, 6001)


# (env var, bad raw value, setting name, flag, type name in the message)
BAD_ENV: list[tuple[str, str, str, str, str]] = [
    ("LORASERVE_GRPC_PORT", "abc", "grpc_port", "--grpc-port", "int"),
    ("LORASERVE_MAX_ATTEMPTS", "2.5", "max_attempts", "--max-attempts", "int"),
    ("LORASERVE_REPLICA_NUM_GPUS", "half", "replica_num_gpus", "--replica-num-gpus", "float"),
    ("LORASERVE_SHUTDOWN_GRACE_SECONDS", "30s", "shutdown_grace_seconds", "--shutdown-grace-seconds", "float"),
]


@pytest.mark.parametrize(("var", "raw", "name", "flag", "kind"), BAD_ENV, ids=[c[0] for c in BAD_ENV])
def test_bad_env_value_names_setting_and_env_var(var: str, raw: str, name: str, flag: str, kind: str) -> None:
    with pytest.raises(ValueError) as caught:
        Settings.from_env({var: raw})
    message = str(caught.value)
    assert f"`{name}`" in message
    assert var in message
    assert flag in message
    assert f"must be a {kind}" in message
    assert repr(raw) in message


@dataclasses.dataclass(frozen=True)
class _WithBool:
    enabled: bool = False


@pytest.mark.parametrize(
    ("raw", "value"),
    [("1", True), ("true", True), ("YES", True), ("On", True), ("0", False), ("false", False), ("No", False), ("OFF", False)],
)
def test_bool_values(raw: str, value: bool) -> None:
    (field,) = dataclasses.fields(_WithBool)
    assert config.parse_value(field, raw) is value


@pytest.mark.parametrize("raw", ["", "2", "y", "enabled", "truthy"])
def test_bad_bool_value(raw: str) -> None:
    (field,) = dataclasses.fields(_WithBool)
    with pytest.raises(ValueError, match=r"setting `enabled` \(LORASERVE_ENABLED / --enabled\) must be a bool"):
        config.parse_value(field, raw)


def settings_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    return parser


def test_cli_flags_override_env() -> None:
    args = settings_parser().parse_args(["--grpc-port", "7000", "--replica-num-gpus", "1", "--data-dir", "/flag"])
    env = {"LORASERVE_GRPC_PORT": "6000", "LORASERVE_HTTP_PORT": "6001", "LORASERVE_DATA_DIR": "/env"}
    settings = Settings.from_args(args, env)
    assert settings.grpc_port == 7000
    assert settings.http_port == 6001, "flags left out fall back to env"
    assert settings.replica_num_gpus == 1.0 and isinstance(settings.replica_num_gpus, float)
    assert settings.data_dir == Path("/flag")
    assert settings.max_replicas == Settings().max_replicas, "and then to the default"


def test_every_setting_has_a_flag() -> None:
    parser = settings_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    for field in dataclasses.fields(Settings):
        assert "--" + field.name.replace("_", "-") in flags


def test_bad_flag_value_raises_naming_the_flag() -> None:
    args = settings_parser().parse_args(["--max-replicas", "many"])
    with pytest.raises(ValueError, match=r"`max_replicas` \(LORASERVE_MAX_REPLICAS / --max-replicas\) must be a int"):
        Settings.from_args(args, {})


def test_serve_subcommand_builds_settings() -> None:
    args = build_parser().parse_args(["serve", "--http-port", "8181", "--device", "cpu"])
    settings = Settings.from_args(args, {"LORASERVE_HTTP_PORT": "1", "LORASERVE_GRPC_PORT": "50052"})
    assert (settings.http_port, settings.device, settings.grpc_port) == (8181, "cpu", 50052)


@pytest.mark.parametrize(
    ("changes", "url"),
    [
        ({}, "http://127.0.0.1:8080"),
        ({"http_host": "0.0.0.0", "http_port": 9000}, "http://0.0.0.0:9000"),
        ({"public_url": "https://cdn.example.com"}, "https://cdn.example.com"),
        ({"public_url": "https://cdn.example.com/loraserve//"}, "https://cdn.example.com/loraserve"),
        ({"public_url": "/", "http_port": 81}, "http://127.0.0.1:81"),
    ],
)
def test_files_base_url(changes: dict[str, Any], url: str) -> None:
    assert Settings(**changes).files_base_url == url


@pytest.mark.parametrize(
    ("changes", "capacity"),
    [
        ({}, 1),
        ({"max_replicas": 4, "max_ongoing_requests_per_replica": 3}, 12),
        ({"max_replicas": 4, "max_ongoing_requests_per_replica": 3, "max_in_flight": 5}, 5),
        ({"max_in_flight": 1, "max_replicas": 8}, 1),
    ],
)
def test_dispatch_capacity(changes: dict[str, Any], capacity: int) -> None:
    assert Settings(**changes).dispatch_capacity == capacity


def test_paths_derive_from_data_dir() -> None:
    settings = Settings(data_dir=Path("/srv/ls"))
    assert settings.store_path == Path("/srv/ls/requests.sqlite3")
    assert settings.files_dir == Path("/srv/ls/files")
    assert settings.weights_dir == Path("/srv/ls/weights")


def test_settings_are_frozen_and_replace_returns_a_copy() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.grpc_port = 1  # type: ignore[misc]
    changed = settings.replace(grpc_port=1)
    assert (settings.grpc_port, changed.grpc_port) == (50051, 1)
