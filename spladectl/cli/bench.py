"""`spladectl bench`: real training steps in each precision on this machine; speed, memory, FLOP/s, max batch.

Progress goes to stderr; the table (or with --json a list of rows, one per precision) to stdout. See
spladectl/bench/ for what is measured and how, and docs/benchmarks.md for results.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from spladectl.bench.settings import DEFAULT_PRECISIONS


def bench(
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Hardware profile name or TOML path (default: detected for this machine)."),
    model: str = typer.Option("splade-tiny", "--model", "-m", help="Masked-LM checkpoint: hub name, local path, or splade-tiny (offline)."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, mps or cpu (default: from the profile); falls back when unavailable."),
    precisions: str = typer.Option(DEFAULT_PRECISIONS, "--precisions", help="Comma-separated precisions to run (32-true, bf16-mixed, 16-mixed or aliases); unsupported ones are reported as skipped."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="Examples per step, the same for every precision (default: the profile's batch size)."),
    steps: int = typer.Option(5, "--steps", min=1, help="Timed optimizer steps per precision."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed warm-up steps before them."),
    rounds: int = typer.Option(1, "--rounds", min=1, help="Run the precisions this many times in turn, each time in fresh processes; report medians over the rounds and the median of each round's speed-up (3 or more on a shared machine, whose speed drifts)."),
    max_query_length: Optional[int] = typer.Option(None, "--max-query-length", min=1, help="Query tokens (default: from the profile)."),
    max_doc_length: Optional[int] = typer.Option(None, "--max-doc-length", min=1, help="Document tokens (default: from the profile); the synthetic documents fill it."),
    find_max_batch: bool = typer.Option(False, "--find-max-batch", help="Also search the largest batch whose step fits --memory-budget (each probe is two real steps)."),
    memory_budget: Optional[float] = typer.Option(None, "--memory-budget", min=0.01, help="GiB for --find-max-batch (default: 90% of the GPU, or 80% of this process's RSS plus available RAM)."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute encoder activations in backward (default: from the profile)."),
    memory_efficient_head: bool = typer.Option(True, "--memory-efficient-head/--plain-head", help="The chunked SPLADE head (default) or full logits + max-pool."),
    memory_efficient: bool = typer.Option(False, "--memory-efficient", help="As `train --memory-efficient`: gradient checkpointing, and gradient caching in chunks of 32 texts when a batch has more documents (with --find-max-batch: the largest batch in the least memory)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the encoder, as `train --compile` does; the compiling step is a warm-up step, so give --warmup 2 or more."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's choice)."),
    top_ops: int = typer.Option(0, "--top-ops", min=0, help="Profile one extra step per precision and list its N most expensive ops."),
    profile_step: bool = typer.Option(False, "--profile-step", help="Profile one extra step per precision and print where its time goes: data, encoder, the SPLADE head forward and backward, loss, optimizer; matrix products against element-wise work."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Benchmark on this training data (any `spladectl train --data` format) instead of synthetic examples."),
    seed: int = typer.Option(42, "--seed", help="Seed for data order and initialisation."),
    isolate: bool = typer.Option(True, "--isolate/--in-process", help="Run each precision in its own process (default), so each peak memory is its own; --in-process is quicker."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON (a list, one object per precision)."),
    plot_file: Optional[Path] = typer.Option(None, "--plot", help="Write bar charts of examples/s and peak memory per precision to this image file (needs matplotlib)."),
) -> None:
    """Run real training steps in each precision and report step time, examples/s, speed-up over 32-true, peak
    memory, achieved FLOP/s against this device's own matmul peak, and optionally the largest batch that fits."""
    from spladectl.bench.report import plot, render_table
    from spladectl.bench.run import run_bench
    from spladectl.bench.settings import BenchSettings, parse_precisions
    from spladectl.hardware import detect
    from spladectl.resolve import resolve_for_machine

    chosen = parse_precisions(precisions)  # a typo fails here, before anything loads
    if plot_file is not None:
        _check_plot_target(plot_file)
    log = lambda msg: typer.echo(msg, err=True)
    flags = {k: v for k, v in dict(batch_size=batch_size, device=device, max_query_length=max_query_length,
                                   max_doc_length=max_doc_length,
                                   gradient_checkpointing=gradient_checkpointing).items() if v is not None}
    facts = detect()
    resolved = resolve_for_machine(profile, flags=flags, env=os.environ, facts=facts)
    settings = BenchSettings(
        model=model, device=resolved.device, precisions=chosen, batch_size=resolved.batch_size, steps=steps,
        warmup=warmup, max_query_length=resolved.max_query_length, max_doc_length=resolved.max_doc_length,
        tf32=resolved.tf32, gradient_checkpointing=resolved.gradient_checkpointing,
        memory_efficient_head=memory_efficient_head, memory_efficient=memory_efficient, compile=compile,
        dataloader_workers=resolved.dataloader_workers,
        find_max_batch=find_max_batch, memory_budget_gb=memory_budget, top_ops=top_ops, profile_step=profile_step, data=data,
        profile=resolved.name, seed=seed, threads=threads,
    )
    log(f"spladectl bench: {model} on {settings.device} (profile {resolved.name}), batch {settings.batch_size}, "
        f"query/doc ≤ {settings.max_query_length}/{settings.max_doc_length} tokens, "
        f"{'data ' + data if data else 'synthetic examples (documents filled to the doc length)'}")
    for key, reason in resolved.changes.items():
        if key != "precision":  # the bench runs the precisions it is given, each checked for support
            log(f"  fallback: {reason}")
    rows = run_bench(settings, log=log, facts=facts, isolate=isolate, rounds=rounds)
    if plot_file is not None:
        written = plot(rows, plot_file)
        log(f"plot written to {written}")
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    from spladectl.cli import output

    render_table(rows, output.console())


def _check_plot_target(path: Path) -> None:
    from spladectl.errors import SpladectlError

    if path.is_dir():
        raise SpladectlError(f"--plot: {path} is a directory; give an image file name such as bench.png")
    if not path.parent.exists():
        raise SpladectlError(f"--plot: directory {path.parent} does not exist")
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise SpladectlError("--plot needs matplotlib", hint="pip install 'spladectl[bench]'") from exc


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
