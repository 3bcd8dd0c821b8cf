"""`spladectl sweep experiment.toml`: every point of an experiment file as a run, then a ranked summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from spladectl.errors import SpladectlError


def register(app: typer.Typer) -> None:
    if not any(command.callback is sweep for command in app.registered_commands):
        app.command("sweep")(sweep)


def sweep(
    experiment: Annotated[Path, typer.Argument(help="The experiment file: a base, a grid and/or a list of points of train options (docs/orchestration.md).")],
    runs_root: Annotated[Path, typer.Option("--runs-root", envvar="SPLADECTL_RUNS_ROOT", help="Where the sweep's directory goes (default ./runs).")] = Path("runs"),
    resume: Annotated[bool, typer.Option("--resume", help="Skip finished points, retry failed and interrupted ones.")] = False,
    shard: Annotated[Optional[str], typer.Option("--shard", help="Run only shard i of n (e.g. 2/4): every n-th point, for n machines or GPUs.")] = None,
    metric: Annotated[Optional[str], typer.Option("--metric", help="Rank by this metric: loss, nDCG@10, best_nDCG@10, doc_dims, examples_per_s, ... (default: the file's, else nDCG@10 when evaluated, else loss).")] = None,
    lower_is_better: Annotated[Optional[bool], typer.Option("--lower-is-better/--higher-is-better", help="Ranking direction (default: lower for losses, times, memory and dimensions).", show_default=False)] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Comparison plot file (default: RUNS_ROOT/<sweep>/compare.png).")] = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Do not draw the comparison plot.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the points and their train commands, run nothing.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars while points train.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout (logs go to stderr).")] = False,
) -> None:
    """Run each point of an experiment file as a training run, one after another; rank them at the end.

    Points are runs under RUNS_ROOT/<sweep>/<point>. A failed point is recorded with its error and the sweep goes on
    (the exit status is 1 if any point failed). The summary goes to RUNS_ROOT/<sweep>/summary.json and the plot to
    compare.png there.
    """
    from spladectl.cli.train import train_command
    from spladectl.distributed import World
    from spladectl.runs import experiment as experiments
    from spladectl.runs import options
    from spladectl.runs import sweep as sweeps
    from spladectl.runs.training import RunTarget

    world = World.from_env()
    if world.distributed:
        # Every process would claim and train points of its own: a sweep is one process (see NOT_IN_POINTS).
        raise SpladectlError(f"spladectl sweep {experiment}: started as one of {world.world_size} processes "
                             "(torchrun sets WORLD_SIZE); a sweep runs in one process",
                             hint="run `spladectl sweep` directly; `--shard i/n` splits the points over several "
                                  "sweep processes or machines")
    log = (lambda msg: typer.echo(msg, err=True)) if as_json else typer.echo
    command = train_command()
    exp = experiments.load_experiment(experiment, command)
    if exp.search and not exp.varies:
        raise SpladectlError(f"{experiment}: [search] holds ranges for `spladectl tune`; a sweep runs [grid] and "
                             "[[points]]", hint=f"spladectl tune {experiment}")
    mine = experiments.shard(exp.points, shard)
    base_dir = sweeps.sweep_dir(exp, runs_root)
    if dry_run:
        rows = [{"point": p.name, "run_dir": str(base_dir / p.name),
                 "command": options.command_line(command, p.settings)} for p in mine]
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
        else:
            for row in rows:
                typer.echo(f"{row['point']}\n  {row['command']}")
        return
    sweeps.check_existing(exp, mine, runs_root, resume=resume)
    base_dir.mkdir(parents=True, exist_ok=True)
    copy = base_dir / "experiment.toml"
    if not copy.exists() or copy.resolve() != experiment.resolve():
        shutil.copyfile(experiment, copy)  # the file as this sweep used it, next to its runs
    log(f"sweep {exp.name}: {len(mine)} of {len(exp.points)} point(s)" + (f" (shard {shard})" if shard else "")
        + f" in {base_dir}")

    def run_point(point, run_dir: Path) -> None:
        target = RunTarget(dir=run_dir, id=f"{exp.name}/{point.name}", sweep=exp.name, point=point.name,
                           settings=point.settings, experiment=experiment)
        train_as_typed(command, point.settings, target, runs_root=runs_root, progress=progress, log=log)

    interrupted = False
    try:
        outcomes = sweeps.run_points(exp, mine, runs_root, run_point=run_point, log=log)
    except KeyboardInterrupt:
        interrupted, outcomes = True, []
    summary = sweeps.summarize_sweep(exp, runs_root, metric=metric, lower=lower_is_better)
    summary["plot"] = None if no_plot else _plot(exp, summary, runs_root, plot, log)
    summary["summary_file"] = str(sweeps.write_summary(summary, exp, runs_root))
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    else:
        _print_summary(summary)
    if interrupted:
        log(f"sweep interrupted; `spladectl sweep {experiment} --resume` continues it")
        raise typer.Exit(130)
    if any(o.status == "failed" for o in outcomes):
        raise typer.Exit(1)


def train_as_typed(command, settings: dict, target, *, runs_root: Path, progress: bool, log) -> None:
    """Train a sweep point's or a tuning trial's settings through the train command's own parsing and checks, as if
    typed, as the run `target`; raises when the training fails."""
    from spladectl.cli.train import report
    from spladectl.request import TrainRequest
    from spladectl.runs import options
    from spladectl.runs.training import run_training

    argv = [*options.argv_for(command, settings), "--runs-root", str(runs_root),
            "--progress" if progress else "--no-progress"]
    ctx = command.make_context("train", argv)
    with ctx:
        request = TrainRequest.from_options(ctx.params, given=options.explicit(ctx),
                                            command_line=options.command_line(command, settings))
        report(run_training(request, target=target, log=log), log, as_json=False)


def _plot(exp, summary, runs_root: Path, plot: Path | None, log) -> str | None:
    from spladectl.runs.record import load_record
    from spladectl.runs.sweep import PLOT_FILE, sweep_dir

    rows = [r for r in summary["points"] if r["status"] not in ("pending",)
            and (Path(r["dir"]) / "metrics.jsonl").is_file()]
    if not rows:
        return None
    records = [load_record(r["dir"]) for r in rows]
    path = plot or sweep_dir(exp, runs_root) / PLOT_FILE
    eval_metric = summary["metric"].removeprefix("best_") if "@" in summary["metric"] else "nDCG@10"
    from spladectl.runs.plot import plot_runs

    try:
        plot_runs(records, path, labels=[r["point"] for r in rows], eval_metric=eval_metric, title=f"sweep {exp.name}")
    except SpladectlError as exc:
        if plot is not None:  # asked for explicitly: a missing matplotlib is an error
            raise
        log(f"note: no comparison plot ({exc.format_message()})")
        return None
    return str(path)


def _print_summary(summary) -> None:
    from spladectl.cli import output

    direction = "lower is better" if summary["lower_is_better"] else "higher is better"
    table = output.table("rank", "point", "status", summary["metric"], "steps", "duration", "error")
    for row in summary["points"]:
        error = (row["error"] or "").splitlines()[0][:80] if row["error"] else ""
        output.row(table, row["rank"] or "-", row["point"], row["status"], output.number(row["value"]), row["steps"] or "-",
             output.duration(row["duration_s"]), error)
    console = output.console(piped_width=1000)
    console.print(f"sweep {summary['sweep']}: ranked by {summary['metric']} ({direction})")
    console.print(table)
    counts = ", ".join(f"{n} {status}" for status, n in summary["counts"].items() if n)
    console.print(f"{counts}; summary in {summary['summary_file']}"
                  + (f", plot in {summary['plot']}" if summary["plot"] else ""))
