"""Representation collapse: when a SPLADE run has stopped learning for good, and what the run then does.

A run has collapsed when, for `patience` consecutive optimizer steps, either

- the queries' or the documents' representations average fewer than MIN_ACTIVE_DIMS active terms: most of them are
  then the zero vector, which scores 0 against everything. log(1 + ReLU(x)) has no gradient where x <= 0, so an
  empty representation gets no signal from the ranking loss to come back; the FLOPS term only pushes further down.
  Healthy SPLADE models keep tens of query terms and hundreds of document terms, and even very sparse ones keep a
  few, so the threshold leaves them alone.
- or the ranking loss is within CHANCE_MARGIN of chance level: the cross-entropy of scores that carry no ranking
  information, the mean over queries of ln(candidates the query is scored against). That is ln(B × (1 + N)) with
  in-batch negatives, ln(1 + N) without, over the global batch of a distributed run, less the columns the loss masks
  (see losses.candidates). This one waits for the end of the learning-rate warm-up: a model that has barely moved
  may still sit near chance.

Every function here works on the step metrics of metrics.jsonl (`query_dims`, `doc_dims`, `ranking`, `chance_loss`,
`candidates`, `step`), so the detector is tested on made-up metric streams and applies to a finished run's file too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from spladectl.errors import SpladectlError

POLICIES = ("stop", "backoff", "warn")
MIN_ACTIVE_DIMS = 1.0
# Within 0.02 nats of chance the positive's average probability is within 2% of 1/candidates: the scores rank nothing.
# A model that learned anything sits tenths of a nat or more below chance.
CHANCE_MARGIN = 0.02
DEFAULT_PATIENCE = 10
MAX_BACKOFFS = 3


@dataclass(frozen=True)
class Collapse:
    """A detected collapse: the step it was detected at, the first step of the streak, what was seen at `step`."""

    step: int
    since: int
    signals: tuple[str, ...]

    def describe(self) -> str:
        return (f"training collapsed at step {self.step}: " + "; ".join(self.signals)
                + f" (every step since step {self.since})")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise SpladectlError(f"--on-collapse {policy!r}: expected one of {', '.join(POLICIES)}")
    return policy


def signals(metrics: Mapping[str, Any], *, min_dims: float = MIN_ACTIVE_DIMS, chance_margin: float = CHANCE_MARGIN,
            check_chance: bool = True) -> list[str]:
    """What in one step's metrics says the run is collapsing, in words with the numbers; empty when nothing does."""
    found = []
    for side, key in (("query", "query_dims"), ("document", "doc_dims")):
        if metrics[key] < min_dims:
            found.append(f"{side} representations average {metrics[key]:.2f} active dimensions (below {min_dims:g})")
    chance, candidates = metrics.get("chance_loss"), metrics.get("candidates", 0)
    # With a single candidate the loss is 0 whatever the model does: it says nothing either way.
    if check_chance and chance is not None and candidates >= 2 and abs(metrics["ranking"] - chance) <= chance_margin:
        found.append(f"the ranking loss {metrics['ranking']:.4f} is at chance level {chance:.4f} "
                     f"(ln of {candidates:.3g} candidates per query)")
    return found


class CollapseDetector:
    """Feed it every step's metrics with `update`; it returns a Collapse once a streak of `patience` collapsed steps
    is complete, and None otherwise (also for the further steps of the same streak).

    `chance_after`: the chance-level signal counts only after this many steps (the learning-rate warm-up).
    """

    def __init__(self, patience: int = DEFAULT_PATIENCE, *, chance_after: int = 0, min_dims: float = MIN_ACTIVE_DIMS,
                 chance_margin: float = CHANCE_MARGIN):
        if patience < 1:
            raise SpladectlError(f"collapse_patience: must be at least 1, got {patience}")
        self.patience = patience
        self.chance_after = chance_after
        self.min_dims = min_dims
        self.chance_margin = chance_margin
        self.streak = 0  # consecutive steps with a signal, up to the last update
        self.healthy = 0  # consecutive steps without one

    @property
    def collapsed(self) -> bool:
        """The last `patience` steps all showed a signal: the model as it is now is a collapsed one."""
        return self.streak >= self.patience

    def update(self, metrics: Mapping[str, Any]) -> Collapse | None:
        found = signals(metrics, min_dims=self.min_dims, chance_margin=self.chance_margin,
                        check_chance=metrics["step"] > self.chance_after)
        if not found:
            self.streak, self.healthy = 0, self.healthy + 1
            return None
        self.streak, self.healthy = self.streak + 1, 0
        if self.streak != self.patience:
            return None
        return Collapse(step=metrics["step"], since=metrics["step"] - self.patience + 1, signals=tuple(found))

    def reset(self) -> None:
        """Forget the streaks (after the run went back to an earlier state)."""
        self.streak = self.healthy = 0
