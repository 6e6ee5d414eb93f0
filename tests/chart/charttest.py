"""Helpers for the chart tests: a real Helm binary, rendering, strict schema checks."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def assert_no_unknown_fields(model: BaseModel, data: Any, where: str = "") -> None:
    """Pydantic ignores keys it does not know; Serve would too, silently. Here they are errors."""
    assert isinstance(data, dict), f"{where or '.'}: expected an object"
    fields = {(info.alias or name): name for name, info in type(model).model_fields.items()}
    fields.update({name: name for name in type(model).model_fields})
    unknown = sorted(set(data) - set(fields))
    assert not unknown, f"{where or '.'}: fields Ray Serve does not know: {unknown}"
    for key, value in data.items():
        attr = getattr(model, fields[key])
        if isinstance(attr, BaseModel):
            assert_no_unknown_fields(attr, value, f"{where}.{key}")
        elif isinstance(attr, list) and isinstance(value, list):
            for i, (item, raw) in enumerate(zip(attr, value)):
                if isinstance(item, BaseModel):
                    assert_no_unknown_fields(item, raw, f"{where}.{key}[{i}]")
