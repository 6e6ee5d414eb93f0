"""Generates the gRPC stubs from proto/ as part of every build (wheel or editable), and makes the
distribution require the grpcio and protobuf they were generated for: generated code refuses, at
import, a runtime older than its generator, so a floor below that would install a client that fails."""

import importlib.util
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
# The client's needs and nothing more (no torch, Ray or diffusers); grpcio's and protobuf's floors
# rise to what the stubs check for.
DEPENDENCIES = {
    "grpcio": "1.70",
    "protobuf": "5.29",
    "googleapis-common-protos": "1.66",
    # progress of `loraserve generate`
    "tqdm": "4.66",
}


def generate_stubs() -> dict[str, str]:
    """Writes loraserve/v1 and returns the grpcio and protobuf versions the stubs check for."""
    # Loaded by path: the build runs in an isolated environment where the project itself is not importable yet.
    spec = importlib.util.spec_from_file_location("_protogen", HERE / "loraserve" / "protogen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate()
    stubs = HERE / "loraserve" / "v1"
    generated = {}
    grpc_check = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", (stubs / "generation_pb2_grpc.py").read_text())
    if grpc_check:
        generated["grpcio"] = grpc_check.group(1)
    protobuf_check = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", (stubs / "types_pb2.py").read_text())
    if protobuf_check:
        generated["protobuf"] = ".".join(protobuf_check.groups())
    return generated


def _newer(a: str, b: str) -> str:
    return max(a, b, key=lambda version: tuple(int(part) for part in version.split(".")))


generated = generate_stubs()
setup(install_requires=[f"{name}>={_newer(floor, generated.get(name, floor))}" for name, floor in DEPENDENCIES.items()])
