"""One training per run directory: RUN_DIR/.lock, held with an exclusive `flock` for as long as a process trains there.

The kernel drops a flock when its process dies, kill -9 included, so a lock left by a killed run is never mistaken
for a live one, and the file's text (pid, host, start time) only serves the message of the run that is refused. The
file stays after the run (empty); only the flock on it means anything. On a
system without `fcntl` (Windows) the recorded pid is checked instead, which cannot see past this host.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from spladectl.errors import SpladectlError

LOCK_FILE = ".lock"
# A probe by `runs list` holds a shared lock for microseconds; a starting run retries over this long before refusing.
_RETRY_SECONDS = 0.5


class RunLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> dict[str, Any] | None:
        """Claim the directory, or raise SpladectlError naming the process that has it. Returns the owner a killed
        run left in the file (a stale lock, now taken over), else None."""
        previous = read_owner(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + _RETRY_SECONDS
        while not _try_lock(fd, previous):
            if time.monotonic() > deadline:
                os.close(fd)
                raise SpladectlError(
                    f"{self.path.parent}: another spladectl train is using this run directory ({describe(read_owner(self.path))})",
                    hint="wait for it to finish, stop it, or train into another --output-dir",
                )
            time.sleep(0.05)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        self._fd = fd
        return previous

    def release(self) -> None:
        if self._fd is None:
            return
        # The file stays (emptied): deleting it would let a run waiting on the old file and a run creating a new one
        # both believe they hold the directory.
        os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing) for the duration: a short critical section that
    processes sharing a directory take in turn (a sweep's claims). Without fcntl (Windows), no lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: the holder is done within milliseconds
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_owner(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "owner unknown"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since {owner.get('started', '?')}"


def is_held(run_dir: str | os.PathLike) -> bool | None:
    """Whether a live process trains in `run_dir` (None: no lock file, so the caller must judge by other means)."""
    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return None
    if fcntl is None:
        return _pid_alive(read_owner(path))
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        return False
    finally:
        os.close(fd)  # closing drops the probe's shared lock


def _try_lock(fd: int, previous: dict[str, Any] | None) -> bool:
    if fcntl is None:
        return not _pid_alive(previous) or previous.get("pid") == os.getpid()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _pid_alive(owner: dict[str, Any] | None) -> bool:
    if not owner or owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return bool(owner)  # another host's lock cannot be checked from here: assume it is live
    import psutil

    return psutil.pid_exists(owner["pid"])
