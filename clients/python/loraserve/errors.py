"""The vocabulary of request failures shared by workers, gateway and clients.

A failed request carries one of these types in `RequestError.type`; the gateway maps
each to a gRPC status code in `gateway/errors.py` (the one place that does).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorType(StrEnum):
    INVALID_INPUT = "INVALID_INPUT"
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
    ADAPTER_LOAD_FAILED = "ADAPTER_LOAD_FAILED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    CANCELLED = "CANCELLED"
    WORKER_FAILED = "WORKER_FAILED"
    # Not started within the Submit's start_timeout (fal's `start_timeout`).
    START_TIMEOUT = "START_TIMEOUT"
    INTERNAL = "INTERNAL"
