"""The settings of one training run, after profile resolution and command-line flags.

`TrainConfig` is flat on purpose: it is written to OUTPUT/config.toml, read back on resume, and handed to plugins.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spladectl.errors import SpladectlError

# Settings that no longer exist and never changed what a run did: older config.toml files still load.
RETIRED = {"log_every"}


@dataclass
class TrainConfig:
    # what to train on and where results go
    model: str = "splade-tiny"
    data: str | None = None  # None: the demo set shipped in the package
    data_split: str = "train"  # the qrels split trained on when `data` is a BEIR directory
    output_dir: str = "output"
    # hardware, from the resolved profile
    profile: str = "cpu"
    device: str = "cpu"
    precision: str = "32-true"
    batch_size: int = 8  # per device (per process)
    grad_accum: int = 1
    grad_cache_chunk: int | None = None  # encode each micro-batch in chunks of this many texts (gradient caching)
    world_size: int = 1  # training processes, set by torchrun (WORLD_SIZE)
    tf32: bool = False
    gradient_checkpointing: bool = False
    memory_efficient: bool = False  # checkpointing, and gradient caching past one chunk (engine.MEMORY_EFFICIENT_CHUNK)
    memory_efficient_head: bool = True
    compile: bool = False  # torch.compile the encoder (slower on CPUs measured so far; see docs/training.md)
    dataloader_workers: int = 0
    max_query_length: int = 64
    max_doc_length: int = 256
    # optimisation
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; None: epochs × steps per epoch
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    scheduler: str = "linear"  # linear | cosine | constant
    max_grad_norm: float = 1.0
    n_negatives: int = 1  # hard negatives per example used in each step
    in_batch_negatives: bool = True  # score each query against every document of the micro-batch
    cross_device_negatives: bool = True  # distributed: the in-batch negatives include every process's documents
    # SPLADE regularisation
    lambda_q: float = 5e-4
    lambda_d: float = 3e-4
    flops_warmup_steps: int | None = None  # None: a third of the run
    flops_schedule: str = "quadratic"  # quadratic | linear | constant
    regularizer: str = "flops"  # flops | l1: the sparsity term weighted by lambda_q / lambda_d
    distillation: str = "margin-mse"  # margin-mse | kl: used when the data carries teacher scores
    distillation_weight: float = 1.0
    # run control
    seed: int = 42
    save_every: int | None = None  # optimizer steps; None: only at the end
    keep_last: int = 2
    memory_tracking: bool = False
    on_collapse: str = "stop"  # stop | backoff | warn: what a collapsed run does (spladectl/collapse.py)
    on_nan: str = "stop"  # stop | skip | rollback: what a step with a non-finite loss or gradient does (engine.py)
    collapse_patience: int = 10  # consecutive collapsed optimizer steps before the policy acts
    track: list[str] = field(default_factory=list)  # experiment trackers mirroring the run: tensorboard, mlflow
    plugins: list[str] = field(default_factory=list)
    # evaluation during training
    eval_data: str | None = None
    eval_split: str = "test"
    eval_every: int | None = None
    eval_metric: str = "nDCG@10"
    early_stopping_patience: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k not in RETIRED}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SpladectlError(f"{where}: unknown setting(s) {', '.join(unknown)}")
        return cls(**values)

    @property
    def effective_batch_size(self) -> int:
        """Examples per optimizer step: per device × accumulation × processes."""
        return self.batch_size * self.grad_accum * self.world_size

    def to_toml(self) -> str:
        """TOML for OUTPUT/config.toml; None values are left out (TOML has no null) and mean 'the default'."""
        lines = []
        for key, value in self.to_dict().items():
            if value is None:
                continue
            lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, path: str | Path) -> "TrainConfig":
        from spladectl._compat import tomllib

        try:
            values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SpladectlError(f"{path}: cannot read the run configuration ({exc})") from exc
        return cls.from_dict(values, where=str(path))


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string
