"""Which experiment trackers a run mirrors to (`--track tensorboard,mlflow`), and where they write by default.

The trackers themselves are the built-in plugins `spladectl.builtin_plugins.track_tensorboard` and
`track_mlflow`; they act when their name is in the run's `track` setting.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from spladectl.errors import SpladectlError

# tracker -> the module it needs (checked before training starts, so a missing package fails in a second)
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
INSTALL_HINT = "pip install 'spladectl[tracking]' (tensorboard, mlflow-skinny with SQLAlchemy and Alembic)"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"


def parse_track(values: list[str] | tuple[str, ...] | str | None) -> list[str]:
    """`--track a,b --track c` (or $SPLADECTL_TRACK="a,b") -> ["a", "b", "c"], checked and installed."""
    if isinstance(values, str):
        values = [values]
    names: list[str] = []
    for value in values or []:
        for name in re.split(r"[,\s]+", str(value).strip().lower()):
            if name and name not in names:
                names.append(name)
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise SpladectlError(f"--track {', '.join(unknown)}: unknown tracker; expected {' or '.join(TRACKERS)}")
    missing = [n for n in names if importlib.util.find_spec(TRACKERS[n]) is None]
    if missing:
        raise SpladectlError(f"--track {', '.join(missing)}: the {' and '.join(TRACKERS[n] for n in missing)} "
                             "package is not installed", hint=INSTALL_HINT)
    return names


def default_mlflow_uri(runs_root: str | Path) -> str:
    """A SQLite database in the runs root, shared by all runs so MLflow can compare them. (MLflow's file store,
    `file:./mlruns`, is in maintenance mode and refuses to open without an opt-in since MLflow 3.x.)"""
    return f"sqlite:///{Path(runs_root).resolve() / MLFLOW_DB}"


def mask_uri(uri: str) -> str:
    """The URI with any user:password@ removed, for run.json and logs."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", uri)
