"""The base-model key: what requests are routed by and what a replica keeps loaded.

It travels as gRPC metadata (`multiplexed_model_id`) and shows up in Serve's logs, metrics and
routing tables, while a model reference may be a URL carrying a token. So the key is a digest
of the normalised reference: the same weights give the same key, and nothing of the reference
itself can be read from it. A worker takes the reference from the request's input and checks
that it digests to the key it was routed by.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

KEY_PREFIX = "m-"


@dataclass(frozen=True)
class BaseModelRef:
    model_name: str
    unet_name: str = ""
    variant: str = ""

    @property
    def key(self) -> str:
        parts = json.dumps([self.model_name, self.unet_name, self.variant], separators=(",", ":"))
        return KEY_PREFIX + hashlib.sha256(parts.encode()).hexdigest()

    @classmethod
    def normalised(cls, model_name: str, unet_name: str = "", variant: str = "") -> BaseModelRef:
        """Spelling differences that name the same weights give the same key."""
        return cls(_norm(model_name), _norm(unet_name), variant.strip().lower())


def _norm(name: str) -> str:
    name = name.strip()
    return name.rstrip("/") if len(name) > 1 else name
