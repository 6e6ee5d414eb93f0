"""Settings declared once (core.config.setting) and what is made from the declarations: each command's
flags and help (core.settings_cli), --config files, secrets, the replica args and the docs' reference."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest

from core import config, settings_reference
from core.config import ENV_PREFIX, GROUPS, Reader, Settings, setting_infos
from core.settings_cli import COMMAND_READERS, add_settings_arguments, settings_from_args
from loraserve.cli import build_parser, main
from serving import serve_config
from tests.chart.sync_chart import COMMAND, SERVE_SETTINGS

INFOS = setting_infos()
SECRETS = sorted(name for name, info in INFOS.items() if info.secret)
UNITS_BY_SUFFIX = {"_seconds": "seconds", "_bytes": "bytes", "_port": "port", "_pixels": "pixels"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parser_for(readers: tuple[Reader, ...] = tuple(Reader)) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraserve-test")
    add_settings_arguments(parser, readers)
    return parser


def load(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    return settings_from_args(parser_for().parse_args(argv), env or {})


def help_of(capsys: pytest.CaptureFixture[str], *command: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_every_setting_declares_its_readers_group_and_description() -> None:
    for name, info in INFOS.items():
        assert info is not config._UNDECLARED, f"{name}: declare it with core.config.setting(...)"
        assert info.readers and info.group in GROUPS, name
        assert info.description and "\n" not in info.description and info.description.endswith("."), name
        for suffix, unit in UNITS_BY_SUFFIX.items():
            if name.endswith(suffix):
                assert info.unit == unit, f"{name}: unit {info.unit!r}, its name says {unit!r}"


def test_secret_looking_settings_are_declared_secret() -> None:
    looks_secret = {n for n in INFOS if re.search(r"(secret|password|token|access_key|_dsn$|store_url)", n)}
    assert looks_secret <= set(SECRETS), sorted(looks_secret - set(SECRETS))


def test_keys_create_help_is_short_and_describes_tenant(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of(capsys, "keys", "create")
    assert len(text.splitlines()) < 40, text
    assert re.search(r"--tenant TENANT\s+whose requests the key makes and sees", text), text
    assert "--data-dir" in text and "--store-url-file PATH" in text and "--config FILE" in text
    assert "--grpc-port" not in text and "--device" not in text


@pytest.mark.parametrize("command", list(COMMAND_READERS))
def test_each_commands_help_lists_the_settings_its_process_reads_in_sections(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_of(capsys, *(["keys", "list"] if command == "keys" else [command]))
    readers = set(COMMAND_READERS[command])
    for name, info in INFOS.items():
        shown = re.search(rf"{flag(name)}(?![\w-])", text) is not None
        assert shown == bool(info.readers & readers and not info.secret), (command, name)
        if info.secret and info.readers & readers and not config.reads_secret_file(name):
            assert flag(name) + "-file" in text, name
    sections = [g for g in GROUPS if f"\n{g.lower()} (each also {ENV_PREFIX}<NAME>):" in text]
    expected = [g for g in GROUPS if any(i.group == g and i.readers & readers for i in INFOS.values())]
    assert sections == expected
    positions = [text.index(f"\n{g.lower()} (") for g in sections]
    assert positions == sorted(positions)


def test_help_says_what_a_setting_is_its_env_var_default_and_unit(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(help_of(capsys, "gateway").split())
    assert (
        "--lease-seconds SECONDS A running request's lease: its gateway renews it every third of this; "
        in text
    )
    assert "[LORASERVE_LEASE_SECONDS; default 30.0; seconds]" in text


def test_a_command_refuses_a_setting_its_process_does_not_read(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["gateway", "--device", "cpu"])
    assert "unrecognized arguments: --device cpu" in capsys.readouterr().err


def test_booleans_are_flag_and_no_flag(capsys: pytest.CaptureFixture[str]) -> None:
    settings = load(["--allow-private-networks", "--no-s3-secure"], {"LORASERVE_ALLOW_PRIVATE_NETWORKS": "false"})
    assert (settings.allow_private_networks, settings.s3_secure) == (True, False)
    assert load(["--s3-secure"], {"LORASERVE_S3_SECURE": "false"}).s3_secure is True
    assert load([], {"LORASERVE_S3_SECURE": "no"}).s3_secure is False
    with pytest.raises(SystemExit):
        parser_for().parse_args(["--s3-secure", "false"])
    assert "--s3-secure, --no-s3-secure" in help_of(capsys, "serve")


@pytest.mark.parametrize("name", SECRETS)
def test_a_secret_flag_is_refused_saying_how_to_pass_it(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([flag(name), "hunter2"], [f"{flag(name)}=hunter2"]):
        with pytest.raises(SystemExit) as exited:
            parser_for().parse_args(argv)
        assert exited.value.code == 2
        error = capsys.readouterr().err
        assert f"`{name}` is a secret and is not taken as a flag" in error
        how = f"set {ENV_PREFIX}{name.upper()} in the environment, or name a file holding it: {flag(name)}-file PATH"
        assert how in error
        assert "hunter2" not in error
    # ... by every command, whether its process reads the secret or not.
    with pytest.raises(SystemExit):
        main(["keys", "list", flag(name), "hunter2"])
    assert f"`{name}` is a secret and is not taken as a flag" in capsys.readouterr().err


def test_a_secret_comes_from_its_env_var_or_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "s3-secret"
    secret.write_text("s3cret\n")
    assert load(["--s3-secret-key-file", str(secret)]).s3_secret_key == "s3cret"
    assert load([], {"LORASERVE_S3_SECRET_KEY_FILE": str(secret)}).s3_secret_key == "s3cret"
    assert load([], {"LORASERVE_S3_SECRET_KEY": "from-env"}).s3_secret_key == "from-env"
    with pytest.raises(ValueError, match="set one of LORASERVE_S3_SECRET_KEY and LORASERVE_S3_SECRET_KEY_FILE"):
        load([], {"LORASERVE_S3_SECRET_KEY": "a", "LORASERVE_S3_SECRET_KEY_FILE": str(secret)})
    with pytest.raises(ValueError, match=r"`s3_secret_key_file`: cannot read .*missing"):
        load(["--s3-secret-key-file", str(tmp_path / "missing")])
    # webhook_signing_key's file is a setting of its own, read by the gateway.
    assert load(["--webhook-signing-key-file", str(secret)]).webhook_signing_key_file == str(secret)


CONFIG_FILES = {
    "toml": 'grpc_port = 1\nhttp_port = 2\nmax_replicas = 3\nallow_private_networks = true\ndata_dir = "/from-file"\n'
    "replica_num_gpus = 1\n",
    "yaml": "grpc_port: 1\nhttp_port: 2\nmax_replicas: 3\nallow_private_networks: true\ndata_dir: /from-file\n"
    "replica_num_gpus: 1\n",
}


@pytest.mark.parametrize("suffix", ["toml", "yaml"])
def test_config_file_precedence_flags_then_env_then_file_then_defaults(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"loraserve.{suffix}"
    path.write_text(CONFIG_FILES[suffix])
    env = {"LORASERVE_GRPC_PORT": "10", "LORASERVE_HTTP_PORT": "20"}
    settings = load(["--config", str(path), "--grpc-port", "100"], env)
    assert (settings.grpc_port, settings.http_port, settings.max_replicas) == (100, 20, 3)
    assert settings.allow_private_networks is True and settings.data_dir == Path("/from-file")
    assert settings.replica_num_gpus == 1.0 and type(settings.replica_num_gpus) is float
    assert settings.min_replicas == Settings().min_replicas


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_replcas = 2", "no such setting: max_replcas"),
        ('s3_secret_key = "x"', "`s3_secret_key` is a secret, never in a config file: set LORASERVE_S3_SECRET_KEY"),
        ('max_replicas = "many"', r"`max_replicas` .*must be a int, got 'many'"),
        ("max_replicas = 2.5", r"`max_replicas` .*must be a int, got '2.5'"),
        ("max_replicas = true", "setting `max_replicas` must be a int, got True"),
        ("allow_private_networks = 1", "setting `allow_private_networks` must be a bool, got 1"),
        ("fetch_allowed_hosts = ['a']", r"setting `fetch_allowed_hosts` must be a str, got \['a'\]"),
        ("grpc_port = ", "not TOML"),
    ],
)
def test_config_file_refusals_name_the_setting(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "loraserve.toml"
    path.write_text(text + "\n")
    with pytest.raises(ValueError, match=message):
        load(["--config", str(path)])


def test_config_file_secrets_by_file_and_other_file_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "dsn"
    secret.write_text("postgresql://u:p@db/q\n")
    path = tmp_path / "c.yml"
    path.write_text(f"store_url_file: {secret}\n")
    assert load(["--config", str(path)]).store_url == "postgresql://u:p@db/q"
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ValueError, match=r"a \.toml, \.yaml or \.yml file, not \.json"):
        load(["--config", str(tmp_path / "c.json")])
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ValueError, match="YAML needs PyYAML"):
        load(["--config", str(path)])


def test_a_bad_config_file_is_a_usage_error_of_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text("max_replcas = 2\n")
    with pytest.raises(SystemExit) as exited:
        main(["serve-config", "--config", str(path)])
    assert exited.value.code == 2
    assert "no such setting: max_replcas" in capsys.readouterr().err


def test_the_replica_args_are_the_settings_a_worker_reads() -> None:
    """What serve_config writes into a Serve config, and the chart's copy of it, against the declarations."""
    worker = [n for n, i in INFOS.items() if Reader.WORKER in i.readers and not i.secret]
    assert serve_config.replica_setting_names() == [n for n in worker if n not in serve_config.DEPLOYMENT_SETTINGS]
    for name in serve_config.DEPLOYMENT_SETTINGS:
        assert INFOS[name].readers & {Reader.DEPLOYMENT} and Reader.WORKER not in INFOS[name].readers, name
    chart = json.loads(SERVE_SETTINGS.read_text())
    assert chart["not_args"] == sorted(set(INFOS) - set(serve_config.replica_setting_names())), f"stale: {COMMAND}"
    assert chart["gateway_secrets"] == sorted(
        n for n in SECRETS if Reader.WORKER not in INFOS[n].readers
    ), f"stale: {COMMAND}"


def _reference_rows() -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in settings_reference.markdown().splitlines():
        if line.startswith("| `") and "LORASERVE_" in line:
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0].strip("`")] = cells
    return rows


def test_the_docs_reference_shows_every_setting_as_declared() -> None:
    rows = _reference_rows()
    assert list(rows) == [n for g in GROUPS for n, i in INFOS.items() if i.group == g]
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    for name, (_, env, flag_cell, default, unit, readers, secret, description) in rows.items():
        info = INFOS[name]
        assert env == f"`{ENV_PREFIX}{name.upper()}`"
        assert readers == ", ".join(r.value for r in Reader if r in info.readers)
        assert (secret == "yes") == info.secret and description == info.description and unit == info.unit
        if info.secret:
            assert default == "" and "file`" in flag_cell, name
        elif isinstance(defaults[name], bool):
            assert flag_cell == f"`{flag(name)}` / `--no-{flag(name)[2:]}`"
        else:
            assert flag_cell == f"`{flag(name)}`" and default in ("", f"`{defaults[name]}`")
    headings = re.findall(r"^## (.+)$", settings_reference.markdown(), flags=re.MULTILINE)
    assert headings == [g for g in GROUPS if any(i.group == g for i in INFOS.values())]

