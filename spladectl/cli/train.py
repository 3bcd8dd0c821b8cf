"""`spladectl train`: resolve the profile for this machine, then train a SPLADE model.

With no arguments it fine-tunes the embedded splade-tiny on the demo set shipped in the package and prints
retrieval quality on the demo's held-out part before and after.

Distributed: under torchrun each process runs this command (the environment says which rank it is; only rank 0
prints and writes files); with --nproc-per-node it hands the run over to torch.distributed.run first (launch.py).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import typer

from spladectl.config import TrainConfig
from spladectl.errors import SpladectlError

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"

# The demo's own recipe: short enough for a laptop CPU, long enough to move the held-out numbers.
# A tiny model on 240 examples wants a larger learning rate than a BERT-base run (measured on the demo: lr 1e-4 with
# one negative left held-out nDCG@10 flat, 2e-4 with two negatives raised it by 0.03).
DEMO_DEFAULTS = {"epochs": 2, "lr": 2e-4, "n_negatives": 2, "batch_size": 16, "grad_accum": 1, "max_doc_length": 128,
                 "max_query_length": 32}
# The options that start processes; everything else is passed on to each process unchanged.
LAUNCH_OPTIONS = {"nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port"}
DISTRIBUTED = "Distributed (torchrun)"


def train(
    ctx: typer.Context,
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Hardware profile name or TOML path (default: detected for this machine)."),
    model: str = typer.Option("splade-tiny", "--model", "-m", help="Masked-LM checkpoint: hub name, local path, or splade-tiny (offline)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Training data: seed JSON/JSONL, TSV triples or a BEIR directory (default: the built-in demo)."),
    split: str = typer.Option("train", "--split", help="qrels split to train on when --data is a BEIR directory."),
    output_dir: Path = typer.Option(Path("output"), "--output-dir", "-o", help="Where checkpoints, metrics.jsonl, config.toml and final/ go."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Passes over the data (default 1; the demo uses 2)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer steps (overrides --epochs)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="Examples per micro-batch per device (default: from the profile)."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", min=1, help="Micro-batches per optimizer step (default: from the profile)."),
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
    resume: Optional[str] = typer.Option(None, "--resume", help="'latest' or a checkpoint directory: continue that run exactly."),
    plugin: list[str] = typer.Option([], "--plugin", help="module:object to register as a plugin for this run (repeatable)."),
    memory_tracking: bool = typer.Option(False, "--memory-tracking", help="Record per-step memory peaks and print a summary."),
    memory_efficient: bool = typer.Option(False, "--memory-efficient", help="Also checkpoint the encoder's activations (slower, much less memory)."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="BEIR directory to evaluate on during training."),
    eval_split: str = typer.Option("test", "--eval-split", help="qrels split of --eval-data."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", min=1, help="Evaluate every N optimizer steps; the best model goes to OUTPUT/best."),
    eval_metric: str = typer.Option("nDCG@10", "--eval-metric", help="Metric that picks the best checkpoint."),
    patience: Optional[int] = typer.Option(None, "--patience", min=1, help="Stop after N evaluations without improvement."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the final summary as JSON on stdout."),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", min=1, rich_help_panel=DISTRIBUTED, help="Start N training processes on this machine through torch.distributed.run, one per GPU (nccl) or N CPU processes (gloo). --batch-size stays per process."),
    nnodes: Optional[int] = typer.Option(None, "--nnodes", min=1, rich_help_panel=DISTRIBUTED, help="Machines taking part (default 1); run the same command on each, with its own --node-rank."),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", min=0, rich_help_panel=DISTRIBUTED, help="This machine's number, 0 to nnodes-1 (default 0); rank 0's machine writes the outputs."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", rich_help_panel=DISTRIBUTED, help="Address of the --node-rank 0 machine, reachable by all (needed with --nnodes > 1)."),
    master_port: Optional[int] = typer.Option(None, "--master-port", min=1, max=65535, rich_help_panel=DISTRIBUTED, help="Free TCP port on that machine (default: any free port on one machine, 29500 on several)."),
    cross_device_negatives: bool = typer.Option(True, "--cross-device-negatives/--no-cross-device-negatives", rich_help_panel=DISTRIBUTED, help="Score each query against the documents of every process, not only its own (the contrastive loss sees the global batch)."),
) -> None:
    """Train a SPLADE model with the resolved hardware profile; prints the settings and why they were chosen."""
    given = dict(locals())  # first: exactly the command's parameters
    launcher = dict(nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                    master_port=master_port)
    if any(value is not None for value in launcher.values()):
        from spladectl.launch import LaunchOptions, command_line, launch

        if nproc_per_node is None:
            raise SpladectlError("--nnodes, --node-rank, --master-addr and --master-port go with --nproc-per-node",
                                 hint="add --nproc-per-node N: the number of processes (GPUs) on this machine")
        options = LaunchOptions(nproc_per_node, nnodes or 1, node_rank or 0, master_addr, master_port)
        launch(options, command_line(ctx, skip=LAUNCH_OPTIONS))
        return

    from spladectl import distributed

    world = distributed.World.from_env()
    with distributed.reporting_failures(world):
        _train_here(world, **{k: v for k, v in given.items() if k != "ctx" and k not in LAUNCH_OPTIONS})


def _train_here(world, *, profile, model, data, split, output_dir, epochs, max_steps, batch_size, grad_accum,
                precision, device, force_device, lr, lambda_q, lambda_d, flops_warmup_steps, flops_schedule,
                regularizer, distillation, distillation_weight, n_negatives, in_batch_negatives, scheduler,
                warmup_ratio, max_query_length, max_doc_length, seed, save_every, keep_last, resume, plugin,
                memory_tracking, memory_efficient, eval_data, eval_split, eval_every, eval_metric, patience, progress,
                as_json, cross_device_negatives) -> None:
    """The run of this process (one of several under torchrun, where rank 0 alone prints and writes files)."""
    from spladectl import distributed
    from spladectl import plugins as plugin_registry
    from spladectl.resolve import resolve_for_machine

    demo = data is None
    if world.is_main:
        log = (lambda msg: typer.echo(msg, err=True)) if as_json else typer.echo
    else:
        log = lambda msg: None  # noqa: E731
    flags = {k: v for k, v in dict(batch_size=batch_size, grad_accum=grad_accum, precision=precision, device=device,
                                   force_device=force_device, max_query_length=max_query_length,
                                   max_doc_length=max_doc_length).items() if v is not None}
    if demo:
        for key in ("batch_size", "grad_accum", "max_query_length", "max_doc_length"):
            flags.setdefault(key, DEMO_DEFAULTS[key])
    resolved = resolve_for_machine(profile, flags=flags, env=os.environ)

    pm = plugin_registry.load_plugins()
    for spec in plugin:
        plugin_registry.add_plugin(spec)

    config = TrainConfig(
        model=model, data=data, output_dir=str(output_dir), profile=resolved.name, **resolved.values,
        epochs=epochs or (DEMO_DEFAULTS["epochs"] if demo else 1), max_steps=max_steps,
        lr=lr if lr is not None else (DEMO_DEFAULTS["lr"] if demo else TrainConfig.lr),
        seed=seed, save_every=save_every, keep_last=keep_last, plugins=list(plugin),
        memory_tracking=memory_tracking, eval_data=eval_data, eval_split=eval_split, eval_every=eval_every,
        eval_metric=eval_metric, early_stopping_patience=patience, in_batch_negatives=in_batch_negatives,
        cross_device_negatives=cross_device_negatives,
    )
    if demo and n_negatives is None:
        n_negatives = DEMO_DEFAULTS["n_negatives"]
    for key, value in dict(lambda_q=lambda_q, lambda_d=lambda_d, flops_warmup_steps=flops_warmup_steps,
                           flops_schedule=flops_schedule, regularizer=regularizer, distillation=distillation,
                           distillation_weight=distillation_weight, n_negatives=n_negatives, scheduler=scheduler,
                           warmup_ratio=warmup_ratio).items():
        if value is not None:
            setattr(config, key, value)
    if memory_efficient:
        config.gradient_checkpointing = True

    from spladectl.data import load_training_data

    examples = load_training_data(str(DEMO_DIR / "train.jsonl") if demo else data, split=split)
    eval_fn, heldout = _eval_function(config, demo)

    log("spladectl train: " + ("the built-in demo (splade-tiny, offline)" if demo else f"{model} on {data}"))
    for line in settings_lines(resolved):
        log(f"  {line}")
    log(f"  examples {len(examples)}, {effective_batch_text(config)}, epochs {config.epochs}"
        + (f", max steps {config.max_steps}" if config.max_steps else ""))

    from spladectl.engine import Trainer

    distributed.start(world, config.device)
    with plugin_registry.naming_plugin_errors(pm):
        trainer = Trainer(config, examples, pm=pm, log=log, eval_fn=eval_fn if eval_every else None,
                          progress=progress, world=world)
    before = None
    if heldout is not None and world.is_main:
        log("held-out quality before training …")
        before = eval_fn(trainer.state.model)
    if resume:
        from spladectl.checkpoint import find_checkpoint

        with plugin_registry.naming_plugin_errors(pm):
            trainer.resume(find_checkpoint(resume, output_dir))
    if world.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.toml").write_text(config.to_toml())

    started = time.perf_counter()
    with plugin_registry.naming_plugin_errors(pm):
        result = trainer.fit()
    distributed.stop()
    if not world.is_main:
        return
    result["train_seconds"] = round(time.perf_counter() - started, 2)
    result["examples_per_s"] = trainer.state.examples_seen / max(result["train_seconds"], 1e-9)
    if heldout is not None:
        log("held-out quality after training …")
        result["heldout_before"], result["heldout_after"] = before, eval_fn(trainer.state.model)
    result["summary"] = [list(row) for row in plugin_registry.summary_rows(trainer.state, pm)]
    _report(result, config, log, as_json)


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
    from spladectl.evaluate import evaluate_encoder, load_beir

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


def _report(result: dict, config: TrainConfig, log, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    m = result["last_metrics"]
    log(f"done: {result['steps']} optimizer steps in {result['train_seconds']:.1f} s "
        f"({result['examples_per_s']:.1f} examples/s, {config.precision}), skipped {result['skipped_steps']}")
    if m:
        log(f"final loss {m['loss']:.4f}, query dims {m['query_dims']:.1f}, document dims {m['doc_dims']:.1f}")
    if "heldout_before" in result:
        b, a = result["heldout_before"], result["heldout_after"]
        log("held-out retrieval     nDCG@10   MRR@10   R@100")
        log(f"  before training      {b['nDCG@10']:.4f}   {b['MRR@10']:.4f}   {b['R@100']:.4f}")
        log(f"  after training       {a['nDCG@10']:.4f}   {a['MRR@10']:.4f}   {a['R@100']:.4f}")
    for label, value in result["summary"]:
        log(f"{label:<28} {value}")
    log(f"model saved to {result['final']}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
