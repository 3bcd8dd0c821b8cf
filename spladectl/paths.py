"""Where spladectl keeps what it computes for a user rather than for a run: ~/.cache/spladectl/ (or
$XDG_CACHE_HOME/spladectl/)."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spladectl"
