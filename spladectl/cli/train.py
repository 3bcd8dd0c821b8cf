"""`spladectl train`: resolve the profile for this machine, then train a SPLADE model.

With no arguments it fine-tunes the embedded splade-tiny on the demo set shipped in the package and prints
retrieval quality on the demo's held-out part before and after. Every training is a run (spladectl/runs/): a
directory under the runs root whose run.json says how it went, whatever happens.

Distributed: with --nproc-per-node the command first hands over to torch.distributed.run (launch.py), before any run
directory exists; each process it starts (or plain torchrun starts) runs this command again and goes through
`run_training` with its World. Rank 0 alone plans the run, writes its directory and prints; it tells the other ranks
the directory (and the checkpoint to resume from) once the process group is up.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from spladectl.config import TrainConfig
from spladectl.errors import SpladectlError
from spladectl.runs import options

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"

# The demo's own recipe: short enough for a laptop CPU, long enough to move the held-out numbers.
# A tiny model on 240 examples wants a larger learning rate than a BERT-base run (measured on the demo: lr 1e-4 with
# one negative left held-out nDCG@10 flat, 2e-4 with two negatives raised it by 0.03).
DEMO_DEFAULTS = {"epochs": 2, "lr": 2e-4, "n_negatives": 2, "batch_size": 16, "grad_accum": 1, "max_doc_length": 128,
                 "max_query_length": 32}
LAUNCH_OPTIONS = set(options.LAUNCH_OPTIONS)
DISTRIBUTED = "Distributed (torchrun)"


def train(
    ctx: typer.Context,
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Hardware profile name or TOML path (default: detected for this machine)."),
    model: str = typer.Option("splade-tiny", "--model", "-m", help="Masked-LM checkpoint: hub name, local path, or splade-tiny (offline)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Training data: seed JSON/JSONL, TSV triples or a BEIR directory (default: the built-in demo)."),
    split: str = typer.Option("train", "--split", help="qrels split to train on when --data is a BEIR directory."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="The run directory (default: RUNS_ROOT/<run id>): checkpoints, metrics.jsonl, config.toml, final/, run.json."),
    runs_root: Path = typer.Option(Path("runs"), "--runs-root", envvar="SPLADECTL_RUNS_ROOT", help="Where runs get their directories, and where --resume/--from-run look up run ids."),
    name: Optional[str] = typer.Option(None, "--name", help="A word for the run id, after its timestamp (default: the data file's name, or demo)."),
    tag: list[str] = typer.Option([], "--tag", help="Label the run (repeatable); `spladectl runs list --tag` filters on it."),
    from_run: Optional[str] = typer.Option(None, "--from-run", help="Re-launch a run exactly (its config.toml) as a new run: a run id or directory."),
    track: list[str] = typer.Option([], "--track", envvar="SPLADECTL_TRACK", help="Mirror the run to experiment trackers: tensorboard, mlflow (comma-separated or repeated)."),
    mlflow_uri: Optional[str] = typer.Option(None, "--mlflow-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI for --track mlflow (default: sqlite:///RUNS_ROOT/mlflow.db)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Passes over the data (default 1; the demo uses 2)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer steps (overrides --epochs)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="Examples per micro-batch per device (default: from the profile)."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", min=1, help="Micro-batches per optimizer step (default: from the profile)."),
    grad_cache_chunk: Optional[int] = typer.Option(None, "--grad-cache-chunk", help="Gradient caching: encode each micro-batch in chunks of N texts, so memory follows N while the loss (and its in-batch negatives) covers the whole --batch-size."),
    precision: Optional[str] = typer.Option(None, "--precision", help="32-true, 16-mixed or bf16-mixed (aliases fp32, fp16, bf16); default from the profile."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, mps or cpu; falls back with a reason when unavailable."),
    force_device: Optional[str] = typer.Option(None, "--force-device", help="Use exactly this device or fail (exit 2)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 2e-5)."),
    lambda_q: Optional[float] = typer.Option(None, "--lambda-q", help="FLOPS weight for queries after warm-up (default 5e-4)."),
    lambda_d: Optional[float] = typer.Option(None, "--lambda-d", help="FLOPS weight for documents after warm-up (default 3e-4)."),
    flops_warmup_steps: Optional[int] = typer.Option(None, "--flops-warmup-steps", help="Steps of the quadratic λ ramp (default: a third of the run)."),
    flops_schedule: Optional[str] = typer.Option(None, "--flops-schedule", help="How λ ramps up: quadratic (default), linear or constant."),
    regularizer: Optional[str] = typer.Option(None, "--regularizer", help="Sparsity term: flops (default) or l1."),
    distillation: Optional[str] = typer.Option(None, "--distillation", help="With teacher scores in the data: margin-mse (default) or kl."),
    distillation_weight: Optional[float] = typer.Option(None, "--distillation-weight", help="Weight of the distillation term (0 turns it off)."),
    n_negatives: Optional[int] = typer.Option(None, "--n-negatives", min=0, help="Hard negatives per example in each step (default 1)."),
    in_batch_negatives: bool = typer.Option(True, "--in-batch-negatives/--no-in-batch-negatives", help="Also score each query against the other examples' documents."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="LR schedule: linear, cosine or constant."),
    warmup_ratio: Optional[float] = typer.Option(None, "--warmup-ratio", help="Fraction of steps for LR warm-up (default 0.1)."),
    max_query_length: Optional[int] = typer.Option(None, "--max-query-length", help="Query tokens (default: from the profile)."),
    max_doc_length: Optional[int] = typer.Option(None, "--max-doc-length", help="Document tokens (default: from the profile)."),
    seed: int = typer.Option(42, "--seed", help="Seed for data order, dropout and initialisation."),
    save_every: Optional[int] = typer.Option(None, "--save-every", min=1, help="Write a checkpoint every N optimizer steps (always one at the end)."),
    keep_last: int = typer.Option(2, "--keep-last", min=1, help="Checkpoints to keep."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue a run exactly: 'latest' (the newest run, or the one in --output-dir), a run id, or a checkpoint directory."),
    plugin: list[str] = typer.Option([], "--plugin", help="module:object to register as a plugin for this run (repeatable)."),
    memory_tracking: bool = typer.Option(False, "--memory-tracking", help="Record per-step memory peaks and print a summary."),
    memory_efficient: bool = typer.Option(False, "--memory-efficient", help="Also checkpoint the encoder's activations (slower, much less memory)."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="BEIR directory to evaluate on during training."),
    eval_split: str = typer.Option("test", "--eval-split", help="qrels split of --eval-data."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", min=1, help="Evaluate every N optimizer steps; the best model goes to RUN_DIR/best."),
    eval_metric: str = typer.Option("nDCG@10", "--eval-metric", help="Metric that picks the best checkpoint."),
    patience: Optional[int] = typer.Option(None, "--patience", min=1, help="Stop after N evaluations without improvement."),
    on_collapse: Optional[str] = typer.Option(None, "--on-collapse", help="When the representations collapse (under one active dimension, or the ranking loss at chance, for 10 steps): stop (default; an error saying what to change, no final model), backoff (back to the last healthy state with half the learning rate, at most 3 times) or warn (train on)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the final summary as JSON on stdout."),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", min=1, rich_help_panel=DISTRIBUTED, help="Start N training processes on this machine through torch.distributed.run, one per GPU (nccl) or N CPU processes (gloo). --batch-size stays per process."),
    nnodes: Optional[int] = typer.Option(None, "--nnodes", min=1, rich_help_panel=DISTRIBUTED, help="Machines taking part (default 1); run the same command on each, with its own --node-rank."),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", min=0, rich_help_panel=DISTRIBUTED, help="This machine's number, 0 to nnodes-1 (default 0); rank 0's machine writes the outputs."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", rich_help_panel=DISTRIBUTED, help="Address of the --node-rank 0 machine, reachable by all (needed with --nnodes > 1)."),
    master_port: Optional[int] = typer.Option(None, "--master-port", min=1, max=65535, rich_help_panel=DISTRIBUTED, help="Free TCP port on that machine (default: any free port on one machine, 29500 on several)."),
    cross_device_negatives: bool = typer.Option(True, "--cross-device-negatives/--no-cross-device-negatives", rich_help_panel=DISTRIBUTED, help="Score each query against the documents of every process, not only its own (the contrastive loss sees the global batch)."),
) -> None:
    """Train a SPLADE model with the resolved hardware profile; prints the settings and why they were chosen.

    Every training is a run: a directory under the runs root (./runs, or --runs-root) holding run.json (status,
    timing, metrics), config.toml, env.json, metrics.jsonl, checkpoints and the final model. See `spladectl runs`.
    A distributed training is one run, written by rank 0.
    """
    params = {key: value for key, value in locals().items() if key != "ctx"}
    if any(params[key] is not None for key in LAUNCH_OPTIONS):
        # First, before anything is planned or written: the processes started here each plan their part of the run.
        from spladectl.launch import LaunchOptions, command_line, launch

        if nproc_per_node is None:
            raise SpladectlError("--nnodes, --node-rank, --master-addr and --master-port go with --nproc-per-node",
                                 hint="add --nproc-per-node N: the number of processes (GPUs) on this machine")
        launch(LaunchOptions(nproc_per_node, nnodes or 1, node_rank or 0, master_addr, master_port),
               command_line(ctx, skip=LAUNCH_OPTIONS))
        return

    from spladectl import distributed

    world = distributed.World.from_env()
    given = options.explicit(ctx)
    line = options.command_line(ctx.command, {k: params[k] for k in params if k in given
                                              and k not in options.NOT_RECORDED})
    if os.environ.get(distributed.LAUNCH_ARGS_ENV):  # started by `train --nproc-per-node`: record how
        line += " " + os.environ[distributed.LAUNCH_ARGS_ENV]
    with distributed.reporting_failures(world):
        run_training(params, given=given, command_line=line, world=world)


@dataclass
class RunTarget:
    """Where a sweep point runs: its directory and id, its sweep and point, and the settings it was given."""

    dir: Path
    id: str
    sweep: str
    point: str
    settings: dict[str, Any]
    experiment: Path | None = None


# With --from-run, only what does not change the training itself may be given.
FROM_RUN_OPTIONS = {"from_run", "runs_root", "output_dir", "name", "tag", "track", "mlflow_uri", "progress", "as_json"}


def run_training(params: dict[str, Any], *, given: set[str], command_line: str | None = None,
                 target: RunTarget | None = None, log: Callable[[str], None] | None = None,
                 world=None) -> dict[str, Any]:
    """One training as a run: plan its directory, keep run.json true whatever happens, report at the end.

    `params` are the train command's parameters by name (what click parsed), `given` the names set explicitly.
    Sweeps call this for each point with `target`. `world` is this process's place in a distributed training
    (default: a single process); only rank 0 plans, writes and reports the run. Returns the summary `--json` prints.
    """
    from spladectl import distributed
    from spladectl import plugins as plugin_registry
    from spladectl.hardware import detect
    from spladectl.runs.lifecycle import ActiveRun
    from spladectl.default_plugins.tracking import parse_track

    world = world or distributed.World()
    as_json = params["as_json"]
    if not world.is_main:
        log = _silent
    elif log is None:
        log = (lambda msg: typer.echo(msg, err=True)) if as_json else typer.echo
    root = Path(params["runs_root"])
    # Every rank reads these (a re-launched run's configuration, the trackers asked for): each builds the same
    # configuration on its own, as it resolves the profile on its own device.
    source = _from_run_source(params, given, root)
    tracks = parse_track(params["track"]) if params["track"] else None
    record = checkpoint = None
    if world.is_main:
        record, checkpoint = _plan(params, root, target, source)
        if not record.resumes:  # a resumed run keeps the command that started it
            record.command = command_line
            record.options = dict(target.settings) if target is not None else options.recorded(params, given)
        record.tags = list(dict.fromkeys([*record.tags, *params["tag"]]))
        record.runs_root = str(root.resolve())
        record.world_size = world.world_size
        if source is not None:
            record.from_run = source.id

    facts = detect()
    pm = plugin_registry.load_plugins()
    before = {name for name, _ in pm.list_name_plugin()}
    train = dict(pm=pm, facts=facts, source=source, tracks=tracks, log=log, world=world)
    try:
        if not world.is_main:  # no run of its own: it learns rank 0's directory in _train
            return _train(params, None, checkpoint=None, **train)
        git_paths = {"experiment": str(target.experiment) if target is not None and target.experiment else None,
                     "profile": params["profile"] if params["profile"] and Path(params["profile"]).is_file() else None}
        with distributed.SigtermAsException(world.distributed) as sigterm:
            with ActiveRun(record, pm=pm, facts=facts, log=log, git_paths=git_paths,
                           explain=_peer_explanation(world) if world.distributed else None) as run:
                log(f"run {record.id} in {_shown(record.path)}")
                try:
                    result = _train(params, run, checkpoint=checkpoint, **train)
                finally:
                    sigterm.hold()  # how the run ended is recorded next; a second SIGTERM must not cut that short
    finally:
        # --plugin is for this run only: the next run in this process (a sweep's next point) must not inherit it.
        for name, plugin in list(pm.list_name_plugin()):
            if name not in before and plugin is not None and pm.sources.get(name) == "--plugin":
                pm.unregister(plugin)
                pm.sources.pop(name, None)
    result.update(run=record.id, run_dir=record.dir, warnings=record.warnings)
    _report(result, log, as_json)
    return result


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


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _from_run_source(params: dict[str, Any], given: set[str], root: Path):
    if not params["from_run"]:
        return None
    from spladectl.runs import find_run

    others = sorted(given - FROM_RUN_OPTIONS)
    if others:
        spelled = ", ".join("--" + name.replace("_", "-") for name in others)
        raise SpladectlError(f"--from-run re-launches a run exactly; it does not combine with {spelled}",
                             hint="copy the run's config.toml settings into a new `spladectl train` command "
                                  "(`spladectl runs show RUN` prints the command line) and change them there")
    source = find_run(params["from_run"], root)
    if not (source.path / "config.toml").is_file():
        raise SpladectlError(f"--from-run {params['from_run']}: {source.path / 'config.toml'} is missing",
                             hint="the run failed before its configuration was resolved; fix and train it anew")
    return source


def _plan(params: dict[str, Any], root: Path, target: RunTarget | None, source) -> tuple[Any, str | None]:
    """The run's record (a new one, or the existing one being resumed) and the checkpoint to resume from."""
    from spladectl.runs.record import RUN_FILE, RunRecord, load_record
    from spladectl.runs.store import new_run_id, run_id_for

    resume = params["resume"]
    if target is not None:
        return RunRecord(id=target.id, dir=str(target.dir.resolve()), sweep=target.sweep, point=target.point), None
    if params["output_dir"] is not None:
        run_dir = Path(params["output_dir"])
    elif resume:
        run_dir, resume = _resume_target(resume, root)
    else:
        data = TrainConfig.from_toml(source.path / "config.toml").data if source is not None else params["data"]
        run_dir = root / new_run_id(params["name"] or (Path(data).stem if data else "demo"))
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


def _train(params: dict[str, Any], run, *, pm, facts, source, tracks, checkpoint, log, world) -> dict[str, Any]:
    """This process's part of the training. `run` is the ActiveRun on rank 0, None on the other ranks."""
    from spladectl import distributed
    from spladectl import plugins as plugin_registry

    p = params
    if source is not None:
        config = TrainConfig.from_toml(source.path / "config.toml")
        if tracks is not None:
            config.track = tracks
        for spec in config.plugins:
            plugin_registry.add_plugin(spec)
        demo = config.data is None
        settings = [f"settings of run {source.id} ({_shown(source.path / 'config.toml')}): profile {config.profile}, "
                    f"device {config.device}, precision {config.precision}, batch {config.batch_size} x "
                    f"{config.grad_accum}, seed {config.seed}"]
    else:
        config, demo, settings = _new_config(p, facts, tracks or [])
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
        resume_from = str(_checkpoint_path(checkpoint, run.path, Path(p["runs_root"])).resolve())
    distributed.start(world, config.device)
    # Rank 0 chose the run directory and the checkpoint; the others write nothing there but read the checkpoint.
    run_dir, resume_from = distributed.broadcast_object((config.output_dir, resume_from) if run is not None else None)
    config.output_dir = run_dir
    with plugin_registry.naming_plugin_errors(pm):
        trainer = Trainer(config, examples, pm=pm, log=log, eval_fn=eval_fn if config.eval_every else None,
                          progress=p["progress"], world=world)
    if run is not None:
        run.attach_trainer(trainer)
    if p["mlflow_uri"]:
        trainer.state.extras["mlflow_uri"] = p["mlflow_uri"]
    before = None
    if heldout is not None and world.is_main:  # the others go on to their first step and wait for rank 0 there
        log("held-out quality before training …")
        before = eval_fn(trainer.state.model)
    if resume_from:
        with plugin_registry.naming_plugin_errors(pm):
            trainer.resume(Path(resume_from))

    started = time.perf_counter()
    with plugin_registry.naming_plugin_errors(pm):
        result = trainer.fit()
    distributed.stop()
    if run is None:
        return result
    result["train_seconds"] = round(time.perf_counter() - started, 2)
    result["examples_per_s"] = trainer.state.examples_seen / max(result["train_seconds"], 1e-9)
    result["precision"] = config.precision
    run.record.train_seconds = result["train_seconds"]
    run.record.warnings += result["collapse_events"]
    if heldout is not None:
        result["heldout_before"] = before
        result["heldout_after"], result["heldout_model"] = _evaluate_after(result, trainer.state.model, eval_fn, log)
        from spladectl.runs.summary import retrieval_metrics

        # Of the best model, the numbers are not the final model's ("after"): summaries would take them for those.
        after = "best" if result["heldout_model"] == "best" else "after"
        run.record.heldout = {"before": retrieval_metrics(before), after: retrieval_metrics(result["heldout_after"])}
    result["summary"] = [list(row) for row in plugin_registry.summary_rows(trainer.state, pm)]
    return result


def _evaluate_after(result: dict[str, Any], model, eval_fn, log) -> tuple[dict[str, Any] | None, str | None]:
    """The held-out quality after training and which model it is of: the final one, unless that one collapsed
    (--on-collapse warn); then the best one of --eval-every, or none."""
    if result["collapsed"] is None:
        log("held-out quality after training …")
        return eval_fn(model), "final"
    best = result["best"]
    if best is None:
        log("held-out quality after training: not measured, the final model is a collapsed one")
        return None, None
    from spladectl.model import SpladeEncoder

    log(f"held-out quality after training, of the best model (step {best['step']}; the final one collapsed) …")
    encoder = SpladeEncoder.from_pretrained(best["path"])
    encoder.max_query_length, encoder.max_doc_length = model.max_query_length, model.max_doc_length
    return eval_fn(encoder), "best"


def _new_config(p: dict[str, Any], facts, tracks: list[str]) -> tuple[TrainConfig, bool, list[str]]:
    """Resolve the profile for this machine and build the run's configuration from the options."""
    from spladectl import plugins as plugin_registry
    from spladectl.resolve import resolve_for_machine

    demo = p["data"] is None
    flags = {k: p[k] for k in ("batch_size", "grad_accum", "precision", "device", "force_device",
                               "max_query_length", "max_doc_length") if p[k] is not None}
    demo_keys = [k for k in ("batch_size", "grad_accum", "max_query_length", "max_doc_length")
                 if demo and k not in flags]
    for key in demo_keys:
        flags[key] = DEMO_DEFAULTS[key]  # resolved like flags (they beat the profile), but not typed by the user
    resolved = resolve_for_machine(p["profile"], flags=flags, env=os.environ, facts=facts)
    for key in demo_keys:
        if resolved.sources[key].startswith("flag"):
            resolved.sources[key] = "demo default"
    for spec in p["plugin"]:
        plugin_registry.add_plugin(spec)

    config = TrainConfig(
        model=p["model"], data=p["data"], data_split=p["split"], profile=resolved.name, **resolved.values,
        epochs=p["epochs"] or (DEMO_DEFAULTS["epochs"] if demo else 1), max_steps=p["max_steps"],
        lr=p["lr"] if p["lr"] is not None else (DEMO_DEFAULTS["lr"] if demo else TrainConfig.lr),
        seed=p["seed"], save_every=p["save_every"], keep_last=p["keep_last"], plugins=list(p["plugin"]),
        memory_tracking=p["memory_tracking"], track=tracks, eval_data=p["eval_data"], eval_split=p["eval_split"],
        eval_every=p["eval_every"], eval_metric=p["eval_metric"], early_stopping_patience=p["patience"],
        in_batch_negatives=p["in_batch_negatives"], cross_device_negatives=p["cross_device_negatives"],
        grad_cache_chunk=p["grad_cache_chunk"],
    )
    n_negatives = p["n_negatives"]
    if demo and n_negatives is None:
        n_negatives = DEMO_DEFAULTS["n_negatives"]
    for key in ("lambda_q", "lambda_d", "flops_warmup_steps", "flops_schedule", "regularizer", "distillation",
                "distillation_weight", "scheduler", "warmup_ratio", "on_collapse"):
        if p[key] is not None:
            setattr(config, key, p[key])
    if n_negatives is not None:
        config.n_negatives = n_negatives
    if p["memory_efficient"]:
        config.gradient_checkpointing = True
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


def _report(result: dict, log, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    m = result["last_metrics"]
    log(f"done: {result['steps']} optimizer steps in {result['train_seconds']:.1f} s "
        f"({result['examples_per_s']:.1f} examples/s, {result['precision']}), skipped {result['skipped_steps']}")
    if m:
        log(f"final loss {m['loss']:.4f}, query dims {m['query_dims']:.1f}, document dims {m['doc_dims']:.1f}")
    if "heldout_before" in result:
        b, a = result["heldout_before"], result["heldout_after"]
        log("held-out retrieval     nDCG@10   MRR@10   R@100")
        log(f"  before training      {b['nDCG@10']:.4f}   {b['MRR@10']:.4f}   {b['R@100']:.4f}")
        if a is None:
            log("  after training       not measured (the final model collapsed)")
        else:
            label = "after training" + (" (best)" if result["heldout_model"] == "best" else "")
            log(f"  {label:<20} {a['nDCG@10']:.4f}   {a['MRR@10']:.4f}   {a['R@100']:.4f}")
    for label, value in result["summary"]:
        log(f"{label:<28} {value}")
    if result["collapsed"]:
        log(f"warning: the final model is a collapsed one: {result['collapsed']}")
    log(f"model saved to {_shown(Path(result['final']))}" + (" (collapsed)" if result["collapsed"] else ""))
    best = result["best"]
    if best is not None:
        log(f"best model: {_shown(Path(best['path']))} (step {best['step']}, {best['metric']} {best['value']:.4f})")
    log(f"run {result['run']}: `spladectl runs show {result['run']}`")


def train_command():
    """The click command behind `spladectl train`, built on its own (independent of the app and its plugins): sweeps
    turn their points into its command line, with its own checks and messages."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("train")(train)
    return typer.main.get_command(app)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
