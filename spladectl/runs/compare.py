"""Runs side by side: the settings that differ between them, and their metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spladectl.runs.quality import quality_rows
from spladectl.runs.record import RunRecord
from spladectl.runs.summary import summarize

# Differ between any two runs by construction, so they say nothing about why results differ.
_ALWAYS_DIFFERENT = {"output_dir"}


def read_config(run_dir: Path) -> dict[str, Any]:
    """config.toml of a run as a dict ({} when the run failed before its configuration was resolved)."""
    from spladectl._compat import tomllib

    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError:
        return {}


def refreshed(record: RunRecord) -> RunRecord:
    """The record with its summary recomputed from the files (for runs still going, or killed)."""
    eval_metric = read_config(record.path).get("eval_metric", "nDCG@10")
    for key, value in summarize(record.path, eval_metric, heldout=record.heldout).items():
        setattr(record, key, value)
    return record


def compare(records: list[RunRecord]) -> dict[str, Any]:
    """{"runs": ids, "settings": {key: [value per run]} for keys that differ, "metrics": {name: [value per run]},
    "quality": the rows of quality.quality_rows, run after run}.

    A setting missing from a run (it failed before its configuration existed, or an older version did not have it)
    is None; runs without any configuration do not make settings differ.
    """
    configs = [read_config(r.path) for r in records]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    known = [c for c in configs if c]  # a run without config.toml has no settings to differ by
    settings = {k: [c.get(k) for c in configs] for k in keys
                if k not in _ALWAYS_DIFFERENT and len({json.dumps(c.get(k), sort_keys=True) for c in known}) > 1}
    metrics: dict[str, list[Any]] = {
        "status": [r.effective_status() for r in records],
        "steps": [r.steps for r in records],
        "duration_s": [r.duration_s for r in records],
        "examples_per_s": [r.throughput.get("examples_per_s") for r in records],
        "peak_rss_gb": [r.peak_memory_gb.get("rss_peak", r.peak_memory_gb.get("rss_after_step")) for r in records],
    }
    for name in dict.fromkeys(k for r in records for k in r.final_metrics):
        metrics[name] = [r.final_metrics.get(name) for r in records]
    for name in dict.fromkeys(k for r in records for k in r.best_metrics):
        metrics[f"best_{name}"] = [(r.best_metrics.get(name) or {}).get("value") for r in records]
    quality = [row for record, config in zip(records, configs) for row in quality_rows(record, config)]
    return {"runs": [r.id for r in records], "settings": settings, "metrics": metrics, "quality": quality}
