"""Keeping run.json true whatever happens: "running" from the first moment, then finished, failed (with the error)
or interrupted, with the summary of what the run wrote.

    with ActiveRun(record) as run:
        run.attach_config(config)      # config.toml, profile/precision/device, git state of the data
        run.attach_trainer(trainer)    # plugins see the record as state.extras["run"]
        ...

In a distributed run only rank 0 has an ActiveRun; `explain` lets it record the failure of another rank that stopped
it (its own exception then is only a broken collective or torchrun's SIGTERM).
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from typing import Callable

from spladectl.errors import SpladectlError
from spladectl.runs.gitstate import run_git_state
from spladectl.runs.lock import RunLock, describe
from spladectl.runs.record import RunRecord, now
from spladectl.runs.summary import summarize


class ActiveRun:
    def __init__(self, record: RunRecord, *, facts=None, git_paths: dict[str, str | None] | None = None,
                 explain: Callable[[BaseException], tuple[str, str] | None] | None = None):
        self.record = record
        self.explain = explain  # exception -> (status, error) when the exception is not the cause itself
        self.git_paths = git_paths or {}  # files the run depends on besides the data: an experiment, a profile
        self.facts = facts
        self.config = None
        self.state = None
        self._clock = time.monotonic()

    @property
    def path(self):
        return self.record.path

    def __enter__(self) -> "ActiveRun":
        record = self.record
        _make_run_dir(self.path)
        # Before anything is written: a second run on the same directory must leave the first one's files alone.
        self._lock = RunLock(self.path)
        stale = self._lock.acquire()
        if stale and stale.get("pid") != os.getpid():
            record.warnings.append(f"took over the lock of a run that did not end cleanly ({describe(stale)})")
        record.status, record.error, record.traceback, record.ended = "running", None, None, None
        record.host, record.pid = socket.gethostname(), os.getpid()
        record.git = run_git_state({"cwd": os.getcwd(), **self.git_paths})
        record.save()
        self._write_env_report()
        return self

    def _write_env_report(self) -> None:
        # A run must not fail because its bug-report snapshot could not be taken; it says so instead.
        try:
            from spladectl.hardware import detect
            from spladectl.runs.environment import collect

            report = collect(self.facts if self.facts is not None else detect())
            (self.path / "env.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        except Exception as exc:  # noqa: BLE001
            self.record.warnings.append(f"env report: {type(exc).__name__}: {exc}")

    def attach_config(self, config) -> None:
        """Record the resolved configuration (config.toml is what `train --from-run` re-launches)."""
        self.config = config
        (self.path / "config.toml").write_text(config.to_toml())
        record = self.record
        record.profile, record.precision, record.device = config.profile, config.precision, config.device
        record.git.update(run_git_state({"data": config.data, "eval_data": config.eval_data}))
        record.save()

    def attach_trainer(self, trainer) -> None:
        self.state = trainer.state
        self.state.extras["run"] = self.record
        self.attach_config(trainer.config)  # the trainer may have adjusted it (fewer negatives than asked)

    def __exit__(self, exc_type, exc, tb) -> bool:
        record = self.record
        explained = self.explain(exc) if exc is not None and self.explain is not None else None
        if exc is None:
            record.status = "finished"
        elif explained is not None:
            record.status, record.error = explained
        elif isinstance(exc, KeyboardInterrupt):
            record.status, record.error = "interrupted", "interrupted (Ctrl-C)"
        else:
            record.status, record.error = "failed", describe_error(exc)
            if not isinstance(exc, SpladectlError):  # a bug: keep where it happened
                record.traceback = "".join(traceback.format_exception(exc_type, exc, tb))
        try:
            self.finish()
        finally:
            self._lock.release()
        return False  # the exception goes on to the command, which prints it as it always did

    def finish(self) -> None:
        record = self.record
        eval_metric = self.config.eval_metric if self.config is not None else "nDCG@10"
        summary = summarize(self.path, eval_metric, heldout=record.heldout)
        for key, value in summary.items():
            setattr(record, key, value)
        record.ended = now()
        record.duration_s = round((record.duration_s or 0.0) + time.monotonic() - self._clock, 3)
        record.save()


def _make_run_dir(path) -> None:
    if path.exists() and not path.is_dir():
        raise SpladectlError(f"{path}: exists and is not a directory; a run needs a directory of its own",
                             hint="give --output-dir a new or existing directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpladectlError(f"{path}: cannot create the run directory ({exc.strerror or exc})") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise SpladectlError(f"{path}: the run directory is not writable",
                             hint="choose another --output-dir, or fix its permissions")


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, SpladectlError):
        return exc.format_message()
    format_message = getattr(exc, "format_message", None)  # click's usage errors: "Invalid value for '--x': ..."
    if callable(format_message):
        return format_message()
    return f"{type(exc).__name__}: {exc}"

