"""A refused request as the fields it got wrong, in no transport's terms.

The gateway answers `InvalidInput` as gRPC INVALID_ARGUMENT with a BadRequest (and fal's 422 over
HTTP), the worker as a failed request of type INVALID_INPUT naming the first field, the client
as a ValueError before anything is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    # A field path as gRPC's BadRequest names it: `input.loras[0].path`.
    field: str
    description: str
    # fal's (pydantic's) error type, the `type` of a 422 detail entry.
    kind: str = "value_error"


class InvalidInput(Exception):
    """Every violation found, so a caller can fix them all at once; the message names each field and why."""

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        self.violations = list(violations)
        self.message = "invalid request: " + "; ".join(f"`{v.field}`: {v.description}" for v in self.violations)
        super().__init__(self.message)
