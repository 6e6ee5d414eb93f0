"""The settings reference of the docs, made from the settings' declarations (core.config).

docs/hooks.py puts `markdown()` on the configuration page at build time, so the page never holds a
copy that could go stale.
"""

from __future__ import annotations

import dataclasses

from core.config import ENV_PREFIX, GROUPS, Reader, Settings, reads_secret_file, secret_file_setting, setting_infos
from core.settings_cli import COMMAND_READERS, flag

# What each reader is, for the readers table.
READER_MEANINGS = {
    Reader.GATEWAY: "the gateway (its own process, or inside `loraserve serve`)",
    Reader.WORKER: "a worker replica (in a cluster: its Serve config's args and its pod's env)",
    Reader.DEPLOYMENT: "the workers' Serve config: the deployment's resources and autoscaling, app name, ports",
    Reader.RAY: "the process that starts or joins Ray (`loraserve serve`; KubeRay in a cluster)",
    Reader.ADMIN: "`loraserve keys`, beside a running gateway",
}


def markdown() -> str:
    """The intro (where settings come from, in which order, secrets) and one table per group."""
    lines = [
        "Every setting is an environment variable `LORASERVE_<NAME>`, a flag `--<name>` of the commands whose "
        "process reads it, and a key of a `--config` file (TOML or YAML, a table of settings by name):",
        "",
        "```toml",
        "# loraserve.toml",
        "grpc_port = 50051",
        "max_replicas = 4",
        "allow_private_networks = true",
        's3_secret_key_file = "/run/secrets/s3-secret-key"',
        "```",
        "",
        "**Precedence:** flags over environment variables over the config file over the defaults.",
        "",
        "**Booleans** are `--name` / `--no-name` as flags; in the environment and in files `true`, `1`, `yes`, "
        "`on` or `false`, `0`, `no`, `off`.",
        "",
        "**Secrets** are never flags, nor keys of a config file, nor part of a Serve config: give them as "
        "environment variables, or as `<name>_file` (a flag, an env var or a config key naming a file that "
        "holds the secret). A secret passed as a flag is refused with a message saying so.",
        "",
        "**Readers** say which process reads a setting, and so which commands take it as a flag:",
        "",
        "| reader | who | commands that take its settings |",
        "| --- | --- | --- |",
        *[f"| {reader.value} | {meaning} | {_commands(reader)} |" for reader, meaning in READER_MEANINGS.items()],
        "",
    ]
    infos = setting_infos()
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    for group in [*GROUPS, *sorted({i.group for i in infos.values()} - set(GROUPS))]:
        names = [name for name, info in infos.items() if info.group == group]
        if not names:
            continue
        lines += [f"## {group}", "", "| setting | env var | flag | default | unit | readers | secret | description |"]
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for name in names:
            info = infos[name]
            lines.append(
                "| "
                + " | ".join(
                    [
                        f"`{name}`",
                        f"`{ENV_PREFIX}{name.upper()}`",
                        _flag_cell(name, defaults[name], info.secret),
                        _default_cell(defaults[name], info.secret),
                        _cell(info.unit),
                        ", ".join(r.value for r in Reader if r in info.readers),
                        "yes" if info.secret else "",
                        _cell(info.description),
                    ]
                )
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def _commands(reader: Reader) -> str:
    return ", ".join(f"`loraserve {command}`" for command, readers in COMMAND_READERS.items() if reader in readers)


def _flag_cell(name: str, default: object, secret: bool) -> str:
    if secret:
        file_setting = secret_file_setting(name)
        return f"`{flag(file_setting)}`" if reads_secret_file(name) else f"(see `{file_setting}`)"
    if isinstance(default, bool):
        return f"`{flag(name)}` / `--no-{flag(name)[2:]}`"
    return f"`{flag(name)}`"


def _default_cell(default: object, secret: bool) -> str:
    if secret or default == "":
        return ""
    return f"`{default}`"


def _cell(text: str) -> str:
    """Markdown table cells end at `|` and lines."""
    return text.replace("|", "\\|").replace("\n", " ")
