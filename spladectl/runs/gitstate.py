"""The git state (commit, branch, uncommitted changes) of the directories a run depends on, when they are in a repo."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any


def git_state(path: str | Path) -> dict[str, Any] | None:
    """{"root", "commit", "branch", "dirty"} of the repository holding `path`, or None (no git, not a repo)."""
    path = Path(path)
    where = path if path.is_dir() else path.parent
    if not where.is_dir():
        return None
    root = _git(where, "rev-parse", "--show-toplevel")
    if root is None:
        return None
    commit = _git(where, "rev-parse", "HEAD")  # None in a repository without commits
    branch = _git(where, "rev-parse", "--abbrev-ref", "HEAD")
    # Tracked files only: untracked outputs (runs/, caches) would make every working copy look dirty.
    status = _git(where, "status", "--porcelain", "--untracked-files=no")
    return {"root": root, "commit": commit, "branch": branch, "dirty": bool(status) if status is not None else None}


def _git(cwd: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # git missing, or hanging on a network filesystem
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def run_git_state(paths: dict[str, str | None]) -> dict[str, Any]:
    """git_state of each named path (the working directory, the data, ...) that lies inside a repository."""
    out = {}
    for name, path in paths.items():
        if path:
            state = git_state(path)
            if state is not None:
                out[name] = state
    return out
