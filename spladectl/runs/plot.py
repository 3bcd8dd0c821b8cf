"""One figure comparing runs over optimizer steps: loss, λ, active dimensions and retrieval quality."""

from __future__ import annotations

from pathlib import Path

from spladectl.errors import SpladectlError
from spladectl.runs.record import RunRecord
from spladectl.runs.summary import read_jsonl

INSTALL_HINT = "pip install 'spladectl[plots]' (matplotlib)"


def plot_runs(records: list[RunRecord], path: str | Path, *, labels: list[str] | None = None,
              eval_metric: str = "nDCG@10", title: str | None = None) -> Path:
    """Write the figure to `path` (the format follows its extension: png, svg, pdf). Query curves are solid and
    document curves dashed; evaluations are points joined by lines (the demo's held-out before/after at the first
    and last step)."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise SpladectlError("plots need matplotlib, which is not installed", hint=INSTALL_HINT) from exc

    path = Path(path)
    labels = labels or [r.point or r.id for r in records]
    fig = Figure(figsize=(12, 8.5), layout="constrained")
    (loss_ax, lambda_ax), (dims_ax, eval_ax) = fig.subplots(2, 2)
    colors = [f"C{i % 10}" for i in range(len(records))]
    evaluated = False
    for record, label, color in zip(records, labels, colors):
        rows = read_jsonl(record.path / "metrics.jsonl")
        steps = [r.get("step") for r in rows]
        _line(loss_ax, steps, [r.get("loss") for r in rows], color, "-", label)
        _line(lambda_ax, steps, [r.get("lambda_q") for r in rows], color, "-", label)
        _line(lambda_ax, steps, [r.get("lambda_d") for r in rows], color, "--", None)
        _line(dims_ax, steps, [r.get("query_dims") for r in rows], color, "-", label)
        _line(dims_ax, steps, [r.get("doc_dims") for r in rows], color, "--", None)
        points = [(e.get("step"), e.get(eval_metric)) for e in read_jsonl(record.path / "eval.jsonl")]
        if record.heldout:
            points = [(0, record.heldout.get("before", {}).get(eval_metric)), *points,
                      (steps[-1] if steps else 0, record.heldout.get("after", {}).get(eval_metric))]
        points = [(s, v) for s, v in points if s is not None and v is not None]
        if points:
            evaluated = True
            eval_ax.plot([s for s, _ in points], [v for _, v in points], color=color, marker="o", label=label)
    loss_ax.set(title="loss", xlabel="optimizer step")
    lambda_ax.set(title="λ (query solid, document dashed)", xlabel="optimizer step")
    dims_ax.set(title="active dimensions (query solid, document dashed)", xlabel="optimizer step")
    eval_ax.set(title=eval_metric if evaluated else f"{eval_metric}: no evaluations", xlabel="optimizer step")
    for ax in (loss_ax, lambda_ax, dims_ax, eval_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    if records:
        loss_ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _line(ax, steps, values, color, style, label) -> None:
    pairs = [(s, v) for s, v in zip(steps, values) if s is not None and v is not None]
    if pairs:
        ax.plot([s for s, _ in pairs], [v for _, v in pairs], color=color, linestyle=style, label=label)
