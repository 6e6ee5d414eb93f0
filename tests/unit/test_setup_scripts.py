"""The set-up scripts on machines unlike the project's own: scripts/machine.sh's checks run with a
PATH that holds only stand-ins, so each case decides what this "machine" has (apt-get, root, a GPU,
promtool, PostgreSQL, Node.js) and every call to a stand-in is recorded."""

from __future__ import annotations

import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASH = str(Path(shutil.which("bash") or "/bin/bash").resolve())


@dataclass
class Machine:
    bin_dir: Path
    log: Path

    def tool(self, name: str, body: str = "exit 0") -> None:
        """A stand-in on PATH that records its arguments, then runs `body`."""
        path = self.bin_dir / name
        path.write_text(f'#!{BASH}\necho "{name} $*" >> "{self.log}"\n{body}\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    def calls(self, name: str) -> list[str]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [line for line in lines if line.split(" ", 1)[0] == name]

    def run(self, script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BASH, "-c", f"set -euo pipefail; . scripts/machine.sh; {script}", "machine", *args],
            cwd=ROOT,
            env={"PATH": str(self.bin_dir), "HOME": str(self.bin_dir), **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    """Linux, a user other than root, no apt-get, no GPU, none of the tests' tools; a Python whose
    PostgreSQL probe fails until a file says a server was installed, and whose pip installs nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    found = tmp_path / "postgres-installed"
    machine = Machine(bin_dir, tmp_path / "calls.log")
    machine.tool("id", "echo 1000")
    machine.tool("uname", "echo Linux")
    machine.tool("python", f'case "$1" in -c) [ -e "{found}" ] ;; *) exit 1 ;; esac')
    return machine


def test_a_user_without_apt_is_told_each_missing_tool_and_nothing_runs_apt(machine: Machine) -> None:
    machine.tool("apt-get")  # present, but only root may use it
    result = machine.run('test_tools "$1"', str(machine.bin_dir / "python"))
    assert result.returncode == 1, result
    assert "which are not installed (apt-get cannot install them here: that needs apt-get and root):" in result.stderr
    missing = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    named = ("  - promtool (Prometheus' rule checker)", "  - a PostgreSQL server (", "  - Node.js with npm")
    assert len(missing) == 3 and all(line.startswith(name) for line, name in zip(missing, named)), result.stderr
    assert machine.calls("apt-get") == []
    # As a user other than root it tried pip's PostgreSQL before giving up.
    assert "python -m pip install -q pgserver" in machine.calls("python")
    assert "pip could not install pgserver" in result.stderr


def test_root_without_apt_names_the_missing_tools(machine: Machine) -> None:
    machine.tool("id", "echo 0")
    machine.tool("promtool")
    machine.tool("node")
    machine.tool("npm")
    result = machine.run('test_tools "$1"', str(machine.bin_dir / "python"))
    assert result.returncode == 1, result
    missing = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(missing) == 1 and missing[0].startswith("  - a PostgreSQL server (initdb, pg_ctl, postgres, pg_isready)")
    # The server refuses to run as root, so pip's build is not tried as root.
    assert [call for call in machine.calls("python") if " -m pip" in call] == []


def test_root_with_apt_installs_what_is_missing(machine: Machine, tmp_path: Path) -> None:
    machine.tool("id", "echo 0")
    made = " ".join(
        f'printf "#!{BASH}\\n" > "{machine.bin_dir}/{name}"; /bin/chmod +x "{machine.bin_dir}/{name}";'
        for name in ("promtool", "node", "npm")
    )
    machine.tool("apt-get", f'if [ "$1" = install ]; then {made} : > "{tmp_path}/postgres-installed"; fi')
    result = machine.run('test_tools "$1"', str(machine.bin_dir / "python"))
    assert result.returncode == 0, result
    assert machine.calls("apt-get") == [
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends prometheus postgresql nodejs npm",
    ]


def test_present_tools_install_nothing(machine: Machine, tmp_path: Path) -> None:
    machine.tool("id", "echo 0")
    machine.tool("apt-get")
    for name in ("promtool", "node", "npm"):
        machine.tool(name)
    (tmp_path / "postgres-installed").touch()
    result = machine.run('test_tools "$1"', str(machine.bin_dir / "python"))
    assert result.returncode == 0, result
    assert machine.calls("apt-get") == []


@pytest.mark.parametrize(
    ("system", "gpu", "chosen"),
    [
        ("Linux", False, "torch --index-url https://download.pytorch.org/whl/cpu"),
        ("Linux", True, "torch"),
        ("Darwin", False, "torch"),
    ],
)
def test_torch_is_chosen_for_the_machine(machine: Machine, system: str, gpu: bool, chosen: str) -> None:
    machine.tool("uname", f"echo {system}")
    machine.tool("pip", "exit 1")  # no torch build without an index
    if gpu:
        machine.tool("nvidia-smi", 'echo "GPU 0: NVIDIA H100"')
    result = machine.run('torch_args "$1"', str(machine.bin_dir / "pip"))
    assert (result.returncode, result.stdout.strip()) == (0, chosen), result


def test_a_torch_build_on_disk_is_the_fast_path(machine: Machine) -> None:
    machine.tool("pip", "exit 0")
    machine.tool("nvidia-smi", 'echo "GPU 0: NVIDIA H100"')
    result = machine.run('torch_args "$1"', str(machine.bin_dir / "pip"))
    assert result.stdout.strip() == "torch==2.13.0", result
    assert machine.calls("pip") == ["pip install -q --dry-run --no-index --no-deps torch==2.13.0"]


def test_torch_choice_can_be_forced_and_a_wrong_one_is_named(machine: Machine) -> None:
    machine.tool("pip", "exit 0")
    forced = machine.run('torch_args "$1"', str(machine.bin_dir / "pip"), env={"LORASERVE_TORCH": "cpu"})
    assert forced.stdout.strip() == "torch --index-url https://download.pytorch.org/whl/cpu", forced
    assert machine.calls("pip") == []
    wrong = machine.run('torch_args "$1"', str(machine.bin_dir / "pip"), env={"LORASERVE_TORCH": "rocm"})
    assert wrong.returncode == 1
    assert "LORASERVE_TORCH=rocm is neither cpu nor cuda" in wrong.stderr


def test_install_names_a_python_too_old(machine: Machine) -> None:
    machine.tool("dirname", 'echo "${1%/*}"')
    machine.tool("old-python", 'case "$1" in -V) echo "Python 3.9.6" ;; *) exit 1 ;; esac')
    result = subprocess.run(
        [BASH, "scripts/install.sh"],
        cwd=ROOT,
        env={"PATH": str(machine.bin_dir), "PYTHON": "old-python"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result
    assert result.stderr.splitlines() == [
        "loraserve set-up: Python 3.9.6 is too old:",
        "  - Python 3.11 or newer (set PYTHON to use another interpreter)",
    ]
    assert [call.split(" ")[1] for call in machine.calls("old-python")] == ["-c", "-V"]

