"""The engine's own optimizer step, offered through the `optimizer_step` hook so that plugins can wrap it."""

from spladectl.hookspecs import hookimpl


@hookimpl(trylast=True)
def optimizer_step(state):
    return state.run_step()
