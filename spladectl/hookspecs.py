"""The hooks a spladectl plugin can implement.

Implementations may declare any subset of a hook's arguments (pluggy passes only those), so adding an argument here
later never breaks an existing plugin. See docs/plugins.md for when each hook runs, with examples.

In a distributed run every process calls the training hooks, except on_evaluate, on_checkpoint_saved, summary_rows
and on_run_end (rank 0 only, which alone has the run); `state.rank`, `state.world_size` and `state.is_main_process`
say which process runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import pluggy

if TYPE_CHECKING:
    import torch
    import typer

    from spladectl.engine import TrainState
    from spladectl.losses import LossInputs
    from spladectl.runs.record import RunRecord

hookspec = pluggy.HookspecMarker("spladectl")
hookimpl = pluggy.HookimplMarker("spladectl")


@hookspec
def register_commands(cli: "typer.Typer") -> None:
    """Add commands or command groups to the `spladectl` CLI; called once at start-up, after the built-in commands."""


@hookspec
def register_profiles(register: Callable[..., None]) -> None:
    """Add hardware profiles: call `register(path_or_mapping, origin="my-package")` for each TOML file or table
    (a table needs a `name`). Called whenever the profile registry is built, after the shipped profiles."""


@hookspec
def loss_terms(inputs: "LossInputs", state: "TrainState") -> "Mapping[str, torch.Tensor] | None":
    """Return named scalar loss terms to add to the ranking loss for this micro-batch (collected from every plugin;
    each is logged under its name). `inputs` holds query (B, V), documents (B, 1+N, V), scores, teacher_scores; in a
    distributed run, every process's examples, `inputs.local_rows` being this process's."""


@hookspec(firstresult=True)
def make_optimizer(model: "torch.nn.Module", state: "TrainState") -> "torch.optim.Optimizer | None":
    """Build the optimizer once, before any resume; the first plugin to return one wins (default: AdamW)."""


@hookspec(firstresult=True)
def make_lr_scheduler(
    optimizer: "torch.optim.Optimizer", total_steps: int, state: "TrainState"
) -> "torch.optim.lr_scheduler.LRScheduler | None":
    """Build the LR scheduler, stepped once per optimizer step; first result wins (default: --scheduler, linear
    warm-up then linear decay, cosine or constant)."""


@hookspec(firstresult=True)
def flops_weight(name: str, step: int, target: float, warmup_steps: int, state: "TrainState") -> float | None:
    """The sparsity weight λ for `name` ("query" or "document") at optimizer step `step` (from 0), given the
    configured `target` and warm-up; first result wins (default: --flops-schedule)."""


@hookspec(firstresult=True)
def optimizer_step(state: "TrainState") -> "dict[str, Any] | None":
    """Run one optimizer step (all its micro-batches and the update); the engine implements it, and plugins wrap it
    with `@hookimpl(wrapper=True)` and `yield` to measure around it (memory trackers, timers)."""


@hookspec
def on_train_start(state: "TrainState") -> None:
    """Called once the model, optimizer and data are ready, before the first step (also after a resume, with
    `state.step` at the checkpoint's step)."""


@hookspec
def on_step_end(state: "TrainState", metrics: dict[str, Any]) -> None:
    """Called after each optimizer step with its metrics; keys added to `metrics` are written to metrics.jsonl
    (after every implementation ran: a logger that wants them all is `trylast`)."""


@hookspec
def on_evaluate(state: "TrainState", metrics: dict[str, float]) -> None:
    """Called after an evaluation during training with its retrieval metrics (on rank 0, which evaluates)."""


@hookspec
def on_checkpoint_saved(state: "TrainState", path: str) -> None:
    """Called after a checkpoint directory has been written completely (on rank 0, which writes it)."""


@hookspec
def on_train_end(state: "TrainState", status: str) -> None:
    """Called once when training stops, also on failure; `status` is "finished", "failed" or "interrupted"."""


@hookspec
def on_run_end(state: "TrainState", run: "RunRecord") -> None:
    """Called by `spladectl train` (and each sweep point) once the run directory is complete: final model written,
    evaluations done, run.json saved with `run.status` and the summary metrics. Also after a failure or Ctrl-C, if
    training had started. In a distributed run, on rank 0 only (it writes the run directory; `run.world_size` says
    how many processes trained). Not called when a Trainer is driven from Python without the run machinery."""


@hookspec
def summary_rows(state: "TrainState") -> "list[tuple[str, str]] | None":
    """Rows (label, value) for the end-of-training summary (labels up to 28 characters), e.g. memory peaks;
    collected from every plugin (`spladectl.plugins.summary_rows` flattens them)."""
