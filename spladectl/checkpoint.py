"""Checkpoints that survive crashes and resume exactly.

A checkpoint is `OUTPUT/checkpoints/step-N/`: the model (save_pretrained), and `training_state.pt` holding the
optimizer, scheduler, scaler, RNG states, data position and the resolved config. It is written to a temporary
directory and renamed into place, so a crash while writing never damages an existing checkpoint.

A Snapshot is the same state in CPU memory, for going back a few steps within a run (a collapse backoff).
"""

from __future__ import annotations

import copy
import errno
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spladectl.errors import CheckpointError

STATE_FILE = "training_state.pt"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    # numpy's state holds an ndarray, which weights_only loading refuses; store its key as a tensor instead.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dirs(checkpoints: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `checkpoints`, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = []
    for child in checkpoints.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def save_checkpoint(checkpoints: Path, step: int, *, encoder, state: dict[str, Any], keep_last: int | None) -> Path:
    """Write step-`step` atomically, then prune to the newest `keep_last` checkpoints."""
    final = checkpoints / f"step-{step}"
    tmp = checkpoints / f".tmp-step-{step}-{os.getpid()}"
    try:
        checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        encoder.save_pretrained(tmp)
        payload = {"format_version": FORMAT_VERSION, "step": step, **state}
        with open(tmp / STATE_FILE, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # never a half-written checkpoint beside the complete ones
        # Weights plus AdamW's two moments: what a first checkpoint takes when there is no earlier one to measure.
        estimate = 3 * sum(p.numel() * p.element_size() for p in encoder.parameters())
        failure = _write_failed(checkpoints, step, exc, estimate)
        if failure is None:
            raise
        raise failure from exc
    if final.exists():  # re-saving a step after a resume: move the old one aside first, then drop it
        old = checkpoints / f".old-step-{step}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if keep_last:
        for _, stale in step_dirs(checkpoints)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _write_failed(checkpoints: Path, step: int, exc: BaseException, estimate: int) -> CheckpointError | None:
    """What a user needs when a checkpoint cannot be written (why, what survived, how much space it takes), or None
    for an exception that is not about the disk (a bug keeps its traceback).

    torch.save and safetensors report a full disk in their own words ("unexpected pos ...", "StorageFull"), so a
    write that failed while less space is free than a checkpoint takes is called what it is.
    """
    previous = step_dirs(checkpoints)
    needed = sum(f.stat().st_size for f in previous[-1][1].rglob("*") if f.is_file()) if previous else estimate
    try:
        free = shutil.disk_usage(checkpoints if checkpoints.exists() else checkpoints.parent).free
    except OSError:
        free = None
    full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or (free is not None and free < needed)
    if full:
        reason = os.strerror(errno.ENOSPC)
    elif isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    else:
        return None
    kept = f"the previous checkpoint ({previous[-1][1].name}) is intact" if previous else "no earlier checkpoint exists"
    message = f"{checkpoints / f'step-{step}'}: the checkpoint could not be written ({reason}); {kept}"
    space = f" and {free / 2**20:.0f} MiB are free there" if free is not None else ""
    hint = (f"a checkpoint takes about {needed / 2**20:.0f} MiB{space}; free some space or choose another "
            "--output-dir, then resume with --resume latest")
    return CheckpointError(message, hint=hint)


def remove_partial(checkpoints: Path) -> None:
    """Remove what killed runs left while writing checkpoints (.tmp-step-*, .old-step-*): never complete, and only
    one process trains in a run directory (runs/lock.py), so none of them is being written now."""
    if checkpoints.is_dir():
        for child in checkpoints.iterdir():
            if child.name.startswith((".tmp-step-", ".old-step-")):
                shutil.rmtree(child, ignore_errors=True)


def drop_after(checkpoints: Path, step: int) -> None:
    """Remove the checkpoints of steps after `step`: a run that went back to `step` will write its own."""
    for later, path in step_dirs(checkpoints):
        if later > step:
            shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(spec: str, output_dir: Path) -> Path:
    """`latest` (the newest complete checkpoint under OUTPUT/checkpoints) or a path to a step directory."""
    if spec == "latest":
        found = step_dirs(output_dir / "checkpoints")
        if not found:
            raise CheckpointError(
                f"--resume latest: no checkpoint under {output_dir / 'checkpoints'}",
                hint="train with --save-every N to write checkpoints, or pass a checkpoint directory",
            )
        return found[-1][1]
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume {spec}: not a checkpoint directory (no {STATE_FILE} in it)")
    return path


def load_training_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: name it, never start fresh silently
        raise CheckpointError(f"{path / STATE_FILE}: cannot load the training state ({exc})") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / STATE_FILE}: not a spladectl training state (format {FORMAT_VERSION})")
    return state


# What a run's position is made of, besides the model and the optimizer: TrainState fields a snapshot restores.
_POSITION = ("step", "epoch", "position", "examples_seen", "skipped_steps", "split_factor")


@dataclass
class Snapshot:
    """A run's state (model, optimizer, scheduler, scaler, RNG, data position) copied to CPU memory.

    The best model and metric are not part of it: best/ on disk stays the best whatever the run goes back to.
    """

    position: dict[str, int]
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, Any]

    @property
    def step(self) -> int:
        return self.position["step"]

    @classmethod
    def take(cls, state) -> "Snapshot":
        """Copy `state` (an engine.TrainState); later steps do not change the copy."""
        return cls({key: getattr(state, key) for key in _POSITION}, cpu_copy(state.model.state_dict()),
                   cpu_copy(state.optimizer.state_dict()), cpu_copy(state.scheduler.state_dict()),
                   cpu_copy(state.scaler.state_dict()), cpu_copy(rng_state()))

    def restore(self, state) -> None:
        """Put `state` back where it was when the snapshot was taken (the snapshot stays usable for another time)."""
        state.model.load_state_dict(self.model)
        # load_state_dict keeps references into what it is given; a copy leaves the snapshot untouched by later steps.
        state.optimizer.load_state_dict(cpu_copy(self.optimizer))
        state.scheduler.load_state_dict(cpu_copy(self.scheduler))
        state.scaler.load_state_dict(cpu_copy(self.scaler))
        set_rng_state(cpu_copy(self.rng))
        for key, value in self.position.items():
            setattr(state, key, value)


def cpu_copy(value: Any) -> Any:
    """A deep copy with every tensor cloned to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(item) for item in value)
    return copy.deepcopy(value)
