"""One figure comparing runs: loss, λ, active dimensions and retrieval quality over optimizer steps, and beside them
retrieval quality against its cost in FLOPS."""

from __future__ import annotations

from pathlib import Path

from spladectl.errors import SpladectlError
from spladectl.runs.quality import final_evaluation, quality_path
from spladectl.runs.record import RunRecord
from spladectl.runs.summary import read_jsonl

INSTALL_HINT = "pip install 'spladectl[plots]' (matplotlib)"
# max/min of the FLOPS shown beyond which the axis is logarithmic: a linear one would crush the sparse runs together
LOG_RANGE = 10


def plot_runs(records: list[RunRecord], path: str | Path, *, labels: list[str] | None = None,
              eval_metric: str = "nDCG@10", title: str | None = None) -> Path:
    """Write the figure to `path` (the format follows its extension: png, svg, pdf). Query curves are solid and
    document curves dashed; evaluations are points joined by lines (the demo's held-out before/after at the first
    and last step). The right-hand panel puts `eval_metric` against FLOPS."""
    fig = build_figure(records, labels=labels, eval_metric=eval_metric, title=title)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    except (OSError, ValueError) as exc:  # a directory we cannot write, or an extension matplotlib has no writer for
        raise SpladectlError(f"{path}: cannot write the plot ({exc})",
                             hint="give a writable path ending in .png, .svg or .pdf") from exc
    return path


def build_figure(records: list[RunRecord], *, labels: list[str] | None = None, eval_metric: str = "nDCG@10",
                 title: str | None = None):
    """The matplotlib Figure plot_runs saves; its axes are labelled "loss", "lambda", "dims", "eval", "quality"."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise SpladectlError("plots need matplotlib, which is not installed", hint=INSTALL_HINT) from exc

    labels = labels or [r.point or r.id for r in records]
    fig = Figure(figsize=(18, 8.5), layout="constrained")
    axes = fig.subplot_mosaic([["loss", "lambda", "quality"], ["dims", "eval", "quality"]])
    loss_ax, lambda_ax, dims_ax, eval_ax = (axes[name] for name in ("loss", "lambda", "dims", "eval"))
    for name, ax in axes.items():
        ax.set_label(name)
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
    _quality_panel(axes["quality"], records, labels, colors, eval_metric)
    if title:
        fig.suptitle(title)
    return fig


def _quality_panel(ax, records, labels, colors, metric: str) -> None:
    """Each run's evaluations as a path through (FLOPS, metric) in step order, its final evaluation a labelled dot:
    up and to the left is better. FLOPS spread over orders of magnitude across λ, hence a log axis when it does."""
    flops = []
    for record, label, color in zip(records, labels, colors):
        path = quality_path(record, metric)
        flops += [x for x, _ in path]
        if len(path) > 1:
            ax.plot([x for x, _ in path], [y for _, y in path], color=color, alpha=0.45, marker=".", linewidth=1)
        final = final_evaluation(record)
        values = final[2] if final else {}
        x, y = values.get("avg_flops"), values.get(metric)
        if x is None or y is None:
            continue
        ax.scatter([x], [y], color=color, s=60, edgecolors="black", zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize="small")
        flops.append(x)
    if flops and min(flops) > 0 and max(flops) / min(flops) >= LOG_RANGE:
        ax.set_xscale("log")
    title = f"{metric} against FLOPS" + ("" if flops else ": no evaluations with FLOPS")
    ax.set(title=title, xlabel="average FLOPS per query-document pair (avg_flops)", ylabel=metric)
    ax.margins(0.15)  # room for the labels of the outermost runs
    ax.grid(alpha=0.3)


def _line(ax, steps, values, color, style, label) -> None:
    pairs = [(s, v) for s, v in zip(steps, values) if s is not None and v is not None]
    if pairs:
        ax.plot([s for s, _ in pairs], [v for _, v in pairs], color=color, linestyle=style, label=label)
