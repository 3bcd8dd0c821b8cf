"""Running an experiment's points one after another, recording each, and ranking them at the end.

A point is claimed by creating its run directory and writing a "running" run.json into it, under an exclusive flock
on RUNS_ROOT/<sweep>/.claims.lock, so several `spladectl sweep --resume` processes sharing a runs root (several GPUs,
or machines on a filesystem with flock) never run the same point twice: without the lock, a process could take a
directory another had just created, before its run.json was written, for a dead attempt and move it aside.
`--shard i/n` splits the points statically instead.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from spladectl.errors import SpladectlError
from spladectl.runs.experiment import Experiment, Point
from spladectl.runs.lock import exclusive
from spladectl.runs.record import RUN_FILE, STALE, RunRecord, load_record, now
from spladectl.runs.summary import lower_is_better, metric_value

SUMMARY_FILE = "summary.json"
CLAIMS_LOCK = ".claims.lock"
PLOT_FILE = "compare.png"


@dataclass
class PointOutcome:
    point: str
    status: str  # finished, failed, interrupted, or: done (finished earlier), taken (another process has it)
    error: str | None = None


def sweep_dir(experiment: Experiment, root: Path) -> Path:
    return root / experiment.name


def check_existing(experiment: Experiment, points: list[Point], root: Path, *, resume: bool) -> None:
    """Before anything runs: without --resume, no point may exist yet; with it, a finished point must have been run
    with the settings it has now (else its results would be ranked under a name that no longer describes them)."""
    base = sweep_dir(experiment, root)
    existing = [p for p in points if (base / p.name).exists()]
    if existing and not resume:
        names = ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise SpladectlError(f"sweep {experiment.name!r} already has {len(existing)} point(s) under {base}: {names}",
                             hint="--resume skips the finished points and retries the others; "
                                  f"`spladectl runs rm {experiment.name}` removes them")
    for point in existing:
        record = _record(base / point.name)
        if record is not None and record.status == "finished" and _json(record.options) != _json(point.settings):
            changed = sorted(k for k in set(record.options) | set(point.settings)
                             if _json(record.options.get(k)) != _json(point.settings.get(k)))
            raise SpladectlError(f"{base / point.name}: finished with other settings ({', '.join(changed)}) than "
                                 f"{experiment.path} gives point {point.name!r} now",
                                 hint="rename the experiment, or remove that run to redo it")


def run_points(experiment: Experiment, points: list[Point], root: Path, *,
               run_point: Callable[[Point, Path], None], log: Callable[[str], None]) -> list[PointOutcome]:
    """Run each point not finished yet via `run_point(point, run_dir)`; a failed point is recorded and the sweep
    goes on. Ctrl-C stops the sweep after recording the point as interrupted."""
    base = sweep_dir(experiment, root)
    base.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for i, point in enumerate(points, 1):
        run_dir = base / point.name
        label = f"[{i}/{len(points)}] {point.name}"
        with exclusive(base / CLAIMS_LOCK):  # one claim at a time: read, move aside, create, record
            claimed = _claim(run_dir, experiment, point, root)
        if claimed is not True:
            log(f"{label}: {claimed}")
            outcomes.append(PointOutcome(point.name, "done" if claimed.startswith("finished") else "taken"))
            continue
        log(f"{label}: starting")
        try:
            run_point(point, run_dir)
        except KeyboardInterrupt:
            settle(run_dir, "interrupted", "interrupted (Ctrl-C)")
            outcomes.append(PointOutcome(point.name, "interrupted"))
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of one point is that point's, the sweep goes on
            from spladectl.runs.lifecycle import describe_error

            error = describe_error(exc)
            settle(run_dir, "failed", error)
            log(f"{label}: failed: {error.splitlines()[0]}")
            outcomes.append(PointOutcome(point.name, "failed", error))
            continue
        outcomes.append(PointOutcome(point.name, "finished"))
    return outcomes


def _claim(run_dir: Path, experiment: Experiment, point: Point, root: Path) -> bool | str:
    """True when this process now owns the point; else why not ("finished earlier", "running in ...")."""
    record = _record(run_dir)
    if record is not None:
        status = record.effective_status()
        if status == "finished":
            return "finished earlier, skipped"
        if status == "running":
            return f"running in another process (pid {record.pid} on {record.host}), skipped"
    if run_dir.exists():
        # A failed, interrupted or stale attempt: move it aside atomically, so two processes never both retry it.
        aside = run_dir.with_name(f".retry-{run_dir.name}-{secrets.token_hex(4)}")
        try:
            os.rename(run_dir, aside)
        except OSError:
            return "taken by another process, skipped"
        shutil.rmtree(aside, ignore_errors=True)
    try:
        run_dir.mkdir()
    except FileExistsError:
        return "taken by another process, skipped"
    from spladectl.runs.store import run_id_for

    RunRecord(id=run_id_for(run_dir, root), dir=str(run_dir.resolve()), sweep=experiment.name, point=point.name,
              options=dict(point.settings), runs_root=str(root.resolve())).save()
    return True


def settle(run_dir: Path, status: str, error: str) -> None:
    """A point that failed before its run began (an option click refused, an unknown tracker) still says why."""
    record = _record(run_dir)
    if record is not None and record.status == "running":
        record.status, record.error, record.ended = status, error, now()
        record.save()


def _record(run_dir: Path) -> RunRecord | None:
    if not (run_dir / RUN_FILE).is_file():
        return None
    try:
        return load_record(run_dir)
    except SpladectlError:
        return None


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def summarize_sweep(experiment: Experiment, root: Path, *, metric: str | None = None,
                    lower: bool | None = None) -> dict[str, Any]:
    """Every point of the experiment (whoever ran it) with its status, ranked by `metric` among finished ones."""
    base = sweep_dir(experiment, root)
    records = {p.name: _record(base / p.name) for p in experiment.points}
    finished = [r for r in records.values() if r is not None and r.status == "finished"]
    if metric is None:
        metric = experiment.metric or ("nDCG@10" if any("nDCG@10" in r.final_metrics for r in finished) else "loss")
    if lower is None:
        lower = lower_is_better(metric)
    rows = []
    for point in experiment.points:
        record = records[point.name]
        rows.append({
            "point": point.name, "run": f"{experiment.name}/{point.name}",
            "status": record.effective_status() if record is not None else "pending",
            "value": metric_value(record, metric) if record is not None else None,
            "steps": record.steps if record is not None else None,
            "duration_s": record.duration_s if record is not None else None,
            "error": record.error if record is not None else None,
            "settings": point.varied, "dir": str(base / point.name),
        })
    ranked = sorted((r for r in rows if r["status"] == "finished" and r["value"] is not None),
                    key=lambda r: r["value"] if lower else -r["value"])
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    rest = [r for r in rows if "rank" not in r]
    for row in rest:
        row["rank"] = None
    return {"sweep": experiment.name, "file": str(experiment.path), "metric": metric, "lower_is_better": lower,
            "points": ranked + rest,
            "counts": {status: sum(r["status"] == status for r in rows)
                       for status in ("finished", "failed", "interrupted", "running", STALE, "pending")}}


def write_summary(summary: dict[str, Any], experiment: Experiment, root: Path) -> Path:
    path = sweep_dir(experiment, root) / SUMMARY_FILE
    tmp = path.with_name(f".{SUMMARY_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
