"""An experiment file's `[search]` table: the ranges and choices `spladectl tune` samples train options from.

    [search]
    lr = { low = 1e-5, high = 3e-4, log = true }     # a float range, sampled on a log scale
    lambda_d = { low = 1e-4, high = 1e-2 }           # a float range, uniform
    n_negatives = { low = 1, high = 4 }              # integers when both ends are integers
    batch_size = { low = 8, high = 32, step = 8 }    # 8, 16, 24 or 32
    precision = ["32-true", "bf16-mixed"]            # one of these

Each dimension becomes one `trial.suggest_*` call of Optuna, under the option's own name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from spladectl.errors import SpladectlError

RANGE_KEYS = ("low", "high", "log", "step")


@dataclass(frozen=True)
class Dimension:
    name: str  # the train option's name (lr, lambda_d, ...)
    choices: tuple[Any, ...] | None = None  # categorical; else a range:
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None

    @property
    def is_int(self) -> bool:
        return self.choices is None and all(isinstance(v, int) for v in (self.low, self.high, self.step or 1))

    def suggest(self, trial) -> Any:
        """This dimension's value for an Optuna trial."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.is_int:
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        scale = ", log scale" if self.log else (f", step {self.step}" if self.step else "")
        return f"{'integer' if self.is_int else 'float'} in [{self.low}, {self.high}]{scale}"

    def to_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {k: v for k, v in (("low", self.low), ("high", self.high), ("log", self.log), ("step", self.step))
                if v not in (None, False)}


def parse_search(table: dict[str, Any], where: str) -> list[Dimension]:
    """The dimensions of a `[search]` table whose keys are already train option names; `where` prefixes errors."""
    return [_dimension(name, spec, f"{where} {name}") for name, spec in table.items()]


def _dimension(name: str, spec: Any, where: str) -> Dimension:
    if isinstance(spec, list):
        if not spec:
            raise SpladectlError(f"{where}: an empty list of choices")
        if not all(isinstance(v, (str, int, float, bool)) for v in spec):
            raise SpladectlError(f"{where}: choices must be strings, numbers or booleans, got {spec!r}")
        if len(set(map(repr, spec))) != len(spec):
            raise SpladectlError(f"{where}: a choice is listed twice in {spec!r}")
        return Dimension(name, choices=tuple(spec))
    if not isinstance(spec, dict):
        raise SpladectlError(f"{where}: expected a list of choices or a range {{ low = ..., high = ... }}, "
                             f"got {spec!r}")
    unknown = sorted(set(spec) - set(RANGE_KEYS))
    if unknown:
        raise SpladectlError(f"{where}: unknown key(s) {', '.join(unknown)}; a range has {', '.join(RANGE_KEYS)}")
    for key in ("low", "high"):
        if key not in spec:
            raise SpladectlError(f"{where}: a range needs `{key}`")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for key, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise SpladectlError(f"{where}: {key} must be a finite number, got {value!r}")
    if not isinstance(log, bool):
        raise SpladectlError(f"{where}: log must be true or false, got {log!r}")
    if low > high:
        raise SpladectlError(f"{where}: low {low} is above high {high}")
    if log and low <= 0:
        raise SpladectlError(f"{where}: a log scale needs low > 0, got {low}")
    if step is not None and step <= 0:
        raise SpladectlError(f"{where}: step must be > 0, got {step}")
    if log and step is not None:
        raise SpladectlError(f"{where}: give either log or step, not both (Optuna samples one or the other)")
    return Dimension(name, low=low, high=high, log=log, step=step)
