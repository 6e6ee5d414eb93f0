"""fal's JSON for fal-ai/lora requests: a body as fal's clients write it → GenerateInput, and its JSON Schema.

Proto JSON (json_format) is not fal's JSON: it knows neither `image_size`'s two shapes nor an
IP-Adapter's `ip_adapter_image_url` given as one string nor `scale_json` given as an object. So
the walk over the message descriptors is done here, once, for the HTTP facade, the Python client
and the CLI (the answers' JSON is the gateway's: gateway/fal_output.py). Bad input is refused as
InvalidInput naming every bad field by its path (`input.loras[0].path`); gateway/errors.py turns
that into gRPC's BadRequest or fal's 422 `loc`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from loraserve.request.violations import FieldViolation, InvalidInput
from loraserve.v1 import types_pb2

# The fal-ai/lora family: the path after the app id → GenerateInput.endpoint.
APP_ID = "fal-ai/lora"
ENDPOINTS: dict[str, int] = {
    "": types_pb2.ENDPOINT_UNSPECIFIED,
    "image-to-image": types_pb2.ENDPOINT_IMAGE_TO_IMAGE,
    "inpaint": types_pb2.ENDPOINT_INPAINT,
}

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}
_FLOATS = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)
# The deepest a request body nests (GenerateInput's own deepest is `ip_adapter[0].scale_json.up.block_0`, 4):
# far more than any body needs, far less than what exhausts Python's recursion in the walks over it.
MAX_JSON_DEPTH = 32


def endpoint_for(sub_path: str) -> int | None:
    """The GenerateInput.endpoint of a path below fal-ai/lora (`""`, `image-to-image`, `inpaint`);
    None for a path that is not one of the family."""
    return ENDPOINTS.get(sub_path.strip("/"))


def loads_body(raw: bytes) -> Any:
    """A request body's JSON (an empty body is `{}`); InvalidInput at `input` (fal's 422 at `body`) when it
    is not JSON, nests deeper than MAX_JSON_DEPTH, or has a string or key that is no Unicode text (a lone
    surrogate escape such as `"\\ud800"`, which no UTF-8 encoder takes)."""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except RecursionError:
        data = None
        too_deep = True
    except ValueError as exc:
        raise InvalidInput([FieldViolation("input", f"the body is not valid JSON: {exc}", "value_error.jsondecode")]) from None
    else:
        too_deep = _depth(data) > MAX_JSON_DEPTH
    if too_deep:
        why = f"the body nests deeper than {MAX_JSON_DEPTH} levels"
        raise InvalidInput([FieldViolation("input", why, "value_error.jsondecode")])
    return data


def _depth(data: Any) -> int:
    """How deep `data` nests (a scalar 0), without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def is_text(value: str) -> bool:
    """False for a string with a lone surrogate (JSON's `"\\ud800"`): it has no UTF-8 form, so protobuf,
    the store and every log refuse it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable_key(key: str) -> str:
    return key if is_text(key) else key.encode("utf-8", "backslashreplace").decode("utf-8")


def parse_input(data: Any, endpoint: int | None = None) -> types_pb2.GenerateInput:
    """A fal-ai/lora request body as a GenerateInput; InvalidInput naming every bad or unknown field.

    `endpoint` comes from the path the request was sent to (`/fal-ai/lora/inpaint`); given, the body
    may not carry an `endpoint` of its own. Without it (the Python client, the CLI) the body may.
    """
    if not isinstance(data, Mapping):
        raise InvalidInput([FieldViolation("input", "the body must be a JSON object", "type_error.dict")])
    inp = types_pb2.GenerateInput()
    violations: list[FieldViolation] = []
    hidden = frozenset({"endpoint"} if endpoint is not None else ())
    _fill(inp, data, "input", violations, hidden)
    if violations:
        raise InvalidInput(violations)
    if endpoint is not None:
        inp.endpoint = endpoint  # type: ignore[assignment]
    return inp


def _fill(
    msg: Message,
    data: Mapping[str, Any],
    path: str,
    violations: list[FieldViolation],
    hidden: frozenset[str] = frozenset(),
) -> None:
    descriptor: Descriptor = msg.DESCRIPTOR
    for key, value in data.items():
        name = f"{path}.{_printable_key(key) if isinstance(key, str) else key}"
        known = isinstance(key, str) and is_text(key) and key not in hidden
        field = descriptor.fields_by_name.get(key) if known else None
        if field is None:
            violations.append(FieldViolation(name, "extra fields not permitted", "value_error.extra"))
            continue
        if value is None:
            # fal's clients send null for an optional field they leave out.
            continue
        special = _SPECIAL.get((descriptor.name, key))
        if special is not None:
            special(msg, value, name, violations)
        elif field.is_repeated:
            if not isinstance(value, list):
                violations.append(FieldViolation(name, "value is not a valid list", "type_error.list"))
                continue
            target = getattr(msg, key)
            for index, item in enumerate(value):
                item_name = f"{name}[{index}]"
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    if not isinstance(item, Mapping):
                        violations.append(FieldViolation(item_name, "value is not a valid dict", "type_error.dict"))
                        continue
                    _fill(target.add(), item, item_name, violations)
                else:
                    ok, converted = coerce_scalar(field, item, item_name, violations)
                    if ok:
                        target.append(converted)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if not isinstance(value, Mapping):
                violations.append(FieldViolation(name, "value is not a valid dict", "type_error.dict"))
                continue
            _fill(getattr(msg, key), value, name, violations)
        else:
            ok, converted = coerce_scalar(field, value, name, violations)
            if ok:
                setattr(msg, key, converted)


def coerce_scalar(field: FieldDescriptor, value: Any, name: str, violations: list[FieldViolation]) -> tuple[bool, Any]:
    """(True, value as the field takes it) or (False, None) with a violation added; lax like pydantic:
    an integral float or a numeric string is an integer, a number's string a number."""
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        if isinstance(value, str) and is_text(value):
            return True, value
        if isinstance(value, str):
            violations.append(FieldViolation(name, "is not Unicode text: it holds a lone surrogate", "value_error.str"))
        else:
            violations.append(FieldViolation(name, "str type expected", "type_error.str"))
    elif kind == FieldDescriptor.TYPE_BOOL:
        if isinstance(value, bool):
            return True, value
        violations.append(FieldViolation(name, "value could not be parsed to a boolean", "type_error.bool"))
    elif kind in _INT_RANGES:
        number = _integer(value)
        low, high = _INT_RANGES[kind]
        if number is None:
            violations.append(FieldViolation(name, "value is not a valid integer", "type_error.integer"))
        elif not low <= number <= high:
            violations.append(FieldViolation(name, f"must be between {low} and {high}, got {number}", "value_error"))
        else:
            return True, number
    elif kind in _FLOATS:
        real = _float(value)
        if real is not None:
            return True, real
        violations.append(FieldViolation(name, "value is not a valid float", "type_error.float"))
    elif kind == FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type
        if isinstance(value, str) and value in enum.values_by_name:
            return True, enum.values_by_name[value].number
        if _integer(value) is not None and _integer(value) in enum.values_by_number:
            return True, _integer(value)
        choices = ", ".join(enum.values_by_name)
        why = f"value is not a valid enumeration member; one of {choices}"
        violations.append(FieldViolation(name, why, "type_error.enum"))
    else:
        violations.append(FieldViolation(name, "is not accepted as JSON", "type_error"))
    return False, None


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _float(value: Any) -> float | None:
    """Non-finite values are kept (JSON's NaN / Infinity, Python's nan): validation names them."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:
            # An integer of hundreds of digits: past any float, like JSON's 1e400.
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _image_size(msg: Message, value: Any, name: str, violations: list[FieldViolation]) -> None:
    """fal's `image_size`: a preset name or {width, height}."""
    assert isinstance(msg, types_pb2.GenerateInput)
    if isinstance(value, str):
        ok, preset = coerce_scalar(types_pb2.ImageSize.DESCRIPTOR.fields_by_name["preset"], value, name, violations)
        if ok:
            msg.image_size.preset = preset
        return
    if isinstance(value, Mapping):
        unknown = sorted(_printable_key(key) for key in set(value) - {"width", "height"})
        for key in unknown:
            violations.append(FieldViolation(f"{name}.{key}", "extra fields not permitted", "value_error.extra"))
        missing = [side for side in ("width", "height") if value.get(side) is None]
        for side in missing:
            violations.append(FieldViolation(f"{name}.{side}", "field required", "value_error.missing"))
        if unknown or missing:
            return
        sides = {side: _integer(value[side]) for side in ("width", "height")}
        bad = [side for side, number in sides.items() if number is None or not -(2**31) <= number < 2**31]
        for side in bad:
            violations.append(FieldViolation(f"{name}.{side}", "value is not a valid integer", "type_error.integer"))
        if not bad:
            msg.image_size.custom.width = sides["width"] or 0
            msg.image_size.custom.height = sides["height"] or 0
        return
    violations.append(
        FieldViolation(name, "must be a preset name (e.g. square_hd) or an object {width, height}", "type_error")
    )


def _ip_adapter_images(msg: Message, value: Any, name: str, violations: list[FieldViolation]) -> None:
    """fal's `ip_adapter_image_url`: one URL or a list of them."""
    assert isinstance(msg, types_pb2.IPAdapter)
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        violations.append(FieldViolation(name, "must be a URL or a list of URLs", "type_error"))
        return
    field = msg.DESCRIPTOR.fields_by_name["ip_adapter_image_url"]
    for index, item in enumerate(items):
        ok, url = coerce_scalar(field, item, f"{name}[{index}]", violations)
        if ok:
            msg.ip_adapter_image_url.append(url)


def _scale_json(msg: Message, value: Any, name: str, violations: list[FieldViolation]) -> None:
    """fal's `scale_json` is an object (or a number); the proto keeps its JSON text, which a gRPC
    caller writes itself. Validation checks its shape in both cases."""
    assert isinstance(msg, types_pb2.IPAdapter)
    if isinstance(value, str):
        ok, text = coerce_scalar(msg.DESCRIPTOR.fields_by_name["scale_json"], value, name, violations)
        if ok:
            msg.scale_json = text
        return
    try:
        msg.scale_json = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        violations.append(FieldViolation(name, "must be a JSON object of per-block scales", "type_error"))


_SPECIAL = {
    ("GenerateInput", "image_size"): _image_size,
    ("IPAdapter", "ip_adapter_image_url"): _ip_adapter_images,
    ("IPAdapter", "scale_json"): _scale_json,
}


# --- the JSON Schema of what parse_input takes ---------------------------------------------------


def input_schema(*, endpoint_in_path: bool = True) -> dict[str, Any]:
    """A request body's JSON Schema (2020-12, which OpenAPI 3.1 takes), walked over the same descriptors,
    ranges and special fields as `parse_input`, so the document and the parser cannot drift apart. It is
    the canonical form: the parser is laxer (numeric strings, integral floats), never stricter, before
    validation. `endpoint_in_path`: the HTTP routes, whose path names the endpoint, take no `endpoint`."""
    return _message_schema(types_pb2.GenerateInput.DESCRIPTOR, frozenset({"endpoint"} if endpoint_in_path else ()))


def _message_schema(descriptor: Descriptor, hidden: frozenset[str] = frozenset()) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for field in descriptor.fields:
        if field.name in hidden:
            continue
        special = _SPECIAL_SCHEMAS.get((descriptor.name, field.name))
        schema = special() if special is not None else _field_schema(field)
        # null: left out, as fal's clients send an optional field they do not set.
        properties[field.name] = {"anyOf": [schema, {"type": "null"}]}
    return {"type": "object", "properties": properties, "additionalProperties": False}


def _field_schema(field: FieldDescriptor) -> dict[str, Any]:
    if field.is_repeated:
        return {"type": "array", "items": _single_schema(field)}
    return _single_schema(field)


def _single_schema(field: FieldDescriptor) -> dict[str, Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return _message_schema(field.message_type)
    if kind == FieldDescriptor.TYPE_STRING:
        return {"type": "string"}
    if kind == FieldDescriptor.TYPE_BOOL:
        return {"type": "boolean"}
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        return {"type": "integer", "minimum": low, "maximum": high}
    if kind in _FLOATS:
        return {"type": "number"}
    if kind == FieldDescriptor.TYPE_ENUM:
        return {"enum": [*field.enum_type.values_by_name, *field.enum_type.values_by_number]}
    raise TypeError(f"{field.full_name}: a {field.type} field has no JSON form here")


def _image_size_schema() -> dict[str, Any]:
    custom = _message_schema(types_pb2.Dimensions.DESCRIPTOR)
    custom["properties"] = {side: schema["anyOf"][0] for side, schema in custom["properties"].items()}
    custom["required"] = sorted(custom["properties"])
    return {"anyOf": [_single_schema(types_pb2.ImageSize.DESCRIPTOR.fields_by_name["preset"]), custom]}


def _ip_adapter_images_schema() -> dict[str, Any]:
    url = _single_schema(types_pb2.IPAdapter.DESCRIPTOR.fields_by_name["ip_adapter_image_url"])
    return {"anyOf": [url, {"type": "array", "items": url}]}


def _scale_json_schema() -> dict[str, Any]:
    return {"anyOf": [_single_schema(types_pb2.IPAdapter.DESCRIPTOR.fields_by_name["scale_json"]), {"type": ["number", "object"]}]}


_SPECIAL_SCHEMAS = {
    ("GenerateInput", "image_size"): _image_size_schema,
    ("IPAdapter", "ip_adapter_image_url"): _ip_adapter_images_schema,
    ("IPAdapter", "scale_json"): _scale_json_schema,
}
