"""Current process memory in every step's metrics (cheap); per-step peaks with --memory-tracking (issue 5)."""

from __future__ import annotations

import psutil

from spladectl.hookspecs import hookimpl

_process = psutil.Process()


@hookimpl
def on_step_end(state, metrics):
    metrics["memory_gb"] = _process.memory_info().rss / 2**30
