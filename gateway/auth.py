"""API keys: who is calling, as a tenant. `Authorization: Key <id>:<secret>`, the header fal's clients send.

A key's secret is 256 random bits, so a SHA-256 digest is all the store keeps: there is
nothing to guess that a slow hash would protect, and checking a key costs microseconds
(the Submit p99 budget with auth on is 1.1× without). Verified keys are remembered for a
few seconds, so a revocation takes effect on every gateway within `KEY_CACHE_SECONDS`
without a store round trip per call.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections.abc import Callable, Sequence

from gateway.errors import Unauthenticated
from gateway.store import ApiKey, RequestStore

KEY_PREFIX = "lsk_"
KEY_CACHE_SECONDS = 5.0
# Tenant of requests made without a key where keys are not required (the embedded default on loopback).
ANONYMOUS = ""
# A tenant's name goes as it is into HTTP headers (a webhook's X-Fal-Webhook-User-Id), logs and settings:
# ASCII letters, digits and `. _ - @ +`, starting with a letter or digit, at most 200 characters.
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,199}")


def check_tenant_name(tenant: str) -> None:
    """ValueError saying which names are allowed, for a tenant name that is not one of them."""
    if not TENANT_NAME.fullmatch(tenant):
        raise ValueError(
            "a tenant name is 1 to 200 ASCII letters, digits and `. _ - @ +`, starting with a letter or digit;"
            f" got {tenant!r}"
        )


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(tenant: str, name: str = "") -> tuple[ApiKey, str]:
    """A new key and its secret; the secret is shown once and never stored."""
    check_tenant_name(tenant)
    secret = secrets.token_urlsafe(32)
    key = ApiKey(
        id=KEY_PREFIX + secrets.token_hex(8),
        tenant=tenant,
        name=name,
        secret_sha256=digest(secret),
        created_at=time.time(),
    )
    return key, secret


def header_value(key_id: str, secret: str) -> str:
    return f"Key {key_id}:{secret}"


def auth_required(host: str, insecure_no_auth: bool) -> bool:
    """Keys are required on every address but loopback, unless the operator says otherwise out loud."""
    if insecure_no_auth:
        return False
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


class Authenticator:
    def __init__(self, store: RequestStore, *, required: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self.required = required
        # Ages the remembered keys; tests move it to see a revocation land without waiting.
        self.clock = clock
        self._verified: dict[str, tuple[ApiKey | None, float]] = {}

    async def tenant(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        """The caller's tenant from its `authorization` metadata; UNAUTHENTICATED when it has none it may use."""
        return await self.tenant_of_header(
            next((str(value) for name, value in metadata or () if name == "authorization"), None)
        )

    async def tenant_of_header(self, header: str | None) -> str:
        """As `tenant`, from the `Authorization` value itself (the HTTP side's header)."""
        tenant, _ = await self.caller_of_header(header)
        return tenant

    async def caller_of_header(self, header: str | None) -> tuple[str, str]:
        """(tenant, key id) of the `Authorization` value; the key id is empty for the anonymous tenant."""
        if header is None:
            if self.required:
                raise Unauthenticated(
                    "this gateway requires an API key: send the metadata `authorization: Key <id>:<secret>`",
                    reason="API_KEY_MISSING",
                )
            return ANONYMOUS, ""
        scheme, _, credentials = header.strip().partition(" ")
        key_id, sep, secret = credentials.strip().partition(":")
        # Keys are ASCII; an HTTP header's other bytes arrive as surrogates, which no store or digest takes.
        if scheme.lower() != "key" or not sep or not key_id or not secret or not header.isascii():
            raise Unauthenticated("the authorization metadata must read `Key <id>:<secret>`", reason="API_KEY_INVALID")
        key = await self._lookup(key_id)
        if key is None or not hmac.compare_digest(key.secret_sha256, digest(secret)):
            raise Unauthenticated("unknown API key or wrong secret", reason="API_KEY_INVALID")
        if key.revoked_at is not None:
            raise Unauthenticated(f"API key {key_id} was revoked", reason="API_KEY_REVOKED")
        return key.tenant, key.id

    async def key_tenant(self, key_id: str) -> str:
        """The tenant of a key that is still in force, for credentials minted under it (fal's upload tokens and
        signed upload URLs): they stop working when the key is revoked, within the same KEY_CACHE_SECONDS."""
        key = await self._lookup(key_id)
        if key is None:
            raise Unauthenticated(f"API key {key_id} no longer exists", reason="API_KEY_INVALID")
        if key.revoked_at is not None:
            raise Unauthenticated(f"API key {key_id} was revoked", reason="API_KEY_REVOKED")
        return key.tenant

    async def _lookup(self, key_id: str) -> ApiKey | None:
        now = self.clock()
        cached = self._verified.get(key_id)
        if cached is not None and now - cached[1] < KEY_CACHE_SECONDS:
            return cached[0]
        key = await self._store.key(key_id)
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[key_id] = (key, now)
        return key
