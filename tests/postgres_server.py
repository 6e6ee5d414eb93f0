"""A throwaway PostgreSQL server for tests: the real server Debian ships, not a fake.

The store's behaviour that matters (transactions, locks, what survives a restart) is only
worth testing against the server it runs against in production. `find_bin_dir` takes the
server on PATH, else Debian's `postgresql` package, else the pip-installable `pgserver`'s build
(scripts/machine.sh installs one where it can); this starts its binaries on a free loopback port
in a temp dir and removes everything on stop.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

_READY_SECONDS = 60.0
DEFAULT_DATABASE = "loraserve_test"


SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres", "pg_isready")


def _has_server(bin_dir: Path) -> bool:
    return all((bin_dir / name).exists() for name in SERVER_PROGRAMS)


def find_bin_dir() -> Path | None:
    """The folder holding a whole server: PATH's (links followed, as Homebrew's and Debian's
    /usr/local/bin links point into the server's own folder), else Debian's newest (Debian keeps
    each major version apart, off PATH), else pgserver's build inside its Python package."""
    on_path = shutil.which("initdb")
    if on_path is not None and _has_server(Path(on_path).resolve().parent):
        return Path(on_path).resolve().parent
    debian = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if _has_server(Path(p))]
    if debian:
        return max(debian, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "pginstall" / "bin"
        if _has_server(bundled):
            return bundled
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One server process owning a temp data dir; `fresh_database()` isolates each test."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = _free_port()
        self.host = "127.0.0.1"
        self.user = "postgres"
        self._root = Path(tempfile.mkdtemp(prefix="loraserve-pg-"))
        self.data_dir = self._root / "data"
        self._socket_dir = self._root / "sock"
        # The server refuses to run as root, so as root everything runs as `postgres`.
        self._as_root = os.geteuid() == 0
        self._started = False
        self.default_dsn = ""

    def _cmd(self, *args: str) -> list[str]:
        if self._as_root:
            return ["runuser", "-u", "postgres", "--", *args]
        return list(args)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._cmd(*args), check=True, capture_output=True, text=True)

    def start(self) -> None:
        self._socket_dir.mkdir()
        if self._as_root:
            owner = pwd.getpwnam("postgres")
            for path in (self._root, self._socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        options = (
            f"-c listen_addresses={self.host} -c port={self.port} "
            f"-c unix_socket_directories={self._socket_dir} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self._root / "server.log"),
            "-o",
            options,
            "-w",
            "start",
        )
        self._started = True
        self._wait_ready()
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{DEFAULT_DATABASE}"')
        self.default_dsn = self.dsn(DEFAULT_DATABASE)

    def _wait_ready(self) -> None:
        """pg_ctl -w already waits; this confirms TCP answers, since that is what tests use."""
        deadline = time.monotonic() + _READY_SECONDS
        while True:
            probe = subprocess.run(
                [str(self.bin_dir / "pg_isready"), "-h", self.host, "-p", str(self.port), "-U", self.user],
                capture_output=True,
                text=True,
            )
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not become ready: {probe.stdout}{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self) -> str:
        log = self._root / "server.log"
        return log.read_text()[-2000:] if log.exists() else ""

    def dsn(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def fresh_database(self, prefix: str = "loraserve_test") -> str:
        """A new empty database, so tests sharing this server never see each other's rows."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        try:
            if self._started:
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
                self._started = False
        finally:
            shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
