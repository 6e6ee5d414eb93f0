"""The client distribution alone: its wheel, built from this repository, installed with its dependencies
into a fresh venv, brings none of the GPU stack and none of the server's packages, and its
`loraserve generate` makes images on the session's running service."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from PIL import Image

from core.config import Settings
from serving.tiny import TinyModel
from tests.conftest import read_image_bytes

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# What the client may depend on (clients/python/pyproject.toml), and what it must not bring.
CLIENT_DEPENDENCIES = {"grpcio", "protobuf", "googleapis-common-protos", "tqdm"}
GPU_STACK = ["torch", "ray", "diffusers", "transformers", "peft", "accelerate"]
SERVER_PACKAGES = ["core", "gateway", "serving", "storage", "entrypoints"]

# Run by the venv's interpreter, outside the checkout: imports every module of the client, and reads
# which grpcio and protobuf the generated stubs were made for (they refuse older ones at import).
INSPECT = """
import importlib, importlib.metadata, importlib.util, json, pkgutil, re, sys
from pathlib import Path
import loraserve
modules = sorted(m.name for m in pkgutil.walk_packages(loraserve.__path__, "loraserve."))
for name in modules:
    importlib.import_module(name)
from loraserve.v1 import generation_pb2_grpc, types_pb2
gencode = re.search(r"Domain.PUBLIC,\\s*(\\d+),\\s*(\\d+),\\s*(\\d+),", Path(types_pb2.__file__).read_text())
print(json.dumps({
    "modules": modules,
    "requires": importlib.metadata.requires("loraserve-client") or [],
    "generated": {"grpcio": generation_pb2_grpc.GRPC_GENERATED_VERSION, "protobuf": ".".join(gencode.groups())},
    "found": [m for m in json.loads(sys.argv[1]) if importlib.util.find_spec(m) is not None],
    "loaded": sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[1]))),
}))
"""


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # Nothing of the test environment leaks in: no PYTHONPATH, and the checkout is not the working folder.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _check(result: subprocess.CompletedProcess[str]) -> str:
    if result.returncode != 0:
        command = " ".join(str(arg) for arg in result.args[:3])
        pytest.fail(f"{command} ... failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (no system site-packages) holding the client wheel and what it declares, from PyPI."""
    work = tmp_path_factory.mktemp("client-wheel")
    # The build writes the stubs, build/ and egg-info into its source folder: a copy, so the checkout's
    # stubs (imported by the tests running beside this one) stay as they are.
    source = work / "src"
    shutil.copytree(REPO / "proto", source / "proto")
    shutil.copytree(
        REPO / "clients" / "python",
        source / "clients" / "python",
        ignore=shutil.ignore_patterns("v1", "*.egg-info", "build", "__pycache__"),
    )
    wheels = work / "wheels"
    _check(_run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                 str(source / "clients" / "python")], work))  # fmt: skip
    (wheel,) = wheels.glob("loraserve_client-*.whl")
    venv = work / "venv"
    _check(_run([sys.executable, "-m", "venv", "--without-pip", str(venv)], work))
    _check(_run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                 "--disable-pip-version-check", str(wheel)], work))  # fmt: skip
    return venv


def test_the_client_installs_alone_without_the_gpu_stack_or_the_server(client_venv: Path) -> None:
    watched = GPU_STACK + SERVER_PACKAGES
    found = json.loads(_check(_run([str(client_venv / "bin" / "python"), "-c", INSPECT, json.dumps(watched)],
                                   client_venv)))  # fmt: skip
    assert found["found"] == [] and found["loaded"] == [], found
    requirements = {r.name: r for r in map(Requirement, found["requires"])}
    assert set(requirements) == CLIENT_DEPENDENCIES
    for name, generated in found["generated"].items():
        floors = [Version(s.version) for s in requirements[name].specifier if s.operator in (">=", "==", "~=")]
        assert floors and max(floors) >= Version(generated), (requirements[name], generated)
    assert {"loraserve.cli", "loraserve.client", "loraserve.v1.generation_pb2_grpc"} <= set(found["modules"])
    # Its `loraserve` has `generate`, and names what to install for the server's commands.
    loraserve = str(client_venv / "bin" / "loraserve")
    help_text = _check(_run([loraserve, "--help"], client_venv))
    assert "{generate}" in help_text and "server commands (serve, gateway" in help_text
    serve = _run([loraserve, "serve"], client_venv)
    assert serve.returncode == 2
    assert "`loraserve serve` comes with the server distribution (loraserve), which is not installed" in serve.stderr
    assert "pip install ./clients/python ." in serve.stderr


async def test_the_client_venvs_generate_makes_images_on_the_service(
    client_venv: Path, target: str, tiny_sdxl: TinyModel, stack_settings: Settings, tmp_path: Path
) -> None:
    out = tmp_path / "images"
    command = [str(client_venv / "bin" / "loraserve"), "generate", "a photo of a red house",
               "--model", str(tiny_sdxl.pipeline_dir), "--lora", f"{tiny_sdxl.lora_paths[0]}:0.8",
               "--seed", "7", "--size", "64x64", "--steps", "2", "--target", target, "--out", str(out)]  # fmt: skip
    result = await asyncio.to_thread(_run, command, client_venv)
    assert result.returncode == 0, result.stderr
    (written,) = out.iterdir()
    assert Image.open(written).size == (64, 64)
    line = next(line for line in result.stdout.splitlines() if line.startswith(str(written)))
    url = line.split()[-1]
    # The file is the image the service stored, fetched from the URL it returned.
    assert written.read_bytes() == read_image_bytes(stack_settings, url)
    assert "seed 7" in result.stdout
