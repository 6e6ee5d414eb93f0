"""One gateway per SQLite data dir: a second one (a rolling update, a stray start) is refused.

SQLite's queue has no leases another process could respect: a second gateway on the same
file would requeue the first one's running requests and run them twice. An exclusive
`flock` on a file in the data dir is released by the kernel when the holder dies, so a
SIGKILLed gateway never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class DataDirLocked(RuntimeError):
    pass


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "gateway.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise DataDirLocked(
                f"another gateway ({holder}) is using the data dir {self.path.parent}; one gateway per SQLite "
                "data dir — stop it first, or run several gateways on PostgreSQL (store_url)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
