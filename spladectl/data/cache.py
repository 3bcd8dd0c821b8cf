"""Where derived data (mined negatives, encoded corpora) is cached, and writing it so a crash never leaves half a file.

Caches live beside the dataset, in DATA/.spladectl-cache/, so they travel and get deleted with it; when the dataset
directory is read-only they go to ~/.cache/spladectl/ (or $XDG_CACHE_HOME/spladectl/) instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Callable

from spladectl.paths import user_cache_dir

CACHE_DIR_NAME = ".spladectl-cache"


def cache_dirs(root: str | Path, kind: str, cache_dir: str | Path | None = None) -> list[Path]:
    """Candidate directories, preferred first: the given one alone, else ROOT/.spladectl-cache then the user's."""
    if cache_dir is not None:
        return [Path(cache_dir)]
    root = Path(root)
    fallback = user_cache_dir() / kind
    return [root / CACHE_DIR_NAME, fallback] if writable(root) else [fallback]


def writable(directory: Path) -> bool:
    """Whether we may add files to the directory. Mode bits count too: root passes os.access everywhere, but a
    dataset someone marked read-only (e.g. a shared copy) should stay untouched even then."""
    try:
        mode = directory.stat().st_mode
    except OSError:
        return False
    return os.access(directory, os.W_OK) and bool(mode & 0o222)


def place_tag(root: str | Path) -> str:
    """A short hash of the dataset's absolute path: names in a shared cache directory say which dataset they are for."""
    return hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]


def file_signature(path: Path) -> list:
    stat = path.stat()
    return [path.name, stat.st_size, stat.st_mtime_ns]


def atomic_write(
    directory: Path, name: str, write: Callable[[IO[bytes]], None], *, stale_prefix: str | None = None
) -> bool:
    """Write directory/name through a temporary file and a rename; False (nothing written) when not writable.

    stale_prefix: other files starting with it are older versions of this entry (their inputs changed) and are removed.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(directory / name, write)
    except OSError:
        return False
    if stale_prefix:
        for old in directory.glob(f"{stale_prefix}*"):
            if old.name != name:
                old.unlink(missing_ok=True)
    return True


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` whole or not at all: into `.NAME.*.partial` beside it, synced to disk, then renamed over it.
    Errors (a full disk, say) raise, and leave `path` as it was."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a cache or an output is for everyone who reads its directory
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def recover_staged(out: Path) -> None:
    """After a kill: `out` back from where `staged_directory` had moved it aside, if it is missing; leftovers go."""
    asides = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if asides and not out.exists():
        asides.pop().rename(out)
    for leftover in [*asides, *out.parent.glob(f".{out.name}.partial-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """A directory to fill that becomes `out` only when the block ends without an error: an existing `out` is moved
    aside, replaced, then deleted; the staging directory never outlives the block. A kill between the two renames
    leaves only the copy aside, which `recover_staged(out)` puts back."""
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
        swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def swap_in(staging: Path, out: Path) -> None:
    """Make the filled directory `staging` become `out`: an existing `out` is moved aside, replaced, then deleted (a
    kill between the two renames leaves only the copy aside, which `recover_staged(out)` puts back)."""
    aside = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(aside)
    staging.rename(out)
    shutil.rmtree(aside, ignore_errors=True)
