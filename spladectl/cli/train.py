"""`spladectl train`: its options become a TrainRequest (request.py), `runs.training.run_training` runs it, and
this module prints the summary.

With no arguments it fine-tunes the embedded splade-tiny on the demo set shipped in the package and prints
retrieval quality on the demo's held-out part before and after. With --nproc-per-node the command first hands over
to torch.distributed.run (launch.py), before any run directory exists; each process it starts runs this command
again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from spladectl.errors import SpladectlError
from spladectl.launch import LAUNCH_OPTIONS
from spladectl.runs import options
from spladectl.request import TrainRequest
from spladectl.runs.training import TrainResult, run_training, shown

DISTRIBUTED = "Distributed (torchrun)"


def train(
    ctx: typer.Context,
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Hardware profile name or TOML path (default: detected for this machine)."),
    model: str = typer.Option("splade-tiny", "--model", "-m", help="Masked-LM checkpoint: hub name, local path, or splade-tiny (offline)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Training data: seed JSON/JSONL, TSV triples, a BEIR directory, a `data prepare` directory or a cached Hugging Face dataset name org/name (default: the built-in demo)."),
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
    memory_efficient: bool = typer.Option(False, "--memory-efficient", help="The least memory per example, paid in time: checkpoint the encoder's activations, and when a micro-batch has more than 32 documents, encode it in chunks of 32 texts (gradient caching; --grad-cache-chunk sets another size)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the encoder (the first step compiles for up to a minute). Measured slower on CPUs, so off by default; try it on a GPU. Without a working compiler, training goes on uncompiled with a note."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="BEIR directory to evaluate on during training."),
    eval_split: str = typer.Option("test", "--eval-split", help="qrels split of --eval-data."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", min=1, help="Evaluate every N optimizer steps; the best model goes to RUN_DIR/best."),
    eval_metric: str = typer.Option("nDCG@10", "--eval-metric", help="Metric that picks the best checkpoint."),
    patience: Optional[int] = typer.Option(None, "--patience", min=1, help="Stop after N evaluations without improvement."),
    on_nan: Optional[str] = typer.Option(None, "--on-nan", help="When a step's loss or gradient is NaN or infinite (outside 16-mixed, whose loss scaler already skips overflowing steps): stop (default; an error naming the step and the loss term), skip (drop that step's update and count it) or rollback (back to the last checkpoint, or the start, with half the learning rate, at most 3 times)."),
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
    request = TrainRequest.from_options(params, given=given, command_line=line)
    log = (lambda msg: typer.echo(msg, err=True)) if as_json else typer.echo
    with distributed.reporting_failures(world):
        result = run_training(request, log=log, world=world)
    if world.is_main:
        report(result, log, as_json)


def report(result: TrainResult, log, as_json: bool) -> None:
    """The end of `spladectl train`: the summary as JSON, or what a person wants to read."""
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    m = result.last_metrics
    log(f"done: {result.steps} optimizer steps in {result.train_seconds:.1f} s "
        f"({result.examples_per_s:.1f} examples/s, {result.precision}), skipped {result.skipped_steps}")
    if m:
        log(f"final loss {m['loss']:.4f}, query dims {m['query_dims']:.1f}, document dims {m['doc_dims']:.1f}")
    if result.heldout_before is not None:
        b, a = result.heldout_before, result.heldout_after
        log("held-out retrieval     nDCG@10   MRR@10   R@100")
        log(f"  before training      {b['nDCG@10']:.4f}   {b['MRR@10']:.4f}   {b['R@100']:.4f}")
        if a is None:
            log("  after training       not measured (the final model collapsed)")
        else:
            label = "after training" + (" (best)" if result.heldout_model == "best" else "")
            log(f"  {label:<20} {a['nDCG@10']:.4f}   {a['MRR@10']:.4f}   {a['R@100']:.4f}")
    for label, value in result.summary:
        log(f"{label:<28} {value}")
    if result.collapsed:
        log(f"warning: the final model is a collapsed one: {result.collapsed}")
    log(f"model saved to {shown(Path(result.final))}" + (" (collapsed)" if result.collapsed else ""))
    if result.best is not None:
        best = result.best
        log(f"best model: {shown(Path(best['path']))} (step {best['step']}, {best['metric']} {best['value']:.4f})")
    log(f"run {result.run}: `spladectl runs show {result.run}`")


def train_command():
    """The click command behind `spladectl train`, built on its own (independent of the app and its plugins): sweeps
    turn their points into its command line, with its own checks and messages."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("train")(train)
    return typer.main.get_command(app)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
