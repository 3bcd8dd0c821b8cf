"""The sparsity regularizer for queries and documents with its λ schedule.

`regularizer = "flops"` (default) uses FLOPS (sum over the vocabulary of the squared batch-mean activation), `"l1"`
the mean L1 norm; either is weighted by λq / λd, which ramp from 0 over `flops_warmup_steps` following
`flops_schedule` (quadratic as in naver/splade, linear, or constant). Each step's λ values are logged as `lambda_q`
and `lambda_d`.
"""

from __future__ import annotations

from spladectl import losses
from spladectl.errors import SpladectlError
from spladectl.hookspecs import hookimpl

REGULARIZERS = {"flops": losses.flops, "l1": losses.l1}


def current_lambdas(state) -> tuple[float, float]:
    c = state.config
    warmup = losses.flops_warmup_steps(c.flops_warmup_steps, state.total_steps)
    return (losses.flops_weight(c.lambda_q, state.step, warmup, c.flops_schedule),
            losses.flops_weight(c.lambda_d, state.step, warmup, c.flops_schedule))


def check_config(config) -> None:
    if config.regularizer not in REGULARIZERS:
        raise SpladectlError(f"--regularizer {config.regularizer!r}: expected one of {', '.join(REGULARIZERS)}")
    if config.flops_schedule not in losses.FLOPS_SCHEDULES:
        raise SpladectlError(f"--flops-schedule {config.flops_schedule!r}: expected one of "
                             f"{', '.join(losses.FLOPS_SCHEDULES)}")


@hookimpl(wrapper=True)
def train(state):
    check_config(state.config)  # fail before the first step, not in the middle of it
    return (yield)


@hookimpl
def loss_terms(inputs, state):
    check_config(state.config)
    lq, ld = current_lambdas(state)
    kind = state.config.regularizer
    regularize = REGULARIZERS[kind]
    terms = {}
    if lq:
        terms[f"{kind}_q"] = lq * regularize(inputs.query)
    if ld:
        terms[f"{kind}_d"] = ld * regularize(inputs.documents.reshape(-1, inputs.documents.shape[-1]))
    return terms


@hookimpl(wrapper=True)
def train_step(state):
    lambdas = current_lambdas(state)  # before the step: the values its loss used
    metrics = yield
    metrics["lambda_q"], metrics["lambda_d"] = lambdas
    return metrics
