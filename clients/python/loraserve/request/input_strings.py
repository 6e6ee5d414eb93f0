"""Every string of a request's input, with its field path, for checks that apply to any field that can
name a file (a URL, a data URI, a stored file): model, LoRAs, embeddings, conditioning images and
weights, image-to-image inputs, and any field added later."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


@dataclass(frozen=True)
class InputString:
    path: str
    value: str
    # Puts another value in its place (a URL rewritten to its ASCII form).
    replace: Callable[[str], None]


def input_strings(message: Message, prefix: str = "input") -> list[InputString]:
    """Every non-empty string in `message`, with its field path (`input.loras[0].path`); map fields are skipped."""
    found: list[InputString] = []
    for descriptor, value in message.ListFields():
        path = f"{prefix}.{descriptor.name}"
        if descriptor.type == FieldDescriptor.TYPE_MESSAGE:
            if descriptor.message_type.GetOptions().map_entry:
                continue
            items = list(value) if descriptor.is_repeated else [value]
            for i, item in enumerate(items):
                found += input_strings(item, f"{path}[{i}]" if descriptor.is_repeated else path)
        elif descriptor.type == FieldDescriptor.TYPE_STRING:
            if descriptor.is_repeated:
                found += [
                    InputString(f"{path}[{i}]", item, _set_item(value, i)) for i, item in enumerate(value) if item
                ]
            elif value:
                found.append(InputString(path, value, _set_field(message, descriptor.name)))
    return found


def _set_item(container: list[str], index: int) -> Callable[[str], None]:
    def replace(new: str) -> None:
        container[index] = new

    return replace


def _set_field(message: Message, name: str) -> Callable[[str], None]:
    def replace(new: str) -> None:
        setattr(message, name, new)

    return replace
