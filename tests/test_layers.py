"""The import layers (.importlinter), checked with the real `lint-imports`: entry points over gateway/ and
serving/, which never import each other, over storage/, core/ and, at the bottom, the client and the request
model, which imports nothing of the server. A violation fails the suite, naming the import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".importlinter"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` over the packages found in `cwd` first (it looks there before sys.path), then in this
    checkout (bench/ and entrypoints/ are not installed) and where the client distribution is installed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [str(LINT_IMPORTS), str(CONFIG), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_every_import_keeps_to_the_layers() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_import_against_the_layers_is_named(tmp_path: Path) -> None:
    """The contracts are not vacuous: storage/ importing the gateway, in a copy of storage/ found first, fails."""
    shutil.copytree(ROOT / "storage", tmp_path / "storage", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "storage" / "breach.py").write_text("import gateway.errors\n")
    result = lint(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "storage is not allowed to import gateway" in result.stdout
    assert "storage.breach -> gateway.errors" in result.stdout
