"""The bench's table and plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spladectl.errors import SpladectlError


def _si(value: float | None, unit: str = "FLOP/s") -> str:
    if value is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _rounds(row: dict[str, Any]) -> str:
    n = row.get("rounds", 1)
    return f", medians of {n} rounds run in turn" if n > 1 else ""


def _spread(row: dict[str, Any]) -> str:
    samples = row.get("matmul_peaks_flops_per_s") or []
    if len(samples) < 2:
        return ""
    return f" ({min(samples) / 1e9:.0f}–{max(samples) / 1e9:.0f})"


def render_table(rows: list[dict[str, Any]], console) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    ok = [r for r in rows if r["status"] == "ok"]
    first = ok[0] if ok else rows[0]
    caption = None
    if ok:
        extras = [text for text, on in (("encoder compiled", first.get("compile")),
                                        ("gradient checkpointing", first.get("gradient_checkpointing")),
                                        (f"gradient caching in chunks of {first.get('grad_cache_chunk')} texts",
                                         first.get("grad_cache_chunk"))) if on]
        caption = (f"{first['model']}, batch {first['batch_size']}, query/doc ≤ {first['max_query_length']}/"
                   f"{first['max_doc_length']} tokens, {_threads(first['threads'])}, median of {first['steps']} steps "
                   f"after {first['warmup']} warm-up" + _rounds(first) + "; " + "; ".join([first["optimizer"], *extras]))
    table = Table(title=f"spladectl bench on {first['device']}", caption=caption, box=box.SIMPLE_HEAD)
    show_max = any("max_batch_size" in r for r in ok)
    columns = ["precision", "step (s)", "examples/s", "speed-up", f"peak {ok[0]['memory_kind'] if ok else 'memory'}",
               "GFLOP/step", "achieved", "of peak"] + (["max batch"] if show_max else [])
    for name in columns:
        table.add_column(name, justify="left" if name == "precision" else "right", no_wrap=True,
                         min_width=10 if name == "precision" else None)
    for r in rows:
        if r["status"] != "ok":
            table.add_row(r["precision"], r["status"], *[""] * (len(columns) - 2))
            continue
        cells = [r["precision"], f"{r['median_step_s']:.3f}", f"{r['examples_per_s']:.2f}",
                 "-" if r["speedup"] is None else f"{r['speedup']:.2f}×", f"{r['peak_memory_gb']:.2f} GiB",
                 f"{r['step_flops'] / 1e9:.0f}" + ("" if r["flops_source"] == "FlopCounterMode" else " (est.)"),
                 _si(r["achieved_flops_per_s"]), f"{100 * r['matmul_share']:.0f}%"]
        if show_max:
            best = r.get("max_batch_size")
            cells.append("-" if best is None else str(best))
        table.add_row(*cells)
    console.print(table)
    for r in rows:
        if r["status"] != "ok":
            console.print(Text(f"{r['precision']} {r['status']}: {r['reason']}"))
    if ok:
        peaks = ", ".join(f"{r['precision']} {_si(r['matmul_peak_flops_per_s'])}{_spread(r)}" for r in ok)
        console.print(f"of peak = each step's FLOP/s ÷ the matmul peak of this {first['device']} "
                      f"({_threads(first['threads'])}) sampled right after it, median over the steps; peaks: {peaks}")
        busy = [r for r in ok if r["device"] == "cpu" and r["cpu_utilisation"] < 0.75]
        if busy:
            worst = min(r["cpu_utilisation"] for r in busy)
            console.print(f"warning: the timed steps got as little as {100 * worst:.0f}% of the CPU time of their "
                          f"{_threads(first['threads'])}: other processes are using this machine, so the timings "
                          "are noisy")
        for r in ok:
            if "max_batch_size" in r:
                console.print(f"max batch ({r['precision']}): the largest batch whose step stayed within "
                              f"{r['memory_budget_gb']:.2f} GiB of {r['memory_kind']}, from "
                              f"{len(r['max_batch_probes'])} probes" + (" (none fitted)" if r["max_batch_size"] is None
                                                                        else ""))
        tok = first["tokenize_s"]
        where = {"prefetch thread": "in a prefetch thread, overlapping the step (dataloader workers 0)",
                 "training thread": "inside the step, in the training thread (CPU device, dataloader workers 0)",
                 }.get(first["tokenize_in"], "in dataloader workers")
        console.print(f"tokenizing one batch: {1e3 * tok:.1f} ms, {where}")
    for r in ok:
        if r.get("note"):
            console.print(f"{r['precision']}: {r['note']}")
        if r.get("step_breakdown"):
            breakdown = r["step_breakdown"]
            for key, title in (("phases", "phase"), ("kinds", "kind")):
                table = Table(title=f"one {r['precision']} step ({1e3 * breakdown['step_s']:.0f} ms), by {title}",
                              box=box.SIMPLE_HEAD)
                for name in (title, "ms", "share"):
                    table.add_column(name, justify="left" if name == title else "right")
                for part in breakdown[key]:
                    table.add_row(Text(part[title]), f"{part['ms']:.1f}", f"{100 * part['share']:.1f}%")
                console.print(table)
        if r.get("top_ops"):
            top = Table(title=f"top ops of one {r['precision']} step (self time)", box=box.SIMPLE_HEAD)
            for name in ("op", "self ms", "share", "calls"):
                top.add_column(name, justify="left" if name == "op" else "right")
            for op in r["top_ops"]:
                top.add_row(Text(op["op"]), f"{op['self_ms']:.1f}", f"{100 * op['share']:.1f}%", str(op["calls"]))
            console.print(top)


def plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Bars of examples/s and peak memory per precision, written to `path` (PNG, SVG, PDF by suffix)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SpladectlError("--plot needs matplotlib", hint="pip install 'spladectl[bench]'") from exc
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        raise SpladectlError("--plot: no precision ran, nothing to plot")
    names = [r["precision"] for r in ok]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    bars = left.bar(names, [r["examples_per_s"] for r in ok], color="#4C72B0")
    left.bar_label(bars, labels=[f"{r['examples_per_s']:.1f}" + ("" if r["speedup"] is None else
                                                                   f"\n{r['speedup']:.2f}×") for r in ok])
    left.set_ylabel("examples/s")
    left.set_title("throughput")
    bars = right.bar(names, [r["peak_memory_gb"] for r in ok], color="#DD8452")
    right.bar_label(bars, labels=[f"{r['peak_memory_gb']:.2f}" for r in ok])
    right.set_ylabel(f"peak {ok[0]['memory_kind']} (GiB)")
    right.set_title("memory")
    for axis in (left, right):
        axis.margins(y=0.2)
    fig.suptitle(f"spladectl bench: {ok[0]['model']}, batch {ok[0]['batch_size']}, {ok[0]['device']}")
    fig.tight_layout()
    path = Path(path)
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise SpladectlError(f"--plot: cannot write {path} ({exc.strerror or exc})") from exc
    finally:
        plt.close(fig)
    return path
