"""Settings as command-line flags: one command takes only the settings its process reads.

`add_settings_arguments(parser, readers)` adds `--config FILE` and, section by section (core.config.GROUPS),
a flag per setting that any of `readers` reads, its help the setting's description. Booleans are
`--flag/--no-flag`. A secret is no flag (a command line is readable by every user in `ps`): `--<name>` is
refused with a message saying how to pass it, `--<name>-file PATH` reads it from a file.
`settings_from_args` then builds Settings: flags over `LORASERVE_*` env over the config file over the defaults.

A config file is TOML (`.toml`) or YAML (`.yaml`, `.yml`): a flat table of settings by name,
typed as their defaults; a secret appears only as `<name>_file`.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from core.config import (
    ENV_PREFIX,
    GROUPS,
    Reader,
    Settings,
    parse_value,
    read_secret_file,
    reads_secret_file,
    secret_file_setting,
    setting_infos,
)

# The settings each command takes as flags: those its process reads. `keys` runs beside a gateway.
COMMAND_READERS: dict[str, tuple[Reader, ...]] = {
    "serve": (Reader.GATEWAY, Reader.WORKER, Reader.DEPLOYMENT, Reader.RAY),
    "demo": (Reader.GATEWAY, Reader.WORKER, Reader.DEPLOYMENT, Reader.RAY),
    "gateway": (Reader.GATEWAY,),
    "serve-config": (Reader.WORKER, Reader.DEPLOYMENT),
    "keys": (Reader.ADMIN,),
}
CONFIG_DEST = "settings_config"
_FILE_DEST = "settings_file_"
_VALUE_DEST = "setting_"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def secret_hint(name: str) -> str:
    """How a secret is given, for the refusals and the docs."""
    file_flag = flag(secret_file_setting(name))
    return f"set {ENV_PREFIX}{name.upper()} in the environment, or name a file holding it: {file_flag} PATH"


class _RefuseSecret(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        name = self.dest.removeprefix(_VALUE_DEST)
        parser.error(
            f"{option_string}: `{name}` is a secret and is not taken as a flag (anyone on this machine can read a "
            f"command line): {secret_hint(name)}"
        )


def add_settings_arguments(parser: argparse.ArgumentParser, readers: Iterable[Reader]) -> None:
    """`--config FILE`, then the flags of the settings any of `readers` reads, one section per group.

    The usage line names the command's own arguments and then only `[--config FILE] [settings]`: the
    sections below list the settings (a usage line of every flag would be half the help)."""
    own = " ".join(parser.format_usage().split()[1:]).removeprefix(parser.prog).strip()
    parser.usage = f"%(prog)s {own} [--config FILE] [settings]".replace("  ", " ")
    parser.add_argument(
        "--config",
        dest=CONFIG_DEST,
        type=Path,
        metavar="FILE",
        help="settings from a TOML or YAML file (a table of settings by name); flags override "
        f"{ENV_PREFIX}<NAME> env vars, which override the file, which overrides the defaults",
    )
    wanted = frozenset(readers)
    infos = setting_infos()
    defaults = {f.name: f for f in dataclasses.fields(Settings)}
    sections: dict[str, argparse._ArgumentGroup] = {}
    for group in [*GROUPS, *sorted({i.group for i in infos.values()} - set(GROUPS))]:
        for name, info in infos.items():
            if info.group != group or not info.readers & wanted:
                continue
            if group not in sections:
                sections[group] = parser.add_argument_group(f"{group.lower()} (each also {ENV_PREFIX}<NAME>)")
            _add_flag(sections[group], defaults[name], info.description, info.unit, info.secret)
    for name, info in infos.items():
        if info.secret and not info.readers & wanted:
            # Refused with how to pass it, as where it is read: a secret on a command line is never right.
            _add_refusal(parser, name)


def _add_flag(
    section: argparse._ArgumentGroup, f: dataclasses.Field[Any], description: str, unit: str, secret: bool
) -> None:
    env = ENV_PREFIX + f.name.upper()
    if secret:
        _add_refusal(section, f.name)
        if reads_secret_file(f.name):
            section.add_argument(
                flag(secret_file_setting(f.name)),
                dest=_FILE_DEST + f.name,
                metavar="PATH",
                help=_escaped(f"{description} [secret: this file holds it, or env {env}]"),
            )
        return
    default = "" if f.default == "" else f"; default {f.default}"
    units = f"; {unit}" if unit else ""
    help_text = _escaped(f"{description} [{env}{default}{units}]")
    if isinstance(f.default, bool):
        section.add_argument(
            flag(f.name), dest=_VALUE_DEST + f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
        )
    else:
        section.add_argument(
            flag(f.name), dest=_VALUE_DEST + f.name, default=None, metavar=_metavar(f, unit), help=help_text
        )


def _add_refusal(container: argparse._ActionsContainer, name: str) -> None:
    container.add_argument(flag(name), dest=_VALUE_DEST + name, nargs="?", action=_RefuseSecret, help=argparse.SUPPRESS)


def _escaped(help_text: str) -> str:
    """argparse formats help with %."""
    return help_text.replace("%", "%%")


def _metavar(f: dataclasses.Field[Any], unit: str) -> str:
    if unit in ("seconds", "bytes", "port", "path", "URL", "JSON"):
        return unit.upper()
    return {int: "N", float: "X", bool: "BOOL"}.get(type(f.default), "DIR" if isinstance(f.default, Path) else "TEXT")


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Flags over env over `--config`'s file over the defaults; a bad value raises ValueError naming it."""
    config_path = getattr(args, CONFIG_DEST, None)
    config = read_config_file(config_path) if config_path is not None else {}
    flags: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        value = getattr(args, _VALUE_DEST + f.name, None)
        if isinstance(value, bool):
            flags[f.name] = value
        elif value is not None:
            flags[f.name] = parse_value(f, value)
        secret_path = getattr(args, _FILE_DEST + f.name, None)
        if secret_path is not None:
            flags[f.name] = read_secret_file(f.name, secret_path)
    return Settings.from_env(env, config=config, **flags)


def read_config_file(path: Path) -> dict[str, Any]:
    """A config file's settings, typed; unknown names, secrets and values of the wrong type are refused."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"--config {path}: {exc.strerror}") from exc
    raw = _parse_config_text(path, text)
    infos = setting_infos()
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    secret_files = {secret_file_setting(n): n for n in infos if reads_secret_file(n)}
    unknown = sorted(set(raw) - set(fields) - set(secret_files))
    if unknown:
        raise ValueError(f"--config {path}: no such setting: {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in secret_files:
            values[secret_files[key]] = read_secret_file(secret_files[key], str(value))
        elif infos[key].secret:
            raise ValueError(f"--config {path}: `{key}` is a secret, never in a config file: {secret_hint(key)}")
        else:
            values[key] = _typed(fields[key], value, path)
    return values


def _parse_config_text(path: Path, text: str) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"--config {path}: not TOML: {exc}") from exc
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ValueError(f"--config {path}: YAML needs PyYAML (pip install pyyaml); or write it as TOML") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"--config {path}: not YAML: {exc}") from exc
        data = {} if data is None else data
    else:
        raise ValueError(f"--config {path}: a .toml, .yaml or .yml file, not {suffix or 'no suffix'}")
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: must hold a table of settings by name")
    return data


def _typed(f: dataclasses.Field[Any], value: Any, path: Path) -> Any:
    """A file's value as its setting's type: TOML and YAML already type them; a string is parsed as env text."""
    kind = type(f.default)
    scalar = isinstance(value, (str, int, float))
    if not scalar or isinstance(value, bool) != (kind is bool) and not isinstance(value, str):
        raise ValueError(f"--config {path}: setting `{f.name}` must be a {kind.__name__}, got {value!r}")
    if isinstance(value, kind):
        return value
    if kind is float and isinstance(value, int):
        return float(value)
    try:
        return parse_value(f, str(value))
    except ValueError as exc:
        raise ValueError(f"--config {path}: {exc}") from exc
