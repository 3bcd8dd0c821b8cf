"""Distillation from teacher scores (MarginMSE or KL), active only when the data carries them."""

from __future__ import annotations

from spladectl import losses
from spladectl.errors import SpladectlError
from spladectl.hookspecs import hookimpl

KINDS = {"margin-mse": losses.margin_mse, "kl": losses.kl_distillation}


@hookimpl
def loss_terms(inputs, state):
    if inputs.teacher_scores is None or not state.config.distillation_weight:
        return None
    kind = state.config.distillation
    if kind not in KINDS:
        raise SpladectlError(f"--distillation {kind!r}: expected one of {', '.join(KINDS)}")
    return {kind: state.config.distillation_weight * KINDS[kind](inputs)}
