"""From a run's metrics.jsonl and eval.jsonl to its final and best metrics, throughput and peak memory.

The files are the truth: run.json keeps a copy of this summary (written when the run ends), and `runs show`
recomputes it, so a run that is still going, or was killed, is summarised from what it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Per-step bookkeeping, not results: left out of "final metrics".
_BOOKKEEPING = {"step", "epoch", "lr", "grad_norm", "loss_scale", "skipped", "skipped_steps", "micro_batch",
                "examples", "step_seconds", "examples_per_s", "memory_gb", "candidates", "chance_loss"}
# Evaluation results worth comparing (the rest of an evaluation's dict is timings and counts).
_EVAL_EXTRA = {"avg_query_dims", "avg_doc_dims", "avg_flops"}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file; a missing file is empty and a torn last line (a killed run) is skipped, as is
    any line that is not an object (readers look keys up in every row)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def retrieval_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """nDCG@10, MRR@10, R@100 (any `name@k`) and the sparsity averages of an evaluation."""
    return {k: float(v) for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and ("@" in k or k in _EVAL_EXTRA)}


def lower_is_better(metric: str) -> bool:
    """Losses, regularizer terms, times and memory go down when things improve; retrieval metrics go up.
    Active dimensions count as lower-is-better: at equal quality, sparser is cheaper."""
    name = metric.removeprefix("best_")
    return ("loss" in name or name in {"ranking", "distillation"} or name.startswith(("flops", "l1", "margin", "kl"))
            or name.endswith(("_seconds", "_gb", "_dims")) or name == "duration_s")


def summarize(run_dir: Path, eval_metric: str = "nDCG@10", heldout: dict[str, Any] | None = None) -> dict[str, Any]:
    """steps, examples_seen, final_metrics, best_metrics, throughput and peak_memory_gb of the run in `run_dir`.

    final_metrics: the last step's loss and its terms, λ and active dimensions, plus the last evaluation's retrieval
    metrics (the demo's held-out "after", when given, being the final model's). best_metrics: the lowest loss and
    the best `eval_metric` seen, each with its step, leaving out evaluations of a collapsed model (--on-collapse warn
    trains on, and saves no best model from them). best_model: RUN_DIR/best, the model of the highest such evaluation.
    """
    rows = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    out: dict[str, Any] = {"steps": 0, "examples_seen": 0, "final_metrics": {}, "best_metrics": {},
                           "best_model": None, "throughput": {}, "peak_memory_gb": {}}
    if rows:
        last = rows[-1]
        out["steps"] = int(last.get("step", len(rows)))
        out["examples_seen"] = int(sum(r.get("examples", 0) for r in rows))
        out["final_metrics"] = {k: float(v) for k, v in last.items() if _is_number(v) and k not in _BOOKKEEPING
                                and not k.startswith("mem_")}
        losses = [(r["loss"], r.get("step")) for r in rows if _is_number(r.get("loss"))]
        if losses:
            value, step = min(losses, key=lambda pair: pair[0])
            out["best_metrics"]["loss"] = {"value": float(value), "step": step}
        seconds = sum(r.get("step_seconds", 0.0) for r in rows)
        if seconds > 0:
            out["throughput"] = {"examples_per_s": round(out["examples_seen"] / seconds, 3),
                                 "steps_per_s": round(len(rows) / seconds, 4),
                                 "step_seconds_total": round(seconds, 3)}
        out["peak_memory_gb"] = _peaks(rows)
    final_eval = (heldout or {}).get("after") or (evals[-1] if evals else None)
    out["final_metrics"].update(retrieval_metrics(final_eval))
    scored = [(e[eval_metric], e.get("step")) for e in evals
              if _is_number(e.get(eval_metric)) and not e.get("collapsed")]
    if scored and (run_dir / "best").is_dir():  # the trainer keeps the first highest value there
        value, step = max(scored, key=lambda pair: pair[0])
        out["best_model"] = {"path": str(run_dir / "best"), "step": step, "metric": eval_metric, "value": float(value)}
    if heldout and _is_number((heldout.get("after") or {}).get(eval_metric)):
        scored.append((heldout["after"][eval_metric], out["steps"]))
    if scored:
        pick = min if lower_is_better(eval_metric) else max
        value, step = pick(scored, key=lambda pair: pair[0])
        out["best_metrics"][eval_metric] = {"value": float(value), "step": step}
    return out


def _peaks(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The highest value of each memory key: `memory_gb` is the RSS after each step (always logged), `mem_*_gb`
    the in-step peaks of --memory-tracking."""
    peaks: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if (key == "memory_gb" or (key.startswith("mem_") and key.endswith("_gb"))) and _is_number(value):
                name = "rss_after_step" if key == "memory_gb" else key.removeprefix("mem_").removesuffix("_gb")
                peaks[name] = round(max(peaks.get(name, 0.0), float(value)), 4)
    return peaks


def metric_value(record, metric: str) -> float | None:
    """`metric` of a run for ranking: a final metric by name, `best_<name>` for the best one, or a run field such
    as `duration_s` or `examples_per_s`."""
    if metric.startswith("best_") and metric[5:] in record.best_metrics:
        return record.best_metrics[metric[5:]]["value"]
    if metric in record.final_metrics:
        return record.final_metrics[metric]
    if metric in record.throughput:
        return record.throughput[metric]
    value = getattr(record, metric, None)
    return float(value) if _is_number(value) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
