"""Signs webhook deliveries the way fal does, and publishes the public key as a JWKS.

A receiver checks a delivery with fal's documented steps: the headers X-Fal-Webhook-Request-Id,
-User-Id, -Timestamp and -Signature, an Ed25519 signature (hex) over
`request_id\\nuser_id\\ntimestamp\\nsha256hex(body)`, verified with a key from
`/.well-known/jwks.json`. Every attempt is signed again with a fresh timestamp (receivers refuse
timestamps more than 5 minutes off, and retries run for hours); the body bytes never change.

The JWKS `x` keeps its `=` padding: fal's documented Python verifier decodes it with
`base64.urlsafe_b64decode(x)` without re-padding and fails on the 43-character RFC 7517 form,
while every other verifier found accepts the padded one.

The key is `webhook_signing_key` (PEM text; the Helm chart gives every gateway the same one from a
Kubernetes Secret, made once unless the operator names one) or the PEM file
`webhook_signing_key_file`; without either the embedded gateway makes one in its data dir on first
start (mode 0600) and keeps it. Gateways sharing a PostgreSQL store must share the key: a receiver
may fetch the JWKS from any of them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.config import Settings
from storage.object_store import load_or_create_secret

# Where the embedded default keeps the key it makes.
KEY_FILE = "webhook-signing-key.pem"
JWKS_PATH = "/.well-known/jwks.json"


class WebhookSigner:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self._public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        # RFC 7638 thumbprint: stable for the key, the same on every gateway that shares it.
        canonical = json.dumps(
            {"crv": "Ed25519", "kty": "OKP", "x": _b64url(self._public, padded=False)}, separators=(",", ":")
        )
        self.kid = _b64url(hashlib.sha256(canonical.encode()).digest(), padded=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookSigner:
        if settings.webhook_signing_key:
            return cls.from_pem(settings.webhook_signing_key.encode(), "webhook_signing_key")
        path = Path(settings.webhook_signing_key_file) if settings.webhook_signing_key_file else None
        pem = path.read_bytes() if path is not None else load_or_create_secret(settings.data_dir / KEY_FILE, _new_key_pem)
        return cls.from_pem(pem, str(path or settings.data_dir / KEY_FILE))

    @classmethod
    def from_pem(cls, pem: bytes, where: str = "the key") -> WebhookSigner:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{where} is not an Ed25519 private key (webhooks are signed with Ed25519, as fal's are)")
        return cls(key)

    def headers(self, request_id: str, user_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
        """The four X-Fal-Webhook-* headers for one attempt at sending `body`."""
        timestamp = str(int(time.time() if now is None else now))
        message = "\n".join((request_id, user_id, timestamp, hashlib.sha256(body).hexdigest())).encode()
        return {
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": user_id,
            "X-Fal-Webhook-Timestamp": timestamp,
            "X-Fal-Webhook-Signature": self._key.sign(message).hex(),
        }

    async def serve_jwks(self, _: web.Request) -> web.Response:
        """GET /.well-known/jwks.json on the gateway's HTTP port."""
        return web.json_response(self.jwks(), headers={"Cache-Control": "public, max-age=3600"})

    def jwks(self) -> dict[str, Any]:
        return {
            "keys": [
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": _b64url(self._public, padded=True),
                    "kid": self.kid,
                    "alg": "EdDSA",
                    "use": "sig",
                }
            ]
        }


def _b64url(data: bytes, *, padded: bool) -> str:
    encoded = base64.urlsafe_b64encode(data).decode("ascii")
    return encoded if padded else encoded.rstrip("=")


def _new_key_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
