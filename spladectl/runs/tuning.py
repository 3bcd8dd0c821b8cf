"""Hyperparameter search on Optuna: a study in a database that any number of workers share, each trial a run.

A worker (`spladectl tune FILE`) opens the study named after the experiment in `--storage` (created by the first
worker, joined by the others: its settings must be the file's), then runs trials one after another until the study
holds `--trials` trials that completed, were pruned or are running. A trial samples the file's `[search]`, trains
`[base]` with those values as the run `RUNS_ROOT/<study>/trial-NNNN`, reports each in-training evaluation to the
pruner (which may stop it there) and ends with its run's metric.

A worker that dies (kill -9, a machine gone) stops sending heartbeats; the next worker to start a trial marks its
trial failed and queues a copy with the same parameters, which the next free worker runs.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from spladectl.errors import SpladectlError
from spladectl.hookspecs import hookimpl
from spladectl.runs.record import RUN_FILE, RunRecord, load_record, now
from spladectl.runs.summary import lower_is_better, metric_value

if TYPE_CHECKING:
    from spladectl.runs.experiment import Experiment

DEFAULT_STORAGE = "sqlite:///tune.db"
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
DEFAULT_HEARTBEAT = 60  # seconds; a trial silent for twice this is taken for dead
MAX_RETRIES = 2  # copies of a dead worker's trial queued again, each time its worker died
OPEN_ATTEMPTS = 4
FINGERPRINT = "spladectl"  # the study's user attribute holding the settings its trials share


@dataclass
class TuneSettings:
    storage: str = DEFAULT_STORAGE
    study: str | None = None  # default: the experiment's name
    trials: int = 20
    sampler: str = "tpe"
    pruner: str = "median"
    startup_trials: int = 5  # sampled at random and never pruned, before TPE and the pruner start judging
    prune_from: int | None = None  # the first step a trial may be pruned at (default: its second evaluation)
    seed: int | None = None
    heartbeat: int = DEFAULT_HEARTBEAT
    max_failures: int = 3  # this worker stops after this many failed trials in a row


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise SpladectlError("spladectl tune needs Optuna", hint="pip install 'spladectl[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial gets one line of ours, never a traceback
    return optuna


def masked(url: str) -> str:
    """A storage URL fit to print: the password replaced."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def objective_metric(experiment: Experiment) -> str:
    """What trials are judged by: the file's `metric`, else nDCG@10 when it evaluates during training, else loss."""
    if experiment.metric:
        return experiment.metric
    return "nDCG@10" if experiment.base.get("eval_data") else "loss"


def check_experiment(experiment: Experiment, settings: TuneSettings) -> str:
    """The experiment is one a tuner can run; returns the metric trials are judged by."""
    where = str(experiment.path)
    if experiment.varies:
        raise SpladectlError(f"{where}: [grid] and [[points]] are what `spladectl sweep` runs; `spladectl tune` "
                             "samples [search]", hint="move the ranges to [search], or run the file with sweep")
    if not experiment.search:
        raise SpladectlError(f"{where}: no [search] table: nothing to tune",
                             hint='add e.g. [search] lr = { low = 1e-5, high = 1e-3, log = true }')
    metric = objective_metric(experiment)
    if settings.pruner != "none":
        if not (experiment.base.get("eval_data") and experiment.base.get("eval_every")):
            raise SpladectlError(f"{where}: pruning judges trials by their in-training evaluations: set eval-data "
                                 "and eval-every in [base]", hint="or tune without pruning: --pruner none")
        if "@" not in metric:
            raise SpladectlError(f"{where}: metric {metric!r}: pruning compares an evaluation metric (nDCG@10, "
                                 "MRR@10, R@100, ...)", hint="or tune without pruning: --pruner none")
    for name, value, least in (("--trials", settings.trials, 1), ("--startup-trials", settings.startup_trials, 0),
                               ("--heartbeat", settings.heartbeat, 1), ("--max-failures", settings.max_failures, 1),
                               ("--prune-from", 1 if settings.prune_from is None else settings.prune_from, 1)):
        if value < least:
            raise SpladectlError(f"{name} {value}: expected a number >= {least}")
    return metric


def fingerprint(experiment: Experiment, metric: str) -> dict[str, Any]:
    """What every worker of a study must agree on: the fixed options, the search space and the metric."""
    return json.loads(json.dumps({"base": experiment.base, "search": {d.name: d.to_dict() for d in experiment.search},
                                  "metric": metric}, default=str))


def open_study(experiment: Experiment, settings: TuneSettings, metric: str):
    """Create the study, or join it when it exists with the same settings."""
    optuna = require_optuna()
    name = settings.study or experiment.name
    storage = _storage(settings)
    direction = "minimize" if lower_is_better(metric) else "maximize"
    sampler = (optuna.samplers.TPESampler(n_startup_trials=settings.startup_trials, seed=settings.seed)
               if settings.sampler == "tpe" else optuna.samplers.RandomSampler(seed=settings.seed))
    # The first evaluation mostly measures where every trial started (the same model, a few steps on): judging
    # there prunes by noise. From the second one on, the trials' settings have had time to tell.
    every = int(experiment.base.get("eval_every") or 1)
    warmup = (settings.prune_from if settings.prune_from is not None else 2 * every) - 1
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=settings.startup_trials,
                                                            n_warmup_steps=max(0, warmup)),
              "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=max(1, warmup + 1)),
              "none": lambda: optuna.pruners.NopPruner()}[settings.pruner]()
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction=direction, load_if_exists=True)
    except Exception as exc:  # noqa: BLE001 - a database that cannot be opened, of any driver
        raise SpladectlError(f"--storage {masked(settings.storage)}: cannot open study {name!r} "
                             f"({type(exc).__name__}: {exc})") from exc
    if study.direction.name.lower() != direction:
        raise SpladectlError(f"study {name!r} in {masked(settings.storage)} is to {study.direction.name.lower()}, "
                             f"but {metric} is to {direction}", hint="give the study another name: --study")
    mine = fingerprint(experiment, metric)
    theirs = study.user_attrs.get(FINGERPRINT)
    if theirs is None:
        study.set_user_attr(FINGERPRINT, mine)
    elif theirs != mine:
        changed = sorted(key for key in mine if mine[key] != theirs.get(key))
        raise SpladectlError(f"study {name!r} in {masked(settings.storage)} was started with other {' and '.join(changed)}"
                             f" than {experiment.path} gives now", hint="give the study another name (--study), "
                             "or run the file the study was started with")
    return study


def _storage(settings: TuneSettings):
    optuna = require_optuna()
    url = settings.storage
    if "://" not in url:
        raise SpladectlError(f"--storage {url!r}: expected a database URL, e.g. sqlite:///tune.db or "
                             "postgresql://user:password@host/db")
    engine_kwargs = {}
    if url.startswith("sqlite"):
        # Workers on one SQLite file take turns writing; wait for the lock rather than fail at once.
        engine_kwargs = {"connect_args": {"timeout": 120}}
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    for attempt in range(1, OPEN_ATTEMPTS + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeats are "experimental" in Optuna's words
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=settings.heartbeat,
                                                  grace_period=2 * settings.heartbeat,
                                                  heartbeat_stale_trial_callback=retry(max_retry=MAX_RETRIES))
            except ImportError as exc:  # the database's driver
                raise SpladectlError(f"--storage {masked(url)}: {exc}",
                                     hint="install the database's driver: psycopg2-binary for postgresql://, "
                                          "PyMySQL for mysql+pymysql://") from exc
            except Exception as exc:  # noqa: BLE001 - a server that is down, a bad path, or a race (below)
                # Workers started together on a new database all create its tables: all but one fail once.
                if attempt == OPEN_ATTEMPTS:
                    raise SpladectlError(f"--storage {masked(url)}: cannot open the database ({type(exc).__name__}"
                                         f": {str(exc).splitlines()[0] if str(exc) else exc})") from exc
                time.sleep(0.5 * attempt)


class ReportToTrial:
    """A plugin for one trial's training: each in-training evaluation goes to the trial, and when the pruner says
    so, training stops there."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric.removeprefix("best_")
        self.pruned: str | None = None

    @hookimpl
    def on_evaluate(self, state, metrics: dict[str, float], final: bool) -> None:
        value = metrics.get(self.metric)
        if final or value is None:
            return
        self.trial.report(float(value), state.step)
        if self.trial.should_prune():
            self.pruned = f"pruned at step {state.step}: {self.metric} {value:.4f}"
            state.stop_requested = f"trial {self.trial.number} {self.pruned}"


@dataclass
class TrialOutcome:
    number: int
    state: str  # complete, pruned, fail
    value: float | None = None
    error: str | None = None


def run_study(experiment: Experiment, study, settings: TuneSettings, metric: str, root: Path, *,
              train: Callable[[dict[str, Any], "Any"], None], log: Callable[[str], None]) -> list[TrialOutcome]:
    """Run trials until the study holds `settings.trials` that completed, were pruned or are running.

    `train(options, target)` trains one trial's run (a RunTarget); it raises when the training fails.
    """
    optuna = require_optuna()
    from spladectl.plugin_loading import load_plugins

    base_dir = root / study.study_name
    # Runs first, trials second: a trial is in the storage before its run directory exists, so a run whose number
    # the study lacks is another study's, not a trial another worker has just begun.
    on_disk = {p.name for p in base_dir.glob("trial-*")} if base_dir.is_dir() else set()
    foreign = sorted(on_disk - {f"trial-{t.number:04d}" for t in study.get_trials(deepcopy=False)})
    if foreign:
        raise SpladectlError(f"{base_dir} holds trial runs ({', '.join(foreign[:3])}) that study "
                             f"{study.study_name!r} in {masked(settings.storage)} does not have: an earlier study "
                             "of that name", hint="give the study another name (--study), or remove them: "
                             f"spladectl runs rm {study.study_name}")
    pm = load_plugins()
    outcomes: list[TrialOutcome] = []

    def objective(trial) -> float:
        try:
            return run_trial(trial)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            if "error" not in trial.user_attrs:  # failed before its run could say why
                from spladectl.runs.lifecycle import describe_error

                trial.set_user_attr("error", describe_error(exc))
            raise

    def run_trial(trial) -> float:
        from spladectl.runs.sweep import settle
        from spladectl.runs.training import RunTarget

        values = {d.name: d.suggest(trial) for d in experiment.search}
        point = f"trial-{trial.number:04d}"
        run_dir = base_dir / point
        run_id = f"{study.study_name}/{point}"
        trial.set_user_attr("run", run_id)
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        retried = _retry_of(study, trial.number)
        log(f"trial {trial.number}: {format_params(values)}"
            + (f" (trial {retried} again: its worker died)" if retried is not None else ""))
        if run_dir.exists():
            raise SpladectlError(f"{run_dir}: exists already; a trial's run needs a new directory")
        link = {"study": study.study_name, "number": trial.number, "storage": masked(settings.storage),
                "state": "running"}
        run_dir.mkdir(parents=True)
        options = {**experiment.base, **values}
        RunRecord(id=run_id, dir=str(run_dir.resolve()), sweep=study.study_name, point=point, trial=link,
                  options=options, runs_root=str(root.resolve())).save()
        reporter = ReportToTrial(trial, metric) if settings.pruner != "none" else None
        if reporter is not None:
            pm.register(reporter, name=f"spladectl-tune-trial-{trial.number}")
        try:
            train(options, RunTarget(dir=run_dir, id=run_id, sweep=study.study_name, point=point, settings=options,
                                     experiment=experiment.path, trial=link))
        except BaseException as exc:
            from spladectl.runs.lifecycle import describe_error

            error = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else describe_error(exc)
            settle(run_dir, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", error)
            _mark(run_dir, state="fail")
            trial.set_user_attr("error", error)
            raise
        finally:
            if reporter is not None:
                pm.unregister(reporter)
        if reporter is not None and reporter.pruned:
            trial.set_user_attr("pruned", reporter.pruned)
            _mark(run_dir, state="pruned", pruned=reporter.pruned, status="pruned")
            raise optuna.TrialPruned(reporter.pruned)
        record = load_record(run_dir)
        value = metric_value(record, metric)
        if value is None:
            _mark(run_dir, state="fail")
            raise SpladectlError(f"{run_id}: finished without a {metric} to judge it by")
        _mark(run_dir, state="complete", value=value)
        return float(value)

    failures = 0
    while failures < settings.max_failures and _counted(study) < settings.trials:
        done: list = []
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[lambda _s, t: done.append(t)])
        if not done:
            continue
        trial = done[0]
        state = trial.state.name.lower()
        outcome = TrialOutcome(trial.number, state, trial.value, trial.user_attrs.get("error"))
        outcomes.append(outcome)
        if state == "fail":
            failures += 1
            log(f"trial {trial.number}: failed: {(outcome.error or 'see its run').splitlines()[0]}")
        elif state == "pruned":
            failures = 0
            log(f"trial {trial.number}: {trial.user_attrs.get('pruned') or _pruned_text(trial)}")
        else:
            failures = 0
            log(f"trial {trial.number}: complete, {metric} {trial.value:.4f}")
    if failures >= settings.max_failures:
        log(f"stopping: {failures} trials in a row failed (--max-failures {settings.max_failures})")
    return outcomes


def _retry_of(study, number: int) -> int | None:
    """The trial a dead worker left that this one repeats (queued by the heartbeat callback), if it is one."""
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    return frozen.system_attrs.get("failed_trial")


def _counted(study) -> int:
    """Trials that completed, were pruned or are running: what --trials counts (failed ones are not)."""
    optuna = require_optuna()
    # A dead worker's trial still reads "running" until a live worker looks: look before counting it (it is then
    # failed, and a copy queued for the next trial to take).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    return len(study.get_trials(deepcopy=False, states=states))


def _pruned_text(trial) -> str:
    steps = sorted(trial.intermediate_values)
    return f"pruned at step {steps[-1]}" if steps else "pruned"


def _mark(run_dir: Path, *, state: str, status: str | None = None, **extra: Any) -> None:
    """The trial's outcome in its run's record (and the run's status, for a pruned one)."""
    if not (run_dir / RUN_FILE).is_file():
        return
    record = load_record(run_dir)
    record.trial = {**(record.trial or {}), "state": state, **extra}
    if status is not None:
        record.status, record.ended = status, record.ended or now()
    record.save()


def format_params(params: dict[str, Any]) -> str:
    """`lr=0.0001363, n_negatives=2`: a trial's parameters, floats to 4 significant digits."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def study_status(study, settings: TuneSettings, metric: str | None = None) -> dict[str, Any]:
    """The study as `spladectl tune --status` shows it: counts by state, the best trial, every trial."""
    trials = study.get_trials(deepcopy=False)
    rows = []
    for t in trials:
        steps = sorted(t.intermediate_values)
        duration = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
                     "last_step": steps[-1] if steps else None, "run": t.user_attrs.get("run"),
                     "run_dir": t.user_attrs.get("run_dir"), "duration_s": duration,
                     "error": t.user_attrs.get("error"),
                     "retry_of": t.system_attrs.get("failed_trial")})  # the number of the dead worker's trial
    best = None
    try:
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": b.params, "run": b.user_attrs.get("run")}
    except ValueError:  # no completed trial yet
        pass
    states = ("complete", "pruned", "running", "waiting", "fail")
    fp = study.user_attrs.get(FINGERPRINT) or {}
    return {"study": study.study_name, "storage": masked(settings.storage), "direction": study.direction.name.lower(),
            "metric": metric or fp.get("metric"), "counts": {s: sum(r["state"] == s for r in rows) for s in states},
            "best": best, "trials": rows}


def load_existing_study(settings: TuneSettings, name: str):
    """An existing study, for --status; a clear error when the storage has no study of that name."""
    optuna = require_optuna()
    if settings.storage.startswith("sqlite:///") and not Path(settings.storage[len("sqlite:///"):]).is_file():
        # Opening would create an empty database: --status only reads
        raise SpladectlError(f"--storage {settings.storage}: no such database file",
                             hint="give the --storage the workers of the study use")
    storage = _storage(settings)
    names = [s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)]
    if name not in names:
        raise SpladectlError(f"--storage {masked(settings.storage)} has no study {name!r}"
                             + (f" (it has: {', '.join(names)})" if names else " (it has none)"))
    return optuna.load_study(study_name=name, storage=storage)
