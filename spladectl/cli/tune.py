"""`spladectl tune experiment.toml`: search an experiment's [search] space with Optuna, each trial a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from spladectl.errors import SpladectlError
from spladectl.runs.tuning import DEFAULT_HEARTBEAT, DEFAULT_STORAGE, PRUNERS, SAMPLERS, format_params


def register(app: typer.Typer) -> None:
    if not any(command.callback is tune for command in app.registered_commands):
        app.command("tune")(tune)


def tune(
    experiment: Annotated[Path, typer.Argument(help="The experiment file: \\[base] train options and a \\[search] table of ranges and choices (docs/orchestration.md).")],
    trials: Annotated[int, typer.Option("--trials", help="Trials the study should hold, completed or pruned, counted over all its workers; failed ones do not count.")] = 20,
    storage: Annotated[str, typer.Option("--storage", envvar="SPLADECTL_TUNE_STORAGE", help="The study's database, any SQLAlchemy URL: sqlite:///tune.db (one machine), postgresql://... or mysql://... (many). Workers given the same storage and study share it.")] = DEFAULT_STORAGE,
    study: Annotated[Optional[str], typer.Option("--study", help="The study's name (default: the experiment's name); trials run under RUNS_ROOT/<study>/trial-NNNN.")] = None,
    sampler: Annotated[str, typer.Option("--sampler", help=f"How trials are sampled: {', '.join(SAMPLERS)}.")] = "tpe",
    pruner: Annotated[str, typer.Option("--pruner", help=f"What stops poor trials at an in-training evaluation: {', '.join(PRUNERS)} (median needs eval-data and eval-every in \\[base]).")] = "median",
    startup_trials: Annotated[int, typer.Option("--startup-trials", help="Trials sampled at random and never pruned before TPE and the median pruner start judging.")] = 5,
    prune_from: Annotated[Optional[int], typer.Option("--prune-from", help="The first step at which a trial may be pruned (default: its second in-training evaluation, 2 x eval-every).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the sampler (a study shared by several workers is not reproducible whatever the seed).")] = None,
    heartbeat: Annotated[int, typer.Option("--heartbeat", help="Seconds between a worker's signs of life; a trial silent for twice this is taken for dead: marked failed and queued again. Use the same value in every worker.")] = DEFAULT_HEARTBEAT,
    max_failures: Annotated[int, typer.Option("--max-failures", help="Stop this worker after this many failed trials in a row (exit 1).")] = 3,
    runs_root: Annotated[Path, typer.Option("--runs-root", envvar="SPLADECTL_RUNS_ROOT", help="Where the trials' runs go (default ./runs).")] = Path("runs"),
    status: Annotated[bool, typer.Option("--status", help="Show the study (trials, states, the best one) and run nothing.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars while trials train.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the study's summary as JSON on stdout (logs go to stderr).")] = False,
) -> None:
    r"""Search the \[search] space of an experiment file with Optuna (TPE and median pruning by default).

    The study lives in --storage; start the same command on several machines (or several times on one) and the
    workers share it. Each trial is a run under RUNS_ROOT/<study>/trial-NNNN; a pruned trial stops at the evaluation
    where the pruner judged it. `optuna-dashboard sqlite:///tune.db` shows the study in a browser.
    """
    from spladectl.cli.sweep import train_as_typed
    from spladectl.cli.train import train_command
    from spladectl.distributed import World
    from spladectl.runs import experiment as experiments
    from spladectl.runs import tuning

    for flag, value, choices in (("--sampler", sampler, SAMPLERS), ("--pruner", pruner, PRUNERS)):
        if value not in choices:
            raise SpladectlError(f"{flag} {value!r}: expected one of {', '.join(choices)}")
    if World.from_env().distributed:
        raise SpladectlError(f"spladectl tune {experiment}: started under torchrun; a tuning worker is one process",
                             hint="start `spladectl tune` once per GPU or machine: the workers share the study")
    log = (lambda msg: typer.echo(msg, err=True)) if as_json else typer.echo
    settings = tuning.TuneSettings(storage=storage, study=study, trials=trials, sampler=sampler, pruner=pruner,
                                   startup_trials=startup_trials, prune_from=prune_from, seed=seed, heartbeat=heartbeat,
                                   max_failures=max_failures)
    command = train_command()
    exp = experiments.load_experiment(experiment, command)
    if status:  # whatever the options of a worker: the study as its storage holds it
        found = tuning.load_existing_study(settings, study or exp.name)
        _show(tuning.study_status(found, settings), as_json)
        return
    metric = tuning.check_experiment(exp, settings)
    opened = tuning.open_study(exp, settings, metric)
    log(f"study {opened.study_name} in {tuning.masked(storage)}: {trials} trials, {sampler} sampler, {pruner} pruner,"
        f" {'lower' if opened.direction.name == 'MINIMIZE' else 'higher'} {metric} is better; runs in "
        f"{runs_root / opened.study_name}")
    for dim in exp.search:
        log(f"  {dim.name:<20} {dim.describe()}")

    def train(options, target) -> None:
        train_as_typed(command, options, target, runs_root=runs_root, progress=progress, log=log)

    try:
        outcomes = tuning.run_study(exp, opened, settings, metric, runs_root, train=train, log=log)
    except KeyboardInterrupt:
        log(f"interrupted; `spladectl tune {experiment}` with the same --storage continues the study")
        raise typer.Exit(130) from None
    _show(tuning.study_status(opened, settings, metric), as_json)
    failed_in_a_row = len(outcomes) >= max_failures and all(o.state == "fail" for o in outcomes[-max_failures:])
    if failed_in_a_row:
        raise typer.Exit(1)


def _show(summary: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    from spladectl.cli import output

    metric = summary["metric"] or "value"
    table = output.table("trial", "state", metric, "last step", "duration", "run", "parameters")
    for row in summary["trials"]:
        params = format_params(row["params"])
        if row["error"]:
            params += f"  ({row['error'].splitlines()[0][:60]})"
        output.row(table, row["number"], row["state"], output.number(row["value"]), row["last_step"] or "-",
                   output.duration(row["duration_s"]), row["run"] or "-", params)
    console = output.console(piped_width=1000)
    console.print(f"study {summary['study']} in {summary['storage']} ({summary['direction']} {metric})")
    console.print(table)
    counts = ", ".join(f"{n} {state}" for state, n in summary["counts"].items() if n)
    console.print(counts or "no trials yet")
    best = summary["best"]
    if best is not None:
        params = format_params(best["params"])
        console.print(f"best: trial {best['number']}, {metric} {best['value']:.4f}, run {best['run']}: {params}")
