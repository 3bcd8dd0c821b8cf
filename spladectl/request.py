"""A training as asked for, and the one place that turns it into the engine's TrainConfig.

`spladectl train` builds a TrainRequest from its options, `spladectl sweep` from each point's settings (parsed by the
train command itself, so both get the same checks), `spladectl bench` from its own settings; `runs.training` takes it
and runs the plan, the profile resolution, the engine and the evaluation. A field left at None means "from the
profile or the defaults"; `make_config` is where that choice is made, for every command.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spladectl.config import TrainConfig
from spladectl.errors import SpladectlError

# With --from-run, only what does not change the training itself may be given.
FROM_RUN_OPTIONS = {"from_run", "runs_root", "output_dir", "name", "tag", "track", "mlflow_uri", "progress"}


@dataclass(frozen=True)
class TrainRequest:
    # the run: where it goes, what it is called, where it comes from
    runs_root: Path | None = None
    output_dir: Path | None = None
    name: str | None = None
    tag: tuple[str, ...] = ()
    from_run: str | None = None
    resume: str | None = None
    track: tuple[str, ...] = ()
    mlflow_uri: str | None = None
    plugin: tuple[str, ...] = ()
    progress: bool = True
    # what is trained on what
    profile: str | None = None
    model: str = TrainConfig.model
    data: str | None = None
    split: str = TrainConfig.data_split
    seed: int = TrainConfig.seed
    # how long, how much at once, in which precision (None: from the profile or the defaults)
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    grad_cache_chunk: int | None = None
    precision: str | None = None
    device: str | None = None
    force_device: str | None = None
    max_query_length: int | None = None
    max_doc_length: int | None = None
    memory_efficient: bool = False
    memory_tracking: bool = False
    compile: bool = False
    # the loss and the optimizer
    lr: float | None = None
    scheduler: str | None = None
    warmup_ratio: float | None = None
    n_negatives: int | None = None
    in_batch_negatives: bool = TrainConfig.in_batch_negatives
    cross_device_negatives: bool = TrainConfig.cross_device_negatives
    lambda_q: float | None = None
    lambda_d: float | None = None
    flops_warmup_steps: int | None = None
    flops_schedule: str | None = None
    regularizer: str | None = None
    distillation: str | None = None
    distillation_weight: float | None = None
    on_collapse: str | None = None
    on_nan: str | None = None
    # checkpoints and evaluation
    save_every: int | None = None
    keep_last: int = TrainConfig.keep_last
    eval_data: str | None = None
    eval_split: str = TrainConfig.eval_split
    eval_every: int | None = None
    eval_metric: str = TrainConfig.eval_metric
    patience: int | None = None
    # which options the user set (not left at their defaults), and the command line that asks for this again
    given: frozenset[str] = frozenset()
    command_line: str | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, given: set[str] | frozenset[str] = frozenset(),
                     command_line: str | None = None) -> TrainRequest:
        """The request of the train command's parsed options (other options, such as --json, are the command's)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"given", "command_line"}
        values = {name: tuple(options[name]) if isinstance(options[name], list) else options[name] for name in names}
        if values["runs_root"] is not None:
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


# Request fields that, when given, replace TrainConfig's default of the same name.
_OPTIONAL_SETTINGS = ("epochs", "max_steps", "lr", "scheduler", "warmup_ratio", "n_negatives", "lambda_q", "lambda_d",
                      "flops_warmup_steps", "flops_schedule", "regularizer", "distillation", "distillation_weight",
                      "on_collapse", "on_nan", "save_every", "grad_cache_chunk")


def make_config(request: TrainRequest, settings: Mapping[str, Any], *, profile: str,
                defaults: Mapping[str, Any] | None = None, tracks: list[str] | None = None) -> TrainConfig:
    """The engine's configuration: `settings` are the hardware values a profile resolved to (device, precision, batch
    size, ...), `defaults` replace TrainConfig's own where the request leaves a field at None (the demo's, say).

    This is the only place a TrainConfig is built, so train, sweep and bench agree on what an option means.
    """
    chosen = {**(defaults or {}), **{k: getattr(request, k) for k in _OPTIONAL_SETTINGS if getattr(request, k) is not None}}
    config = TrainConfig(
        model=request.model, data=request.data, data_split=request.split, profile=profile, **settings, **chosen,
        seed=request.seed, keep_last=request.keep_last, plugins=list(request.plugin), track=list(tracks or ()),
        memory_tracking=request.memory_tracking, eval_data=request.eval_data, eval_split=request.eval_split,
        eval_every=request.eval_every, eval_metric=request.eval_metric, early_stopping_patience=request.patience,
        in_batch_negatives=request.in_batch_negatives, cross_device_negatives=request.cross_device_negatives,
    )
    if request.output_dir is not None:
        config.output_dir = str(request.output_dir)
    if request.memory_efficient:
        # Its gradient-caching chunk is chosen by the engine, once the data's negatives per example are known.
        config.memory_efficient = config.gradient_checkpointing = True
    config.compile = request.compile
    return config
