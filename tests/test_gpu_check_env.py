"""scripts/gpu_check.sh on the GPU machine: its steps import with only the image's packages and the wheels it carries.

Nothing can be installed there, so a module-level import of a package that the image lacks and
WHEELS does not carry fails every step of the one run a lent GPU gives. Here the steps' imports
run in a Python that sees only those distributions (and what the image's own packages need, by
this environment's metadata, since the image holds its packages' needs): `python -S` with a
folder of links to their files, as `pip install --target` leaves the wheels there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path, PurePath

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
IMAGE = ROOT / "scripts" / "gpu_image_packages.txt"


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def carried_wheels() -> set[str]:
    match = re.search(r'^WHEELS="([^"]*)"', SCRIPT.read_text(encoding="utf-8"), re.MULTILINE)
    assert match, "scripts/gpu_check.sh has no WHEELS=\"...\" line"
    return {_name(name) for name in match.group(1).split()}


def cuda_test_files() -> list[str]:
    """The files the script's test step runs: those holding its grep pattern."""
    match = re.search(r'grep -rl "([^"]+)" tests', SCRIPT.read_text(encoding="utf-8"))
    assert match, "scripts/gpu_check.sh no longer finds its CUDA tests by grep"
    return sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").rglob("test_*.py") if match.group(1) in path.read_text())


def image_packages() -> set[str]:
    lines = IMAGE.read_text(encoding="utf-8").splitlines()
    return {_name(line) for line in lines if line.strip() and not line.startswith("#")}


def installed() -> dict[str, metadata.Distribution]:
    return {_name(dist.metadata["Name"]): dist for dist in metadata.distributions()}


def with_their_needs(names: set[str], dists: dict[str, metadata.Distribution]) -> set[str]:
    """The packages and, recursively, what they require here (extras left out)."""
    found: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        dist = dists.get(name)
        for line in (dist.requires or []) if dist is not None else []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(_name(requirement.name))
    return found


def linked_site(folder: Path, allowed: set[str], dists: dict[str, metadata.Distribution]) -> Path:
    """A folder holding links to the files of only the `allowed` distributions (modules and metadata)."""
    folder.mkdir()
    for name, dist in dists.items():
        if name not in allowed:
            continue
        tops = {PurePath(str(file)).parts[0] for file in dist.files or ()}
        for top in tops - {"..", "__pycache__"}:
            source = Path(str(dist.locate_file(top)))
            target = folder / top
            if source.exists() and not target.exists():
                target.symlink_to(source)
    return folder


def test_the_gpu_checks_steps_import_with_only_the_images_packages_and_the_carried_wheels(tmp_path: Path) -> None:
    dists = installed()
    wheels = carried_wheels()
    # The wheels go in with --no-deps: their own needs must be on the image or carried too.
    allowed = with_their_needs(image_packages() - wheels, dists) | wheels
    site = linked_site(tmp_path / "site", allowed, dists)
    cuda_tests = cuda_test_files()
    assert cuda_tests, "no CUDA-marked test found"
    # What the script's steps import: the two benchmarks, the table, and the CUDA tests as its pytest collects them.
    code = (
        "import sys, pytest, bench.gpu, bench.gpu_flux, bench.gpu_check\n"
        "sys.exit(pytest.main(['-p', 'pytest_asyncio.plugin', '-p', 'pytest_timeout', '--collect-only', '-q',"
        " '-p', 'no:cacheprovider', '-m', 'cuda', '-o', 'addopts=', *sys.argv[1:]]))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), str(ROOT / "clients" / "python")]),
        "HF_HUB_OFFLINE": "1",
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }
    result = subprocess.run(
        [sys.executable, "-S", "-c", code, *cuda_tests], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (
        "a step of scripts/gpu_check.sh imports what the GPU image lacks (add it to WHEELS):\n"
        + result.stdout[-3000:]
        + result.stderr[-3000:]
    )
