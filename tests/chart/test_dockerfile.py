"""The Dockerfile, checked without a Docker daemon: hadolint, its structure against the chart, and the
packages its `pip install ./clients/python .` builds from exactly what .dockerignore lets into the context."""

from __future__ import annotations

import configparser
import fnmatch
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from loraserve.cli import SERVER_COMMANDS
from tests.chart.charttest import CHART, REPO, render, CI_VALUES

DOCKERFILE = REPO / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined.append(pending + stripped)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in joined]


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    if beside.exists():
        return str(beside)
    from tests.conftest import require_tool

    return require_tool("hadolint")


def test_hadolint_passes_and_would_catch_a_root_image(tmp_path: Path) -> None:
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    rooted = tmp_path / "Dockerfile"
    rooted.write_text(DOCKERFILE.read_text() + "USER root\n")
    result = subprocess.run([hadolint(), str(rooted)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3002" in result.stdout


def test_final_stage_runs_as_a_non_root_user_with_the_gateway_as_its_command() -> None:
    steps = instructions(DOCKERFILE.read_text())
    final = steps[max(i for i, (name, _) in enumerate(steps) if name == "FROM") :]
    users = [args for name, args in final if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    (cmd,) = [args for name, args in final if name == "CMD"]
    rendered = render(CI_VALUES[0])
    assert json.loads(cmd) == rendered.gateway_container["command"] == ["loraserve", "gateway"]
    exposed = {int(p) for name, args in final if name == "EXPOSE" for p in args.split()}
    assert {50051, 8080, 6379, 8265, 10001, 8000, 9000, 9500} <= exposed


def test_the_variants_are_the_charts() -> None:
    text = DOCKERFILE.read_text()
    schema = json.loads((CHART / "values.schema.json").read_text())
    variants = schema["properties"]["image"]["properties"]["variant"]["enum"]
    assert variants == ["cpu", "cuda"]
    for variant in variants:
        assert f"{variant}) pip install" in text
    assert "VARIANT must be cpu or cuda" in text


def _context_allows(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; `!` lets a path back in."""
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        raw = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        matched = raw == "**" or any(
            fnmatch.fnmatch(p, raw)
            or fnmatch.fnmatch(p, raw.replace("**/", "*/"))
            or (raw.startswith("**/") and fnmatch.fnmatch(parts[-1], raw.removeprefix("**/")))
            for p in prefixes
        )
        if matched:
            allowed = negate
    return allowed


def _context_files() -> list[str]:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [path for path in tracked if _context_allows(path, patterns)]


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_more() -> None:
    files = _context_files()
    sources = [
        src
        for name, args in instructions(DOCKERFILE.read_text())
        if name == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    ]
    for src in sources:
        assert any(f == src or f.startswith(src.rstrip("/") + "/") for f in files), f"COPY {src}: not in the context"
    assert not [f for f in files if f.startswith(("tests/", "helm/", ".venv/", "bench/", "clients/python/loraserve/v1/"))]


def test_pip_install_of_the_context_builds_the_stubs_in(tmp_path: Path) -> None:
    """What `RUN pip install ./clients/python .` gets: a clean tree (no loraserve/v1) must still install the stubs."""
    context = tmp_path / "context"
    for path in _context_files():
        target = context / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, target)
    assert not (context / "clients" / "python" / "loraserve" / "v1").exists()
    wheels = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
         str(context / "clients" / "python"), str(context)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        pytest.fail(result.stdout + result.stderr)
    (client,) = wheels.glob("loraserve_client-*.whl")
    (server,) = wheels.glob("loraserve-*.whl")
    assert {"loraserve/v1/worker_pb2_grpc.py", "loraserve/v1/generation_pb2.py"} <= set(zipfile.ZipFile(client).namelist())
    with zipfile.ZipFile(server) as wheel:
        assert {"serving/serve_config.py", "entrypoints/cli.py"} <= set(wheel.namelist())
        metadata = wheel.read("loraserve-0.1.0.dist-info/METADATA").decode()
        commands = wheel.read("loraserve-0.1.0.dist-info/entry_points.txt").decode()
    # The server installs the client beside it, and adds its commands to the client's `loraserve`.
    assert "Requires-Dist: loraserve-client==0.1.0" in metadata.splitlines()
    parsed = configparser.ConfigParser()
    parsed.read_string(commands)
    assert set(parsed["loraserve.commands"]) == set(SERVER_COMMANDS)
