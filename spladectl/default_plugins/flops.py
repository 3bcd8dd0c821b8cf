"""The FLOPS sparsity regularizer for queries and documents, with its λ ramp."""

from __future__ import annotations

from spladectl import losses
from spladectl.hookspecs import hookimpl


def _warmup_steps(state) -> int:
    configured = state.config.flops_warmup_steps
    # naver/splade ramps over 50k steps; a short run needs the ramp to end well before it does.
    return configured if configured is not None else max(1, state.total_steps // 3)


def current_lambdas(pm, state) -> tuple[float, float]:
    c, warmup = state.config, _warmup_steps(state)
    lq = pm.hook.flops_weight(name="query", step=state.step, target=c.lambda_q, warmup_steps=warmup, state=state)
    ld = pm.hook.flops_weight(name="document", step=state.step, target=c.lambda_d, warmup_steps=warmup, state=state)
    return lq, ld


@hookimpl(trylast=True)
def flops_weight(name, step, target, warmup_steps, state):
    return losses.flops_weight(target, step, warmup_steps, state.config.flops_schedule)


@hookimpl
def loss_terms(inputs, state):
    from spladectl.plugins import pm

    lq, ld = current_lambdas(pm, state)
    state.extras["flops_lambdas"] = (lq, ld)  # logged by on_step_end for the step that used them
    terms = {}
    if lq:
        terms["flops_q"] = lq * losses.flops(inputs.query)
    if ld:
        terms["flops_d"] = ld * losses.flops(inputs.documents.reshape(-1, inputs.documents.shape[-1]))
    return terms


@hookimpl
def on_step_end(state, metrics):
    metrics["lambda_q"], metrics["lambda_d"] = state.extras.get("flops_lambdas", (0.0, 0.0))
