"""Default optimizer (AdamW) and LR schedules (linear warm-up then linear decay, cosine, constant)."""

from __future__ import annotations

import math

import torch

from spladectl.errors import SpladectlError
from spladectl.hookspecs import hookimpl

SCHEDULES = ("linear", "cosine", "constant")


@hookimpl(trylast=True)
def make_optimizer(model, state):
    config = state.config
    # Biases and LayerNorm weights are conventionally not decayed.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel runs the whole update in one pass where torch has it for the device; foreach otherwise.
    try:
        return torch.optim.AdamW(groups, lr=config.lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=config.lr, foreach=True)


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """The LR multiplier after `step` optimizer steps."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@hookimpl(trylast=True)
def make_lr_scheduler(optimizer, total_steps, state):
    config = state.config
    if config.scheduler not in SCHEDULES:
        raise SpladectlError(f"--scheduler {config.scheduler!r}: expected one of {', '.join(SCHEDULES)}")
    warmup = int(round(config.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config.scheduler, step, total_steps, warmup)
    )
