"""MkDocs hooks: the reference pages are generated at build time, from the sources they describe.

The API reference is read from the comments in `proto/loraserve/v1/*.proto` (compiled with their
source info by grpc_tools' protoc), the settings reference from `core.settings_reference`. Neither is
written into the repository: a page holds a marker line and the build puts the reference in its place,
so the docs cannot drift from the schema or from `Settings`. The README is the site's home page, so
the two never say different things.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"

API_MARKER = "<!-- generated: proto reference -->"
SETTINGS_MARKER = "<!-- generated: settings reference -->"

# Field numbers of descriptor.proto, as they appear in SourceCodeInfo paths.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM = 2, 3, 4
_ENUM_VALUE = 2
_SERVICE_METHOD = 2

_SCALARS = {
    value: name.removeprefix("TYPE_").lower()
    for name, value in descriptor_pb2.FieldDescriptorProto.Type.items()
    if name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}


def proto_descriptors(proto_dir: Path = PROTO_DIR) -> descriptor_pb2.FileDescriptorSet:
    """Every .proto under proto_dir compiled with its comments (protoc's --include_source_info)."""
    protos = sorted(str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {proto_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.pb"
        result = subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", "--include_source_info",
             f"--descriptor_set_out={out}", *protos],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"protoc failed on {proto_dir}: {result.stderr.strip()}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


@dataclass
class _Comments:
    """The leading comment of each element of one file, by its source path."""

    by_path: dict[tuple[int, ...], str] = field(default_factory=dict)

    @classmethod
    def of(cls, file: descriptor_pb2.FileDescriptorProto) -> _Comments:
        comments = cls()
        for location in file.source_code_info.location:
            text = location.leading_comments or location.trailing_comments
            if text:
                lines = [line.strip() for line in text.strip().splitlines()]
                comments.by_path[tuple(location.path)] = " ".join(line for line in lines if line)
        return comments

    def __call__(self, *path: int) -> str:
        return self.by_path.get(path, "")


def _anchor(name: str) -> str:
    """The id MkDocs' table of contents gives the heading `### name` (`ImageSize.Preset` → imagesizepreset)."""
    return name.lower().replace(".", "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or " "


def _type_of(
    f: descriptor_pb2.FieldDescriptorProto, package: str, maps: dict[str, descriptor_pb2.DescriptorProto] | None = None
) -> str:
    entry = (maps or {}).get(f.type_name)
    if entry is not None:
        # A map field's entry message is protoc's, not the schema's: shown as map<key, value>.
        key, value = entry.field
        return f"map<{_type_of(key, package)}, {_type_of(value, package)}>"
    if f.type in (f.TYPE_MESSAGE, f.TYPE_ENUM):
        name = f.type_name.lstrip(".")
        if name.startswith(package + "."):
            short = name.removeprefix(package + ".")
            return f"[`{short}`](#{_anchor(short)})"
        return f"`{name}`"
    return f"`{_SCALARS[f.type]}`"


def _label_of(f: descriptor_pb2.FieldDescriptorProto, message: descriptor_pb2.DescriptorProto) -> str:
    if any(nested.options.map_entry and f.type_name.endswith(f".{message.name}.{nested.name}")
           for nested in message.nested_type):
        return ""
    if f.label == f.LABEL_REPEATED:
        return "repeated"
    if f.proto3_optional:
        return "optional"
    if f.HasField("oneof_index"):
        return f"oneof `{message.oneof_decl[f.oneof_index].name}`"
    return ""


def _message_md(message: descriptor_pb2.DescriptorProto, prefix: str, path: tuple[int, ...], package: str,
                comments: _Comments) -> list[str]:
    name = prefix + message.name
    out = [f"### {name}", ""]
    if comments(*path):
        out += [comments(*path), ""]
    maps = {f".{package}.{name}.{nested.name}": nested for nested in message.nested_type if nested.options.map_entry}
    if message.field:
        out += ["| field | number | type | label | description |", "| --- | --- | --- | --- | --- |"]
        for i, f in enumerate(message.field):
            out.append(
                f"| `{f.name}` | {f.number} | {_type_of(f, package, maps)} | {_label_of(f, message)} | "
                f"{_cell(comments(*path, _MESSAGE_FIELD, i))} |"
            )
    else:
        out.append("No fields.")
    out.append("")
    for i, enum in enumerate(message.enum_type):
        out += _enum_md(enum, name + ".", (*path, _MESSAGE_ENUM, i), comments)
    for i, nested in enumerate(message.nested_type):
        if not nested.options.map_entry:
            out += _message_md(nested, name + ".", (*path, _MESSAGE_NESTED, i), package, comments)
    return out


def _enum_md(enum: descriptor_pb2.EnumDescriptorProto, prefix: str, path: tuple[int, ...],
             comments: _Comments) -> list[str]:
    out = [f"### {prefix}{enum.name}", ""]
    if comments(*path):
        out += [comments(*path), ""]
    out += ["| value | number | description |", "| --- | --- | --- |"]
    for i, value in enumerate(enum.value):
        out.append(f"| `{value.name}` | {value.number} | {_cell(comments(*path, _ENUM_VALUE, i))} |")
    return [*out, ""]


def _in_file(section: list[str], file_name: str) -> list[str]:
    """The section with the file it is defined in under its heading (worker.proto's are internal)."""
    return [section[0], "", f"In `{file_name}`.", *section[1:]]


def api_reference(descriptors: descriptor_pb2.FileDescriptorSet) -> str:
    """Markdown for every service, rpc, message, field and enum, with the protos' own comments."""
    services: list[str] = []
    messages: list[str] = []
    enums: list[str] = []
    for file in descriptors.file:
        comments = _Comments.of(file)
        package = file.package
        for s, service in enumerate(file.service):
            services += [f"### {service.name}", "", f"`{package}.{service.name}`, in `{file.name}`.", ""]
            if comments(_FILE_SERVICE, s):
                services += [comments(_FILE_SERVICE, s), ""]
            services += ["| rpc | request | response | description |", "| --- | --- | --- | --- |"]
            for m, method in enumerate(service.method):
                request = method.input_type.removeprefix(f".{package}.")
                response = method.output_type.removeprefix(f".{package}.")
                services.append(
                    f"| `{method.name}` | {'stream ' if method.client_streaming else ''}[`{request}`](#{_anchor(request)}) "
                    f"| {'stream ' if method.server_streaming else ''}[`{response}`](#{_anchor(response)}) "
                    f"| {_cell(comments(_FILE_SERVICE, s, _SERVICE_METHOD, m))} |"
                )
            services.append("")
        for i, message in enumerate(file.message_type):
            messages += _in_file(_message_md(message, "", (_FILE_MESSAGE, i), package, comments), file.name)
        for i, enum in enumerate(file.enum_type):
            enums += _in_file(_enum_md(enum, "", (_FILE_ENUM, i), comments), file.name)
    return "\n".join(["## Services", "", *services, "## Messages", "", *messages, "## Enums", "", *enums])


def settings_reference() -> str:
    """Every setting by group, from their declarations in core.config (core.settings_reference)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from core import settings_reference as reference

    return str(reference.markdown())


_GENERATED = {API_MARKER: lambda: api_reference(proto_descriptors()), SETTINGS_MARKER: settings_reference}
_used: set[str] = set()


def on_pre_build(config: Any) -> None:
    _used.clear()


def on_files(files: Files, config: Any) -> Files:
    """The README is the site's home page, its links into docs/ made relative to the site."""
    readme = (ROOT / "README.md").read_text()
    files.append(File.generated(config, "index.md", content=re.sub(r"\]\(docs/", "](", readme)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    for marker, make in _GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
            _used.add(marker)
    return markdown


def on_post_build(config: Any) -> None:
    missing = set(_GENERATED) - _used
    if missing:
        raise PluginError(f"no page holds the marker(s) {sorted(missing)}: a generated reference is missing")
