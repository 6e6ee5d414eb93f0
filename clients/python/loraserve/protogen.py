"""Generates the Python stubs for the repository's `proto/` into this package's `v1/` (`loraserve.v1`).

Generated code is a build output, not source: the client's build (`pip install ./clients/python`,
clients/python/setup.py) runs this, and
`tests/test_proto.py` regenerates into a temporary folder to check that what is
imported matches the `.proto` files.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

# Where the `loraserve` package sits (clients/python/), and the API's .proto files at the repository root.
ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT.parent.parent / "proto"


def proto_files(proto_dir: Path = PROTO_DIR) -> list[Path]:
    return sorted(proto_dir.rglob("*.proto"))


def generate(out_dir: Path = ROOT, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Runs protoc (from grpcio-tools) and returns the files it wrote."""
    from grpc_tools import protoc

    include = str(resources.files("grpc_tools") / "_proto")
    files = proto_files(proto_dir)
    args = [
        "protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(f) for f in files),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {[str(f) for f in files]}")
    written: list[Path] = []
    for f in files:
        package_dir = out_dir / f.relative_to(proto_dir).parent
        package_dir.joinpath("__init__.py").touch()
        written.extend(package_dir.glob(f.stem + "_pb2*.py*"))
    return sorted(written)


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT):
        print(path)
