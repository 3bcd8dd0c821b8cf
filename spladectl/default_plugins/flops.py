"""The sparsity regularizer for queries and documents with its λ schedule.

`regularizer = "flops"` (default) uses FLOPS (sum over the vocabulary of the squared batch-mean activation), `"l1"`
the mean L1 norm; either is weighted by λq / λd, which ramp from 0 over `flops_warmup_steps` following
`flops_schedule` (quadratic as in naver/splade, linear, or constant). The λ values come from the `flops_weight` hook,
so a plugin can replace the schedule.
"""

from __future__ import annotations

from spladectl import losses
from spladectl.errors import SpladectlError
from spladectl.hookspecs import hookimpl

REGULARIZERS = {"flops": losses.flops, "l1": losses.l1}


def current_lambdas(pm, state) -> tuple[float, float]:
    c = state.config
    warmup = losses.flops_warmup_steps(c.flops_warmup_steps, state.total_steps)
    lq = pm.hook.flops_weight(name="query", step=state.step, target=c.lambda_q, warmup_steps=warmup, state=state)
    ld = pm.hook.flops_weight(name="document", step=state.step, target=c.lambda_d, warmup_steps=warmup, state=state)
    return lq, ld


def check_config(config) -> None:
    if config.regularizer not in REGULARIZERS:
        raise SpladectlError(f"--regularizer {config.regularizer!r}: expected one of {', '.join(REGULARIZERS)}")
    if config.flops_schedule not in losses.FLOPS_SCHEDULES:
        raise SpladectlError(f"--flops-schedule {config.flops_schedule!r}: expected one of "
                             f"{', '.join(losses.FLOPS_SCHEDULES)}")


class SparsityRegularizer:
    """Keeps a reference to the plugin manager it is registered with, to ask it for the λ values."""

    def __init__(self, manager):
        self.manager = manager

    @hookimpl
    def on_train_start(self, state):
        check_config(state.config)  # fail before the first step, not in the middle of it

    @hookimpl(trylast=True)
    def flops_weight(self, name, step, target, warmup_steps, state):
        return losses.flops_weight(target, step, warmup_steps, state.config.flops_schedule)

    @hookimpl
    def loss_terms(self, inputs, state):
        check_config(state.config)
        lq, ld = current_lambdas(self.manager, state)
        state.extras["flops_lambdas"] = (lq, ld)  # logged by on_step_end for the step that used them
        kind = state.config.regularizer
        regularize = REGULARIZERS[kind]
        terms = {}
        if lq:
            terms[f"{kind}_q"] = lq * regularize(inputs.query)
        if ld:
            terms[f"{kind}_d"] = ld * regularize(inputs.documents.reshape(-1, inputs.documents.shape[-1]))
        return terms

    @hookimpl
    def on_step_end(self, state, metrics):
        metrics["lambda_q"], metrics["lambda_d"] = state.extras.get("flops_lambdas", (0.0, 0.0))


def plugin(manager) -> SparsityRegularizer:
    return SparsityRegularizer(manager)
