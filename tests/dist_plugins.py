"""Plugins loaded with --plugin by the processes of the distributed tests (tests/ is on their PYTHONPATH)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from spladectl.errors import SpladectlError
from spladectl.hookspecs import hookimpl

PROBE_DIR = "SPLADECTL_TEST_PROBE_DIR"


class NoDropout:
    """Dropout off, so that runs with different numbers of processes compute the same network."""

    @hookimpl(wrapper=True)
    def train(self, state):
        state.model.eval()
        return (yield)


class PlainSGD:
    """SGD, whose update is the gradient itself: Adam's first steps are about each gradient element's sign, which
    turns rounding noise in gradients that are zero but for it (the attention key biases) into visible differences."""

    @hookimpl
    def make_optimizer(self, model, state):
        return torch.optim.SGD(model.parameters(), lr=0.05)


class RankProbe:
    """Writes what each process's plugins see of the run to $SPLADECTL_TEST_PROBE_DIR/rank-R.json."""

    @hookimpl(wrapper=True)
    def train(self, state):
        self.seen = {"rank": state.rank, "world_size": state.world_size, "main": state.is_main_process,
                     "device": str(state.device), "steps": []}
        try:
            result = yield
        except BaseException:
            self._write(state, "failed")
            raise
        self._write(state, result["status"])
        return result

    @hookimpl
    def loss_terms(self, inputs, state):
        rows = inputs.local_rows
        embeddings = state.model.model.get_input_embeddings().weight

        def reaches_the_model(reps) -> bool:
            """Whether these rows of the gathered batch back-propagate into this process's model."""
            (grad,) = torch.autograd.grad(reps.sum(), embeddings, retain_graph=True, allow_unused=True)
            return grad is not None and bool(grad.abs().sum() > 0)

        others = torch.cat([inputs.query[: rows.start], inputs.query[rows.stop :]])
        self.seen["steps"].append({"batch": inputs.query.shape[0], "local": [rows.start, rows.stop],
                                   "local_grad": reaches_the_model(inputs.query[rows]),
                                   "other_grad": reaches_the_model(others)})
        return None

    def _write(self, state, status):
        self.seen["status"] = status
        path = Path(os.environ[PROBE_DIR]) / f"rank-{state.rank}.json"
        path.write_text(json.dumps(self.seen))


class FailOnRankOne:
    """A user error on rank 1 in the middle of the second step, while rank 0 carries on into its collectives."""

    @hookimpl
    def loss_terms(self, inputs, state):
        if state.rank == 1 and state.step == 1:
            raise SpladectlError("the quota of /scratch is exhausted (raised on purpose by the test)")
        return None


class SameScoreEveryTime:
    """Reports the same nDCG@10 from every evaluation: the first is the best, so with --patience 1 the run stops
    after the second evaluation, at a step known in advance."""

    @hookimpl
    def on_evaluate(self, state, metrics):  # `final` left out: a plugin declares only the arguments it uses
        metrics["nDCG@10"] = 0.5
