"""The limits of one server that the request model checks, given as plain numbers.

The server builds them from its settings (`core.config.Settings.request_limits`), the gateway and
the worker alike, so both refuse the same requests; the model itself reads no configuration.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestLimits:
    # Characters of `prompt` and of `negative_prompt`, each.
    max_prompt_chars: int
    max_loras_per_request: int
    # Bytes of the data one data URI carries, in any field that names a file.
    max_data_uri_bytes: int
    # Pixels of all of a sync_mode request's images together, returned inline in its result.
    max_sync_mode_pixels: int
