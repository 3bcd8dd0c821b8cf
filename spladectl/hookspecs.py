"""The eight hooks a spladectl plugin can implement (docs/plugins.md has an example of each).

An implementation may declare any subset of a hook's arguments (pluggy passes only those), so adding an argument here
later never breaks a plugin. `train` and `train_step` run the engine's own code inside them: implement them as
wrappers, `@hookimpl(wrapper=True)`, that `yield` to it and return what it returned (possibly with keys added).

In a distributed run every process calls the training hooks, except on_evaluate (rank 0, which alone evaluates);
`state.rank`, `state.world_size` and `state.is_main_process` say which process runs.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch
    import typer

    from spladectl.engine import TrainState
    from spladectl.losses import LossInputs

hookspec = pluggy.HookspecMarker("spladectl")
hookimpl = pluggy.HookimplMarker("spladectl")


@hookspec
def register_commands(cli: typer.Typer) -> None:
    """Add commands or command groups to the `spladectl` CLI; called once at start-up, after the built-in commands."""


@hookspec
def register_profiles(register: Callable[..., None]) -> None:
    """Add hardware profiles: call `register(path_or_mapping, origin="my-package")` for each TOML file or table
    (a table needs a `name`). Called whenever the profile registry is built, after the shipped profiles."""


@hookspec(firstresult=True)
def train(state: TrainState) -> Generator[None, dict[str, Any], dict[str, Any]]:
    """Around the whole training, from the first step to the evaluation of the final model: code before `yield`
    runs once everything is built (also after a resume, with `state.step` at the checkpoint's), code after it once
    training has ended; the result is the training's summary (`status`, `steps`, `final`, `evaluation`, ...). When
    training fails or is interrupted, `yield` raises that exception."""


@hookspec(firstresult=True)
def train_step(state: TrainState) -> Generator[None, dict[str, Any], dict[str, Any]]:
    """Around one optimizer step (all its micro-batches and the update); the result is the step's metrics, and keys
    a wrapper adds to it are written to metrics.jsonl. `tryfirst=True` makes a wrapper the outermost one, which sees
    every other wrapper's keys (what a logger wants)."""


@hookspec
def loss_terms(inputs: LossInputs, state: TrainState) -> Mapping[str, torch.Tensor] | None:
    """Return named scalar loss terms to add to the ranking loss for this micro-batch (collected from every plugin;
    each is logged under its name). `inputs` holds query (B, V), documents (B, 1+N, V), scores, teacher_scores; in a
    distributed run, every process's examples, `inputs.local_rows` being this process's."""


@hookspec(firstresult=True)
def make_optimizer(model: torch.nn.Module, state: TrainState) -> torch.optim.Optimizer | None:
    """Build the optimizer once, before any resume; the first plugin to return one wins (default: AdamW)."""


@hookspec(firstresult=True)
def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, state: TrainState
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Build the LR scheduler, stepped once per optimizer step; first result wins (default: --scheduler, linear
    warm-up then linear decay, cosine or constant)."""


@hookspec
def on_evaluate(state: TrainState, metrics: dict[str, float], final: bool) -> None:
    """After each evaluation with its retrieval metrics: every --eval-every steps, and of the model training ended
    with (`final=True`; the best one when the final one collapsed). Rank 0 only, which evaluates."""
