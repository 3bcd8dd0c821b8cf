"""Runs: every `spladectl train` is a directory under a runs root, described by its run.json.

    RUNS_ROOT/<id>/               a run (id: UTC timestamp + slug, e.g. 20261201-183012-triples-7c1e)
    RUNS_ROOT/<sweep>/<point>/    a run made by `spladectl sweep` (id: <sweep>/<point>)

A run directory holds run.json (status, timing, tags, summary metrics), config.toml (the resolved TrainConfig,
enough to re-launch it), env.json (the `spladectl env` report), metrics.jsonl, eval.jsonl, checkpoints/, final/ and
best/. `record` reads and writes run.json, `store` finds runs, `summary` turns metrics files into final/best numbers,
`lifecycle` keeps run.json true whatever happens to the run, `compare` and `plot` set runs side by side (`quality`:
their retrieval quality against its cost), `sweep` runs an experiment file's points.
"""

from spladectl.runs.record import RUN_FILE, RunRecord
from spladectl.runs.store import find_run, list_runs, runs_root

__all__ = ["RUN_FILE", "RunRecord", "find_run", "list_runs", "runs_root"]
