"""Distillation from teacher scores: MarginMSE (default) or KL, active only when the data carries teacher scores.

`distillation = "margin-mse" | "kl"` picks the term, `distillation_weight` scales it (0 turns it off). The term is
logged under its kind's name ("margin-mse" or "kl") with the weight applied.
"""

from __future__ import annotations

from spladectl import losses
from spladectl.errors import SpladectlError
from spladectl.hookspecs import hookimpl

KINDS = {"margin-mse": losses.margin_mse, "kl": losses.kl_distillation}


def check_config(config) -> None:
    if config.distillation not in KINDS:
        raise SpladectlError(f"--distillation {config.distillation!r}: expected one of {', '.join(KINDS)}")


@hookimpl
def loss_terms(inputs, state):
    if inputs.teacher_scores is None or not state.config.distillation_weight:
        return None
    check_config(state.config)
    kind = state.config.distillation
    return {kind: state.config.distillation_weight * KINDS[kind](inputs)}


@hookimpl(wrapper=True)
def train(state):
    check_config(state.config)  # fail before the first step, not in the middle of it
    return (yield)
