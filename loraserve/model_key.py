"""The base-model key: what requests are routed by and what a replica keeps loaded.

It travels as gRPC metadata (`multiplexed_model_id`), which must be printable ASCII,
so the parts are JSON-encoded and then percent-quoted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import quote, unquote


@dataclass(frozen=True)
class BaseModelRef:
    model_name: str
    unet_name: str = ""
    variant: str = ""

    @property
    def key(self) -> str:
        parts = [self.model_name, self.unet_name, self.variant]
        return quote(json.dumps(parts, separators=(",", ":")), safe="")

    @classmethod
    def normalised(cls, model_name: str, unet_name: str = "", variant: str = "") -> BaseModelRef:
        """Spelling differences that name the same weights give the same key."""
        return cls(_norm(model_name), _norm(unet_name), variant.strip().lower())

    @classmethod
    def from_key(cls, key: str) -> BaseModelRef:
        model_name, unet_name, variant = json.loads(unquote(key))
        return cls(model_name, unet_name, variant)


def _norm(name: str) -> str:
    name = name.strip()
    return name.rstrip("/") if len(name) > 1 else name
