"""run.json: what a run is and how it ended, written atomically so a reader never sees half a file."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spladectl.errors import SpladectlError
from spladectl.runs.lock import is_held

RUN_FILE = "run.json"
# "pruned": a tuning trial that `spladectl tune` stopped early (its model is complete, at the step it was stopped).
STATUSES = ("running", "finished", "failed", "interrupted", "pruned")
# Not written by anyone: a run whose run.json says "running" but whose process, on this host, is gone (killed,
# out of memory, power loss). Reported by readers so that such runs do not look alive forever.
STALE = "stale"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class RunRecord:
    """The contents of RUN_DIR/run.json. Plugins get it as `state.extras["run"]`."""

    id: str
    dir: str
    status: str = "running"
    error: str | None = None  # one line for a user error; "Type: message" for a bug (whose traceback is below)
    traceback: str | None = None
    started: str = field(default_factory=now)
    ended: str | None = None
    duration_s: float | None = None
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    tags: list[str] = field(default_factory=list)
    sweep: str | None = None
    point: str | None = None
    trial: dict[str, Any] | None = None  # a tuning trial's run: {"study", "number", "state", "pruned"} (runs/tuning.py)
    from_run: str | None = None  # the run this one was re-launched from (`train --from-run`)
    resumes: int = 0  # times `--resume` continued this run in its directory
    options: dict[str, Any] = field(default_factory=dict)  # the train options given explicitly (or a sweep point's)
    command: str | None = None
    profile: str | None = None
    precision: str | None = None
    device: str | None = None
    world_size: int = 1  # training processes (torchrun); rank 0 alone writes the run directory
    steps: int = 0
    examples_seen: int = 0
    train_seconds: float | None = None
    throughput: dict[str, float] = field(default_factory=dict)
    peak_memory_gb: dict[str, float] = field(default_factory=dict)
    final_metrics: dict[str, float] = field(default_factory=dict)
    best_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {"value", "step"}
    best_model: dict[str, Any] | None = None  # RUN_DIR/best: {"path", "step", "metric", "value"}, with --eval-every
    heldout: dict[str, dict[str, float]] | None = None  # the demo's held-out quality {"before", "after"}
    git: dict[str, Any] = field(default_factory=dict)
    tracking: dict[str, Any] = field(default_factory=dict)  # where trackers mirrored the run (logdir, MLflow run id)
    warnings: list[str] = field(default_factory=list)
    runs_root: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        # Keys a newer spladectl added are ignored, so an older one can still list those runs.
        return cls(**{k: v for k, v in values.items() if k in known})

    def save(self) -> None:
        """Write run.json atomically (a temporary file renamed over the old one)."""
        path = self.path / RUN_FILE
        tmp = path.with_name(f".{RUN_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        os.replace(tmp, path)

    def effective_status(self) -> str:
        """The status, or STALE for a "running" run whose process on this host no longer exists."""
        if self.status != "running":
            return self.status
        held = is_held(self.path)  # exact wherever the run took its lock, even after pid reuse
        if held is False or (held is None and self.host == socket.gethostname() and not _alive(self.pid)):
            return STALE
        return self.status


def _alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid)


def load_record(run_dir: str | Path) -> RunRecord:
    """The RunRecord of `run_dir`; `dir` is where it is now (runs can be moved or copied)."""
    path = Path(run_dir) / RUN_FILE
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SpladectlError(f"{path}: cannot read the run record ({exc})") from exc
    if not isinstance(values, dict) or "id" not in values:
        raise SpladectlError(f"{path}: not a spladectl run record (no id)")
    record = RunRecord.from_dict(values)
    record.dir = str(Path(run_dir).resolve())
    return record
