"""`loraserve keys create|list|revoke`: API keys in the request store, beside a running gateway.

A key belongs to a tenant; the secret is printed once, at creation, and only its digest is
stored. The store is the one the gateway uses (`store_url`, or the SQLite file in
`data_dir`), so a revocation reaches every gateway within gateway/auth.py's cache time.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time

from core.config import Settings
from core.settings_cli import COMMAND_READERS


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="create, list or revoke API keys (printed once; stored hashed)")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", help="a new key for a tenant; prints `<id>:<secret>` once")
    create.add_argument("--tenant", required=True, help="whose requests the key makes and sees")
    create.add_argument("--name", default="", help="a note for `keys list` (who holds it)")
    actions.add_parser("list", help="every key: id, tenant, name, created, revoked")
    revoke = actions.add_parser("revoke", help="the key stops working on every gateway within seconds")
    revoke.add_argument("key_id")
    for parser in actions.choices.values():
        Settings.add_arguments(parser, COMMAND_READERS["keys"])
        parser.set_defaults(run=functools.partial(run, parser))


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_args(args)
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.auth import header_value, new_key
    from gateway.store import open_store

    store = await open_store(settings, admin=True)
    try:
        if args.keys_command == "create":
            try:
                key, secret = new_key(args.tenant, args.name)
            except ValueError as exc:
                print(f"error: {exc}")
                return 2
            await store.add_key(key)
            print(f"{key.id}:{secret}")
            print(f"# tenant {key.tenant}; the secret is not shown again. Callers send the metadata")
            print(f"#   authorization: {header_value(key.id, '<secret>')}   (or set LORASERVE_KEY={key.id}:<secret>)")
        elif args.keys_command == "list":
            for key in await store.keys():
                state = "revoked " + _when(key.revoked_at) if key.revoked_at else "active"
                print(f"{key.id}\t{key.tenant}\t{key.name}\tcreated {_when(key.created_at)}\t{state}")
        else:
            if not await store.revoke_key(args.key_id):
                print(f"error: no active key {args.key_id}")
                return 1
            print(f"revoked {args.key_id}")
    finally:
        await store.close()
    return 0


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
