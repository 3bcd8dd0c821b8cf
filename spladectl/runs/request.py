"""A training as asked for: the `spladectl train` options as one frozen value, checked in one place.

`spladectl train` builds it from its options, `spladectl sweep` from each point's settings (parsed by the train
command itself, so both get the same checks and defaults); `runs.training.run_training` takes it and runs the plan,
the profile resolution, the engine and the evaluation. Defaults live in the train command's options alone: a request
always carries every field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spladectl.errors import SpladectlError

# With --from-run, only what does not change the training itself may be given.
FROM_RUN_OPTIONS = {"from_run", "runs_root", "output_dir", "name", "tag", "track", "mlflow_uri", "progress"}


@dataclass(frozen=True)
class TrainRequest:
    # the run: where it goes, what it is called, where it comes from
    runs_root: Path
    output_dir: Path | None
    name: str | None
    tag: tuple[str, ...]
    from_run: str | None
    resume: str | None
    track: tuple[str, ...]
    mlflow_uri: str | None
    plugin: tuple[str, ...]
    progress: bool
    # what is trained on what
    profile: str | None
    model: str
    data: str | None
    split: str
    seed: int
    # how long, how much at once, in which precision (None: from the profile or the defaults)
    epochs: int | None
    max_steps: int | None
    batch_size: int | None
    grad_accum: int | None
    grad_cache_chunk: int | None
    precision: str | None
    device: str | None
    force_device: str | None
    max_query_length: int | None
    max_doc_length: int | None
    memory_efficient: bool
    memory_tracking: bool
    # the loss and the optimizer
    lr: float | None
    scheduler: str | None
    warmup_ratio: float | None
    n_negatives: int | None
    in_batch_negatives: bool
    cross_device_negatives: bool
    lambda_q: float | None
    lambda_d: float | None
    flops_warmup_steps: int | None
    flops_schedule: str | None
    regularizer: str | None
    distillation: str | None
    distillation_weight: float | None
    on_collapse: str | None
    # checkpoints and evaluation
    save_every: int | None
    keep_last: int
    eval_data: str | None
    eval_split: str
    eval_every: int | None
    eval_metric: str
    patience: int | None
    # which options the user set (not left at their defaults), and the command line that asks for this again
    given: frozenset[str] = frozenset()
    command_line: str | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, given: set[str] | frozenset[str] = frozenset(),
                     command_line: str | None = None) -> TrainRequest:
        """The request of the train command's parsed options (other options, such as --json, are the command's)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"given", "command_line"}
        values = {name: tuple(options[name]) if isinstance(options[name], list) else options[name] for name in names}
        values["runs_root"] = Path(values["runs_root"])
        if values["output_dir"] is not None:
            values["output_dir"] = Path(values["output_dir"])
        request = cls(**values, given=frozenset(given) & names, command_line=command_line)
        request.check()
        return request

    def check(self) -> None:
        """What the options' own types cannot say."""
        if self.from_run:
            others = sorted(self.given - FROM_RUN_OPTIONS)
            if others:
                spelled = ", ".join("--" + name.replace("_", "-") for name in others)
                raise SpladectlError(f"--from-run re-launches a run exactly; it does not combine with {spelled}",
                                     hint="copy the run's config.toml settings into a new `spladectl train` command "
                                          "(`spladectl runs show RUN` prints the command line) and change them there")

    def options(self) -> dict[str, Any]:
        """The options by name, as the train command's parameters (lists for repeatable options)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self) if f.name not in ("given", "command_line")}
