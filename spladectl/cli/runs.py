"""`spladectl runs list|show|compare|rm`: find, inspect, compare and remove runs.

Everything is read from the run directories (run.json, config.toml, metrics.jsonl, eval.jsonl), so these commands
work on runs copied from another machine too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from spladectl.cli import output
from spladectl.errors import SpladectlError
from spladectl.runs.record import STALE, STATUSES

runs_app = typer.Typer(
    name="runs",
    help="Find, inspect, compare and remove training runs (the directories under the runs root).",
    no_args_is_help=True,
)

RootOption = Annotated[Path, typer.Option("--runs-root", envvar="SPLADECTL_RUNS_ROOT",
                                          help="Where the runs are (default ./runs).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
STATUS_CHOICES = (*STATUSES, STALE)


def register(app: typer.Typer) -> None:
    if not any(group.typer_instance is runs_app for group in app.registered_groups):
        app.add_typer(runs_app, name="runs")


@runs_app.command("list")
def list_runs(
    status: Annotated[list[str], typer.Option("--status", help="Only runs with this status (repeatable): running, finished, failed, interrupted, pruned, stale.")] = [],  # noqa: B006
    profile: Annotated[Optional[str], typer.Option("--profile", help="Only runs with this hardware profile.")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="Only runs in this precision (aliases work: bf16, fp16).")] = None,
    tag: Annotated[list[str], typer.Option("--tag", help="Only runs with this tag (repeatable: all of them).")] = [],  # noqa: B006
    sweep: Annotated[Optional[str], typer.Option("--sweep", help="Only the runs of this sweep.")] = None,
    runs_root: RootOption = Path("runs"),
    as_json: JsonOption = False,
) -> None:
    """List runs, oldest first: status, profile, precision, steps, final loss and nDCG@10, start and duration.

    "stale" is a run whose run.json still says running but whose process on this machine is gone (killed).
    """
    from spladectl.precision import canonical_precision
    from spladectl.runs import list_runs as all_runs

    bad = [s for s in status if s not in STATUS_CHOICES]
    if bad:
        raise SpladectlError(f"--status {', '.join(bad)}: expected one of {', '.join(STATUS_CHOICES)}")
    wanted_precision = canonical_precision(precision, where="--precision") if precision else None
    problems: list[str] = []
    records = [r for r in all_runs(runs_root, problems)
               if (not status or r.effective_status() in status)
               and (profile is None or r.profile == profile)
               and (wanted_precision is None or r.precision == wanted_precision)
               and all(t in r.tags for t in tag)
               and (sweep is None or r.sweep == sweep)]
    for problem in problems:
        typer.echo(f"warning: skipped {problem}", err=True)
    from spladectl.runs.compare import refreshed

    # run.json is summarised when a run ends: a running or killed one is summarised from what it has written so far.
    records = [refreshed(r) if r.effective_status() in ("running", "stale") else r for r in records]
    if as_json:
        typer.echo(json.dumps([_as_json(r) for r in records], indent=2, default=str))
        return
    if not records:
        typer.echo(f"no runs under {runs_root}" + (" match" if status or profile or precision or tag or sweep else ""))
        return
    with_ndcg = any("nDCG@10" in r.final_metrics for r in records)
    columns = ["id", "status", "profile", "precision", "steps", "loss", *(["nDCG@10"] if with_ndcg else []),
               "started", "duration", "tags"]
    table = output.table(*columns)
    for r in records:
        cells = [r.id, r.effective_status(), r.profile or "-", r.precision or "-", r.steps,
                 output.number(r.final_metrics.get("loss")), *([output.number(r.final_metrics.get("nDCG@10"))] if with_ndcg else []),
                 r.started.replace("T", " ").rstrip("Z"), output.duration(r.duration_s), ",".join(r.tags)]
        output.row(table, *cells)
    output.console(piped_width=1000).print(table)


@runs_app.command("show")
def show(
    run: Annotated[str, typer.Argument(help="A run id (or a unique prefix of one), or a run directory.")],
    runs_root: RootOption = Path("runs"),
    as_json: JsonOption = False,
) -> None:
    """Show one run: status, timing, the command, its settings, final and best metrics, throughput, peak memory."""
    from spladectl.runs import find_run
    from spladectl.runs.compare import read_config, refreshed

    record = refreshed(find_run(run, runs_root))
    config = read_config(record.path)
    if as_json:
        typer.echo(json.dumps({**_as_json(record), "config": config}, indent=2, default=str))
        return
    where = f" (sweep {record.sweep}, point {record.point})" if record.sweep else ""
    if record.trial:  # a tuning trial's run: its study, number and how the study judged it
        where = (f" (study {record.trial.get('study')}, trial {record.trial.get('number')}, "
                 f"{record.trial.get('pruned') or record.trial.get('state')})")
    lines = [f"run {record.id}: {record.effective_status()}{where}", f"  dir        {record.dir}",
             f"  started    {record.started}   ended {record.ended or '-'}   duration {output.duration(record.duration_s)}"
             + (f" (training {output.duration(record.train_seconds)})" if record.train_seconds else "")]
    if record.world_size > 1:
        lines.append(f"  processes  {record.world_size} (distributed; rank 0 wrote this directory)")
    if record.resumes:
        lines.append(f"  resumed    {record.resumes} time(s)")
    if record.from_run:
        lines.append(f"  re-launch of {record.from_run}")
    if record.command:
        lines.append(f"  command    {record.command}")
    if record.tags:
        lines.append(f"  tags       {', '.join(record.tags)}")
    if record.error:
        lines.append(f"  error      {record.error}")
    if config:
        lines.append("settings (config.toml)")
        lines += [f"  {key:<24} {value}" for key, value in config.items()]
    if record.final_metrics:
        lines.append(f"final metrics (step {record.steps})")
        lines += [f"  {key:<24} {output.number(value)}" for key, value in record.final_metrics.items()]
    if record.best_metrics:
        lines.append("best metrics")
        lines += [f"  {key:<24} {output.number(v['value'])} (step {v['step']})" for key, v in record.best_metrics.items()]
    if record.best_model:
        best = record.best_model
        lines.append(f"best model   {best['path']} (step {best['step']}, {best['metric']} {output.number(best['value'])})")
    if record.heldout:
        lines.append("held-out quality (the demo)")
        for when in ("before", "after", "best"):
            if when == "best" and when not in record.heldout:  # only when the final model collapsed
                continue
            values = record.heldout.get(when) or {}
            lines.append(f"  {when:<8} " + "  ".join(f"{k} {output.number(values[k])}" for k in ("nDCG@10", "MRR@10", "R@100")
                                                    if k in values))
    if record.throughput:
        t = record.throughput
        lines.append(f"throughput   {t['examples_per_s']:.2f} examples/s, {t['steps_per_s']:.3f} steps/s "
                     f"(over {t['step_seconds_total']:.1f} s of steps)")
    if record.peak_memory_gb:
        lines.append("peak memory  " + ", ".join(f"{k} {v:.3f} GiB" for k, v in record.peak_memory_gb.items()))
    for name, where in record.tracking.items():
        lines.append(f"tracking     {name}: " + ", ".join(f"{k} {v}" for k, v in where.items()))
    for name, state in record.git.items():
        dirty = " (uncommitted changes)" if state.get("dirty") else ""
        lines.append(f"git          {name}: {state.get('root')} at {(state.get('commit') or 'no commit')[:12]}{dirty}")
    lines += [f"warning      {w}" for w in record.warnings]
    if record.traceback:
        lines += ["traceback", record.traceback.rstrip()]
    typer.echo("\n".join(lines))


@runs_app.command("compare")
def compare(
    runs: Annotated[list[str], typer.Argument(help="Runs to compare: ids, unique prefixes, directories, or a sweep's name for all its runs.")],
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw loss, λ, active dimensions and nDCG@10 over steps, and nDCG@10 against FLOPS, into this file (.png, .svg, .pdf).")] = None,
    runs_root: RootOption = Path("runs"),
    as_json: JsonOption = False,
) -> None:
    """Compare runs: the settings that differ between them and their metrics, side by side, then quality against
    cost: nDCG@10, MRR@10, R@100 beside active query/document dimensions and FLOPS of each run's final (and best)
    evaluation, with the split and step they come from."""
    from spladectl.runs.compare import compare as compare_runs
    from spladectl.runs.compare import refreshed
    from spladectl.runs.store import resolve_refs

    records = [refreshed(r) for r in resolve_refs(runs, runs_root)]
    table_data = compare_runs(records)
    if plot is not None:
        from spladectl.runs.plot import plot_runs

        plot_runs(records, plot, labels=_labels(records))
        table_data["plot"] = str(plot)
    if as_json:
        typer.echo(json.dumps(table_data, indent=2, default=str))
        return
    labels = _labels(records)
    table = output.table("", *labels)
    if table_data["settings"]:
        output.row(table, "settings that differ", *[""] * len(labels))
        for key, values in table_data["settings"].items():
            output.row(table, f"  {key}", *[_cell(v) for v in values])
    else:
        output.row(table, "settings: all equal", *[""] * len(labels))
    output.row(table, "metrics", *[""] * len(labels))
    for key, values in table_data["metrics"].items():
        output.row(table, f"  {key}", *[_cell(v) for v in values])
    console = output.console(piped_width=1000)
    console.print(table)
    console.print(_quality_table(table_data["quality"], dict(zip(table_data["runs"], labels))))
    if plot is not None:
        typer.echo(f"plot written to {plot}")


@runs_app.command("rm")
def remove(
    runs: Annotated[list[str], typer.Argument(help="Runs to remove: ids, unique prefixes, directories, or a sweep's name.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Also remove runs that are still running.")] = False,
    runs_root: RootOption = Path("runs"),
) -> None:
    """Delete run directories (checkpoints, models and all). Copies in MLflow or TensorBoard elsewhere are kept."""
    from spladectl.runs.lock import LOCK_FILE, describe, is_held, read_owner
    from spladectl.runs.store import resolve_refs, run_dirs

    records = resolve_refs(runs, runs_root)
    # A process may train in a directory whose run.json says otherwise (a resume that has just begun): the lock rules.
    alive = [r for r in records if r.effective_status() == "running" or is_held(r.path)]
    if alive and not force:
        owner = read_owner(alive[0].path / LOCK_FILE) or {"pid": alive[0].pid, "host": alive[0].host}
        raise SpladectlError(f"{', '.join(r.id for r in alive)}: still running ({describe(owner)})",
                             hint="stop it first, or pass --force")
    for r in records:
        typer.echo(f"  {r.id}  {r.effective_status()}  {r.dir}")
    if not yes and not typer.confirm(f"remove {len(records)} run(s)?", default=False):
        raise typer.Exit(1)
    parents = set()
    for r in records:
        shutil.rmtree(r.path)
        if r.sweep:
            parents.add(r.path.parent)
    for sweep_dir in parents:  # a sweep none of whose runs is left goes too (its summary and plot)
        if sweep_dir.is_dir() and not run_dirs(sweep_dir):
            shutil.rmtree(sweep_dir)
    typer.echo(f"removed {len(records)} run(s)")


def _quality_table(rows: list[dict[str, Any]], labels: dict[str, str]):
    from spladectl.runs.quality import QUALITY, source_text

    table = output.table("run", "evaluation", "source", *QUALITY, "query dims", "doc dims", "FLOPS",
                   title="quality against cost")
    for row in rows:
        evaluation = row["evaluation"] or "-"
        if row.get("best_by"):
            evaluation += f" ({row['best_by']})"
        output.row(table, labels.get(row["run"], row["run"]), evaluation, source_text(row),
             *[_fixed(row[name], 4) for name in QUALITY], _fixed(row["avg_query_dims"], 1),
             _fixed(row["avg_doc_dims"], 1), "-" if row["avg_flops"] is None else f"{row['avg_flops']:.4g}")
    return table


def _fixed(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _as_json(record) -> dict[str, Any]:
    values = record.to_dict()
    values["status"] = record.effective_status()
    return values


def _labels(records) -> list[str]:
    """Point names when all runs come from one sweep (short and telling), else run ids."""
    sweeps = {r.sweep for r in records}
    if len(sweeps) == 1 and None not in sweeps:
        return [r.point for r in records]
    return [r.id for r in records]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return output.number(value)
    if isinstance(value, list):
        return ",".join(map(str, value)) or "[]"
    return "-" if value is None else str(value)
