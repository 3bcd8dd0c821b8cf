"""One training as a run: `run_training(request)` plans the run directory, resolves the profile for this machine into
a TrainConfig, builds the Trainer, trains and evaluates, and keeps run.json true whatever happens.

Distributed: each process that torchrun (or `train --nproc-per-node`) starts calls `run_training` with its World. Rank
0 alone plans the run, writes its directory and logs; it tells the other ranks the directory (and the checkpoint to
resume from) once the process group is up.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spladectl.config import TrainConfig
from spladectl.errors import SpladectlError
from spladectl.runs import options
from spladectl.request import TrainRequest, make_config

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"

# The demo's own recipe: short enough for a laptop CPU, long enough to move the held-out numbers.
# A tiny model on 240 examples wants a larger learning rate than a BERT-base run (measured on the demo: lr 1e-4 with
# one negative left held-out nDCG@10 flat, 2e-4 with two negatives raised it by 0.03).
DEMO_DEFAULTS = {"epochs": 2, "lr": 2e-4, "n_negatives": 2, "batch_size": 16, "grad_accum": 1, "max_doc_length": 128,
                 "max_query_length": 32}


@dataclass
class TrainResult:
    """What one training run gave; `spladectl train --json` prints `to_dict()`."""

    run: str
    run_dir: str
    status: str  # "finished"; a failed or interrupted training raises instead
    steps: int
    skipped_steps: int  # steps the fp16 loss scaler skipped
    train_seconds: float  # training alone, without the evaluations before and after
    examples_per_s: float
    precision: str
    final: str  # RUN_DIR/final, the model training ended with
    best: dict[str, Any] | None  # {"path", "step", "metric", "value"} of RUN_DIR/best (--eval-every)
    collapsed: str | None  # what the collapse detector found, when the final model collapsed (--on-collapse warn)
    collapse_events: list[str]
    last_metrics: dict[str, Any]  # the last step's metrics.jsonl line
    final_metrics: dict[str, float]  # its loss terms and dims, and the final evaluation's retrieval metrics
    evaluation: dict[str, Any] | None  # {"model": "final" | "best" | None, "metrics"} with --eval-data or the demo
    summary: list[list[str]] = field(default_factory=list)  # (label, value) rows plugins add (memory peaks)
    warnings: list[str] = field(default_factory=list)
    heldout_before: dict[str, Any] | None = None  # the held-out quality before training (with a held-out set)
    heldout_after: dict[str, Any] | None = None
    heldout_model: str | None = None
    stopped: str | None = None  # why training ended early at a plugin's request (a tuner pruned it)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if self.evaluation is None:  # no held-out set: no held-out keys, as before there was a type
            for key in ("heldout_before", "heldout_after", "heldout_model"):
                values.pop(key)
        return values


@dataclass
class RunTarget:
    """Where a sweep point or a tuning trial runs: its directory and id, its sweep (or study) and point, and the
    settings it was given."""

    dir: Path
    id: str
    sweep: str
    point: str
    settings: dict[str, Any]
    experiment: Path | None = None
    trial: dict[str, Any] | None = None  # a tuning trial's link to its study (runs/tuning.py)


def run_training(request: TrainRequest, *, target: RunTarget | None = None,
                 log: Callable[[str], None] = print, world=None) -> TrainResult | None:
    """One training as a run: plan its directory, keep run.json true whatever happens, return its summary.

    Sweeps call this for each point with `target`. `world` is this process's place in a distributed training
    (default: a single process); only rank 0 plans, writes and logs the run, and gets the result (the others None).
    """
    from spladectl import distributed, plugin_loading
    from spladectl.builtin_plugins.tracking import parse_track
    from spladectl.hardware import detect
    from spladectl.runs.lifecycle import ActiveRun

    world = world or distributed.World()
    if not world.is_main:
        log = _silent
    root = Path(request.runs_root)
    # Every rank reads these (a re-launched run's configuration, the trackers asked for): each builds the same
    # configuration on its own, as it resolves the profile on its own device.
    source = _from_run_source(request, root)
    tracks = parse_track(request.track) if request.track else None
    record = checkpoint = None
    if world.is_main:
        record, checkpoint = _plan(request, root, target, source)
        if not record.resumes:  # a resumed run keeps the command that started it
            record.command = request.command_line
            record.options = (dict(target.settings) if target is not None
                              else options.recorded(request.options(), request.given))
        record.tags = list(dict.fromkeys([*record.tags, *request.tag]))
        record.runs_root = str(root.resolve())
        record.world_size = world.world_size
        if source is not None:
            record.from_run = source.id

    facts = detect()
    pm = plugin_loading.load_plugins()
    before = {name for name, _ in pm.list_name_plugin()}
    train = dict(pm=pm, facts=facts, source=source, tracks=tracks, log=log, world=world)
    try:
        if not world.is_main:  # no run of its own: it learns rank 0's directory in _train
            _train(request, None, checkpoint=None, **train)
            return None
        git_paths = {"experiment": str(target.experiment) if target is not None and target.experiment else None,
                     "profile": request.profile if request.profile and Path(request.profile).is_file() else None}
        with distributed.SigtermAsException(world.distributed) as sigterm:
            with ActiveRun(record, facts=facts, git_paths=git_paths,
                           explain=_peer_explanation(world) if world.distributed else None) as run:
                log(f"run {record.id} in {shown(record.path)}")
                try:
                    result = _train(request, run, checkpoint=checkpoint, **train)
                finally:
                    sigterm.hold()  # how the run ended is recorded next; a second SIGTERM must not cut that short
    finally:
        # --plugin is for this run only: the next run in this process (a sweep's next point) must not inherit it.
        for name, plugin in list(pm.list_name_plugin()):
            if name not in before and plugin is not None and pm.sources.get(name) == "--plugin":
                pm.unregister(plugin)
                pm.sources.pop(name, None)
    names = {f.name for f in dataclasses.fields(TrainResult)}
    return TrainResult(**{k: v for k, v in result.items() if k in names}, run=record.id, run_dir=record.dir,
                       warnings=record.warnings)


def _silent(message: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for the run."""


def _peer_explanation(world):
    """For rank 0's ActiveRun: when another rank failed first (rank 0 then only sees a broken collective, or the
    SIGTERM torchrun sends after the failure), run.json records that rank's error instead."""
    from spladectl import distributed

    def explain(exc: BaseException) -> tuple[str, str] | None:
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C reached every process, rank 0 too
            return None
        peer = distributed.peer_failure(world)
        if peer is not None:
            if peer.get("interrupted"):
                return "interrupted", f"interrupted (rank {peer['rank']})"
            return "failed", f"rank {peer['rank']}: {peer['message']}"
        if isinstance(exc, distributed.Terminated):  # no failure posted: a scheduler, or a rank killed outright
            return "interrupted", f"{exc} (rank {world.rank})"
        return None

    return explain


def shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _from_run_source(request: TrainRequest, root: Path):
    if not request.from_run:
        return None
    from spladectl.runs import find_run

    source = find_run(request.from_run, root)
    if not (source.path / "config.toml").is_file():
        raise SpladectlError(f"--from-run {request.from_run}: {source.path / 'config.toml'} is missing",
                             hint="the run failed before its configuration was resolved; fix and train it anew")
    return source


def _plan(request: TrainRequest, root: Path, target: RunTarget | None, source) -> tuple[Any, str | None]:
    """The run's record (a new one, or the existing one being resumed) and the checkpoint to resume from."""
    from spladectl.runs.record import RUN_FILE, RunRecord, load_record
    from spladectl.runs.store import new_run_id, run_id_for

    resume = request.resume
    if target is not None:
        return RunRecord(id=target.id, dir=str(target.dir.resolve()), sweep=target.sweep, point=target.point,
                         trial=target.trial), None
    if request.output_dir is not None:
        run_dir = Path(request.output_dir)
    elif resume:
        run_dir, resume = _resume_target(resume, root)
    else:
        data = TrainConfig.from_toml(source.path / "config.toml").data if source is not None else request.data
        run_dir = root / new_run_id(request.name or (Path(data).stem if data else "demo"))
    if resume and (run_dir / RUN_FILE).is_file():
        record = load_record(run_dir)
        record.resumes += 1
        return record, resume
    return RunRecord(id=run_id_for(run_dir, root), dir=str(run_dir.resolve())), resume


def _resume_target(resume: str, root: Path) -> tuple[Path, str]:
    """--resume without --output-dir: the run directory to continue in, and the checkpoint spec within it."""
    from spladectl.checkpoint import STATE_FILE
    from spladectl.runs.record import RUN_FILE
    from spladectl.runs.store import find_run, latest_run, new_run_id

    if resume == "latest":
        return latest_run(root).path, "latest"
    checkpoint = Path(resume)
    if (checkpoint / STATE_FILE).is_file():
        owner = checkpoint.resolve().parent.parent  # RUN_DIR/checkpoints/step-N
        return (owner, resume) if (owner / RUN_FILE).is_file() else (root / new_run_id("resumed"), resume)
    return find_run(resume, root).path, "latest"


def _checkpoint_path(spec: str, run_dir: Path, root: Path) -> Path:
    """'latest' in the run directory, a checkpoint directory, or a run id (its latest checkpoint)."""
    from spladectl.checkpoint import STATE_FILE, find_checkpoint
    from spladectl.runs.store import list_runs

    if spec != "latest" and not (Path(spec) / STATE_FILE).is_file():
        named = [r for r in list_runs(root) if r.id == spec]
        if named:
            return find_checkpoint("latest", named[0].path)
    return find_checkpoint(spec, run_dir)


def _train(request: TrainRequest, run, *, pm, facts, source, tracks, checkpoint, log, world) -> dict[str, Any]:
    """This process's part of the training. `run` is the ActiveRun on rank 0, None on the other ranks."""
    from spladectl import distributed, plugin_errors, plugin_loading

    if source is not None:
        config = TrainConfig.from_toml(source.path / "config.toml")
        if tracks is not None:
            config.track = tracks
        for spec in config.plugins:
            plugin_loading.add_plugin(spec)
        demo = config.data is None
        settings = [f"settings of run {source.id} ({shown(source.path / 'config.toml')}): profile {config.profile}, "
                    f"device {config.device}, precision {config.precision}, batch {config.batch_size} x "
                    f"{config.grad_accum}, seed {config.seed}"]
    else:
        config, demo, settings = _new_config(request, facts, tracks or [])
    if run is not None:
        config.output_dir = str(run.path)
        run.attach_config(config)

    from spladectl.data import load_training_data

    examples = load_training_data(str(DEMO_DIR / "train.jsonl") if demo else config.data, split=config.data_split)
    eval_fn, heldout = _eval_function(config, demo)

    log("spladectl train: " + ("the built-in demo (splade-tiny, offline)" if demo else f"{config.model} on {config.data}"))
    for line in settings:
        log(f"  {line}")
    log(f"  examples {len(examples)}, {effective_batch_text(config)}, epochs {config.epochs}"
        + (f", max steps {config.max_steps}" if config.max_steps else "")
        + (f", encoded in chunks of {config.grad_cache_chunk} texts" if config.grad_cache_chunk else ""))

    from spladectl.engine import Trainer

    resume_from = None
    if run is not None and checkpoint:
        resume_from = str(_checkpoint_path(checkpoint, run.path, Path(request.runs_root)).resolve())
    distributed.start(world, config.device)
    # Rank 0 chose the run directory and the checkpoint; the others write nothing there but read the checkpoint.
    run_dir, resume_from = distributed.broadcast_object((config.output_dir, resume_from) if run is not None else None)
    config.output_dir = run_dir
    with plugin_errors.naming_plugin_errors(pm):
        trainer = Trainer(config, examples, pm=pm, log=log, eval_fn=eval_fn,
                          progress=request.progress, world=world)
    if run is not None:
        run.attach_trainer(trainer)
    if request.mlflow_uri:
        trainer.state.extras["mlflow_uri"] = request.mlflow_uri
    before = None
    if heldout is not None and world.is_main:  # the others go on to their first step and wait for rank 0 there
        log("held-out quality before training …")
        before = eval_fn(trainer.state.model)
    if resume_from:
        with plugin_errors.naming_plugin_errors(pm):
            trainer.resume(Path(resume_from))

    with plugin_errors.naming_plugin_errors(pm):
        result = trainer.fit()
    distributed.stop()
    if run is None:
        return result
    result["examples_per_s"] = trainer.state.examples_seen / max(result["train_seconds"], 1e-9)
    result["precision"] = config.precision
    run.record.train_seconds = result["train_seconds"]
    run.record.warnings += result["collapse_events"]
    if heldout is not None:
        result["heldout_before"] = before
        result["heldout_after"], result["heldout_model"] = result["evaluation"]["metrics"], result["evaluation"]["model"]
        from spladectl.runs.summary import retrieval_metrics

        # Of the best model, the numbers are not the final model's ("after"): summaries would take them for those.
        after = "best" if result["heldout_model"] == "best" else "after"
        run.record.heldout = {"before": retrieval_metrics(before), after: retrieval_metrics(result["heldout_after"])}
    result["summary"] = [list(row) for row in result["summary"]]
    return result


def _new_config(request: TrainRequest, facts, tracks: list[str]) -> tuple[TrainConfig, bool, list[str]]:
    """Resolve the profile for this machine and build the run's configuration from the options."""
    from spladectl import plugin_loading
    from spladectl.resolve import resolve_for_machine

    demo = request.data is None
    flags = {k: getattr(request, k) for k in ("batch_size", "grad_accum", "precision", "device", "force_device",
                                              "max_query_length", "max_doc_length") if getattr(request, k) is not None}
    demo_keys = [k for k in ("batch_size", "grad_accum", "max_query_length", "max_doc_length")
                 if demo and k not in flags]
    for key in demo_keys:
        flags[key] = DEMO_DEFAULTS[key]  # resolved like flags (they beat the profile), but not typed by the user
    resolved = resolve_for_machine(request.profile, flags=flags, env=os.environ, facts=facts)
    for key in demo_keys:
        if resolved.sources[key].startswith("flag"):
            resolved.sources[key] = "demo default"
    for spec in request.plugin:
        plugin_loading.add_plugin(spec)

    defaults = {key: DEMO_DEFAULTS[key] for key in ("epochs", "lr", "n_negatives")} if demo else None
    config = make_config(request, resolved.values, profile=resolved.name, defaults=defaults, tracks=tracks)
    return config, demo, settings_lines(resolved)


def effective_batch_text(config: TrainConfig) -> str:
    """`effective batch 32 (8 per device x 2 accumulation x 2 processes)`: what one optimizer step sees."""
    processes = f"{config.world_size} process" + ("es" if config.world_size > 1 else "")
    return (f"effective batch {config.effective_batch_size} ({config.batch_size} per device x {config.grad_accum} "
            f"accumulation x {processes})")


def settings_lines(resolved) -> list[str]:
    """The resolved settings as a few lines, with where each came from and why the hardware changed any."""
    shown = ("device", "precision", "batch_size", "grad_accum", "world_size", "max_query_length", "max_doc_length",
             "gradient_checkpointing", "dataloader_workers")
    lines = [f"profile {resolved.name} ({resolved.sources.get('name', 'named')})"]
    lines += [f"{key:<22} {getattr(resolved, key)!s:<12} {resolved.sources.get(key, '')}" for key in shown]
    lines += [f"fallback: {reason}" for reason in resolved.reasons]
    return lines


def _eval_function(config: TrainConfig, demo: bool):
    """The evaluation used during training (--eval-data) or for the demo's before/after; None when neither."""
    source = str(DEMO_DIR / "heldout") if demo and not config.eval_data else config.eval_data
    split = "test" if demo and not config.eval_data else config.eval_split
    if source is None:
        return None, None
    from spladectl.data.beir import load_beir
    from spladectl.evaluate import evaluate_encoder

    dataset = load_beir(source, split)

    def evaluate(encoder) -> dict[str, float]:
        was_training = encoder.training
        encoder.eval()
        metrics = evaluate_encoder(encoder, dataset, precision=config.precision, device=config.device,
                                   max_query_length=config.max_query_length, max_doc_length=config.max_doc_length,
                                   show_progress=False)
        encoder.train(was_training)
        return metrics

    return evaluate, dataset
