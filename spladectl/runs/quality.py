"""Quality against cost: a run's retrieval quality next to the sparsity that paid for it.

The numbers come from the run's own evaluations: the held-out evaluation the train command runs after training
(run.json `heldout.after`) or else the last line of eval.jsonl is the final model's; run.json's `best_metrics` names
the step of the best evaluation, whose line in eval.jsonl is the `best/` model's. Each row says which one it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spladectl.runs.record import RunRecord
from spladectl.runs.summary import read_jsonl

QUALITY = ("nDCG@10", "MRR@10", "R@100")
COST = ("avg_query_dims", "avg_doc_dims", "avg_flops")
COLUMNS = (*QUALITY, *COST)
AFTER_TRAINING = "after training"
EVAL_FILE = "eval.jsonl"


def quality_rows(record: RunRecord, config: dict[str, Any]) -> list[dict[str, Any]]:
    """One row for the final evaluation and one for the best when that is another step; a run never evaluated
    gets a single row of None, so it still shows up beside the others."""
    evals = read_jsonl(record.path / EVAL_FILE)
    data, split = _eval_source(config)
    final = final_evaluation(record, evals)
    metric = config.get("eval_metric", "nDCG@10")
    best = _best_evaluation(record, evals, metric)
    if final is None and best is None:
        return [_row(record, None, None, data, split)]
    if best is None or (final is not None and best[1] == final[1]):
        # The same weights evaluated twice (eval.jsonl's last step and the held-out pass after it) score the same.
        return [_row(record, "final, best" if best else "final", final, data, split, metric=metric)]
    rows = [_row(record, "final", final, data, split)] if final is not None else []
    return [*rows, _row(record, "best", best, data, split, metric=metric)]


def final_evaluation(record: RunRecord, evals: list[dict[str, Any]] | None = None):
    """(origin, step, values) of the final model's evaluation, or None. The held-out pass after training wins over
    eval.jsonl because it sees the model that was saved as `final/`, even when the last step was not evaluated."""
    after = (record.heldout or {}).get("after")
    if after:
        return AFTER_TRAINING, record.steps, after
    evals = read_jsonl(record.path / EVAL_FILE) if evals is None else evals
    if evals:
        return EVAL_FILE, evals[-1].get("step"), evals[-1]
    return None


def quality_path(record: RunRecord, metric: str = "nDCG@10") -> list[tuple[float, float]]:
    """(avg_flops, metric) of every evaluation of the run in step order: before training, during it, after it.
    Evaluations that lack either number (older runs logged no FLOPS) are left out."""
    heldout = record.heldout or {}
    points = [(0, heldout.get("before"))]
    points += [(e.get("step"), e) for e in read_jsonl(record.path / EVAL_FILE)]
    points.append((record.steps, heldout.get("after")))
    ordered = sorted(((s, v) for s, v in points if v and s is not None), key=lambda pair: pair[0])
    return [(float(v["avg_flops"]), float(v[metric])) for _, v in ordered
            if _number(v.get("avg_flops")) and _number(v.get(metric))]


def source_text(row: dict[str, Any]) -> str:
    """`beir/test, step 2, after training`: where a row's numbers come from, for the text table."""
    source = row["source"]
    if source is None:
        return "no evaluation"
    where = "/".join(part for part in (source["data"], source["split"]) if part) or "?"
    return f"{where}, step {source['step'] if source['step'] is not None else '?'}, {source['origin']}"


def _best_evaluation(record: RunRecord, evals: list[dict[str, Any]], metric: str):
    best = record.best_metrics.get(metric)
    if not best:
        return None
    step, value = best.get("step"), best.get("value")
    # A resumed run may have evaluated a step twice; the line holding the recorded value is the best/ model's.
    matches = [e for e in evals if e.get("step") == step]
    line = next((e for e in reversed(matches) if e.get(metric) == value), matches[-1] if matches else None)
    if line is None:  # eval.jsonl lost the line (edited, truncated): run.json still knows the one number
        return "run.json", step, {metric: value}
    return EVAL_FILE, step, line


def _eval_source(config: dict[str, Any]) -> tuple[str | None, str | None]:
    """The evaluation data's name and split, from config.toml; the demo evaluates on its own held-out queries."""
    if config.get("eval_data"):
        return Path(config["eval_data"]).name, config.get("eval_split", "test")
    if config and config.get("data") is None:
        return "demo held-out", "test"
    return None, None


def _row(record, evaluation, found, data, split, *, metric: str | None = None) -> dict[str, Any]:
    origin, step, values = found if found is not None else (None, None, {})
    row: dict[str, Any] = {"run": record.id, "evaluation": evaluation}
    if metric is not None and metric != "nDCG@10" and evaluation and "best" in evaluation:
        row["best_by"] = metric  # "best" means best by --eval-metric, which need not be the first column
    row["source"] = None if origin is None else {"origin": origin, "data": data, "split": split, "step": step}
    row.update({name: float(values[name]) if _number(values.get(name)) else None for name in COLUMNS})
    return row


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
