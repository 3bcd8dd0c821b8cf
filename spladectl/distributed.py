"""Several training processes through torch.distributed: the one module of spladectl that talks to it.

torchrun (or `spladectl train --nproc-per-node N`, which hands over to torch.distributed.run, see launch.py) starts one
process per device and tells each its place through the environment: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT. `World.from_env()` reads them; the engine asks this module for the process group, the
DistributedDataParallel wrapper, and the gathers that let every process see the global batch.

When one process fails, the others are blocked in a collective and only learn that a peer went away. So a failing
process first writes its message to the rendezvous store and to torchelastic's error file: the launcher reports that
message once, a process stopped by a peer's failure says which rank failed instead of a connection error, and rank 0
records that message in run.json (`peer_failure`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Mapping, NoReturn

import torch

from spladectl.errors import SpladectlError

# Rank 0 evaluates and writes checkpoints while the others wait in their next collective; a backend's own default
# (NCCL: 10 minutes) would turn a long evaluation into a timeout.
TIMEOUT = timedelta(minutes=60)
# Set by launch.py for the processes it starts: they leave printing a user error to the launcher, which prints the
# failing rank's message once instead of once per process.
LAUNCHED_ENV = "SPLADECTL_LAUNCHED"
# Also set by launch.py: its own options (--nproc-per-node 2 ...), so that run.json's command starts the run again.
LAUNCH_ARGS_ENV = "SPLADECTL_LAUNCH_ARGS"
STOPPED_BY_PEER = "stopped because rank"


@dataclass(frozen=True)
class World:
    """This process's place in a run: `rank` among `world_size` processes, `local_rank` among those on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "World":
        """The world torchrun describes in the environment; one process when WORLD_SIZE is unset or 1."""
        env = os.environ if env is None else env
        world_size = _env_int(env, "WORLD_SIZE", 1, lowest=1)
        if world_size == 1:
            return cls()
        missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing:
            raise SpladectlError(
                f"WORLD_SIZE={world_size} is set but {', '.join(missing)} is not",
                hint="start distributed runs with torchrun or `spladectl train --nproc-per-node N`, which set all of "
                     "them; or unset WORLD_SIZE",
            )
        rank = _env_int(env, "RANK", 0, lowest=0)
        local_rank = _env_int(env, "LOCAL_RANK", 0, lowest=0)
        local_world_size = _env_int(env, "LOCAL_WORLD_SIZE", local_rank + 1, lowest=1)
        if rank >= world_size:
            raise SpladectlError(f"RANK={rank} is not below WORLD_SIZE={world_size}")
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world_size)


def _env_int(env: Mapping[str, str], name: str, default: int, *, lowest: int) -> int:
    raw = str(env.get(name, "")).strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lowest - 1
    if value < lowest:
        raise SpladectlError(f"{name}: expected an integer >= {lowest}, got {raw!r}")
    return value


# ------------------------------------------------------------------------------------------------ devices, backends

def backend_for(device_type: str) -> str:
    """nccl between CUDA GPUs, gloo between CPU processes; nothing else has a torch.distributed backend."""
    if device_type == "cuda":
        return "nccl"
    if device_type == "cpu":
        return "gloo"
    raise SpladectlError(
        f"distributed training runs on CUDA GPUs (nccl) or CPUs (gloo); {device_type} has no torch.distributed backend",
        hint="train on one process, or pass --device cpu",
    )


def device_for(world: World, device_type: str, *, cuda_count: int | None = None) -> torch.device:
    """The device this process trains on: its own GPU (cuda:LOCAL_RANK) when distributed on CUDA."""
    if not world.distributed or device_type != "cuda":
        return torch.device(device_type)
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if world.local_rank >= count:
        raise SpladectlError(
            f"process {world.local_rank} on this machine (LOCAL_RANK) needs a GPU of its own, and torch sees "
            f"{count} CUDA device(s)",
            hint=f"start at most {count} process(es) per machine (--nproc-per-node {max(count, 1)}), or check "
                 "CUDA_VISIBLE_DEVICES",
        )
    return torch.device("cuda", world.local_rank)


def start(world: World, device_type: str) -> torch.device:
    """Join the process group (backend for `device_type`) and return this process's device; a no-op for one process."""
    device = device_for(world, device_type)
    if not world.distributed:
        return device
    import torch.distributed as dist

    backend = backend_for(device_type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _board.meet(world)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
    _board.connect()
    return device


def stop() -> None:
    """Leave the process group at the end of a run, every process at the same point."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "gloo":
            # gloo frees a finished collective in its own thread, shortly after wait() returns; when that collective
            # holds Python tensors and the interpreter is already exiting, the thread cannot take the GIL to release
            # them and the process aborts ("terminate called without an active exception"). A barrier, which holds
            # none and waits for the collectives before it, is made the last one.
            dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ collectives

def _group_size() -> int:
    """Processes in the started process group; 1 when there is none (the collectives below are then identities)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` concatenated along dim 0 in rank order; only this process's part keeps its gradient.

    The other parts are constants here: each process back-propagates through its own examples, and the optimizer
    step's all-reduce adds the processes' gradients up. Shapes must agree across processes (the batches are sharded
    into equal parts for this).
    """
    import torch.distributed as dist

    if _group_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts)


def gather_objects(obj: Any) -> list[Any]:
    """`obj` from every process, in rank order (picklable objects); `[obj]` for one process."""
    import torch.distributed as dist

    if _group_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every process (a decision only rank 0 can take, such as early stopping)."""
    import torch.distributed as dist

    if _group_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_model(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `module`: rank 0's weights on every process, gradients averaged in backward."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # The model's buffers are constants (position ids), so re-broadcasting them every forward would be wasted traffic.
    # torch 2.13 renamed the switch (the old name still works there, with a warning).
    accepted = inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in accepted \
        else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   **no_buffer_sync)


def synchronising(model: torch.nn.Module, sync: bool):
    """Context for one micro-batch: gradients are all-reduced only when `sync` (the step's last micro-batch)."""
    from torch.nn.parallel import DistributedDataParallel

    if sync or not isinstance(model, DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


# ------------------------------------------------------------------------------------------------ failures

class PeerFailure(Exception):
    """Another process failed while this one prepared; reporting_failures and rank 0's run name that process."""


class _FailureBoard:
    """The first failure of a run, kept in the rendezvous store so that the processes it stops can name it."""

    def __init__(self):
        self.store = None

    @property
    def key(self) -> str:
        # torchrun keeps its store across restarts; a failure of an earlier attempt must not haunt the next one.
        return f"spladectl/failure/{self.attempt}"

    @property
    def attempt(self) -> str:
        return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")

    def connect(self) -> None:
        import torch.distributed as dist

        if self.store is not None:
            return
        try:
            self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                       timeout=timedelta(seconds=10), wait_for_workers=False)
        except Exception:  # a launcher without a store we can reach: failures are still reported, just not named
            self.store = None

    def post(self, rank: int, message: str, *, interrupted: bool = False) -> None:
        if self.store is None:
            return
        try:
            if self.store.add(self.key + "/posted", 1) == 1:  # atomic: the first failure is the one reported
                self.store.set(self.key, json.dumps({"rank": rank, "message": message, "interrupted": interrupted}))
        except Exception:
            pass

    def meet(self, world: World, poll_seconds: float = 0.2) -> None:
        """Wait until every process is ready to join the process group, or raise PeerFailure when one posted a
        failure first (a file missing on its machine, a GPU too few). init_process_group would wait for it in C++,
        where neither that failure nor torchrun's SIGTERM reaches this process before SIGKILL, leaving run.json
        "running". A no-op without a store (a launcher other than torchrun): init_process_group waits then."""
        if self.store is None:
            return
        ready = f"spladectl/ready/{self.attempt}"
        try:
            self.store.add(ready, 1)
            deadline = time.monotonic() + TIMEOUT.total_seconds()
            while self.store.add(ready, 0) < world.world_size and time.monotonic() < deadline:
                posted = self.read()
                if posted is not None and posted.get("rank") != world.rank:
                    raise PeerFailure(f"rank {posted['rank']} failed before the processes met: {posted['message']}")
                time.sleep(poll_seconds)  # in Python: a SIGTERM can stop this process here
        except PeerFailure:
            raise
        except Exception:  # the store went away: init_process_group will say what is wrong
            return

    def read(self) -> dict[str, Any] | None:
        if self.store is None:
            return None
        try:
            if not self.store.check([self.key]):
                return None
            return json.loads(self.store.get(self.key))
        except Exception:
            return None


_board = _FailureBoard()


def peer_failure(world: World) -> dict[str, Any] | None:
    """The first failure another process of the run posted ({"rank", "message", "interrupted"}), if any: what
    stopped this process when its collective broke or torchrun sent it SIGTERM."""
    posted = _board.read()
    return posted if posted is not None and posted.get("rank") != world.rank else None


class Terminated(BaseException):
    """SIGTERM in the process that records the run: torchrun stopping every process because one of them failed, or
    a scheduler stopping the job. A BaseException like KeyboardInterrupt, so that no `except Exception` (a plugin's
    guard, the out-of-memory retry) swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class SigtermAsException:
    """`with SigtermAsException(enabled) as sigterm:` the first SIGTERM raises Terminated; `sigterm.hold()` ignores
    further ones while the caller records how the run ended; leaving the block restores the previous handler.

    Without it, torchrun's SIGTERM after another rank failed would end rank 0 on the spot, run.json still "running".
    torchrun follows with SIGKILL 30 s later, so holding off SIGTERM for the few milliseconds of recording is safe.
    """

    def __init__(self, enabled: bool = True):
        # Signal handlers can only be installed from the main thread (a test runner's worker thread cannot).
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.previous: Any = None

    def __enter__(self) -> "SigtermAsException":
        if self.enabled:
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    def _raise(self, signum: int, frame: Any) -> None:
        self.hold()  # once: a second SIGTERM must not interrupt the handling of the first
        raise Terminated(signum)

    def hold(self) -> None:
        if self.enabled:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def __exit__(self, *exc_info: Any) -> None:
        if self.enabled:
            signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)


def record_error_file(message: str, *, kind: str, hint: str | None = None, details: str | None = None,
                      exit_code: int = 1) -> None:
    """Write torchelastic's error file for this process, so the launcher's report carries `message`.

    `kind` tells launch.py how to report it: "user" (a SpladectlError), "bug" (with its traceback in `details`) or
    "stopped" (this process was stopped by another rank's failure). `exit_code` is the one this process exits with,
    kept here because torchrun may stop the process (SIGTERM) before it exits by itself.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    shown = message + (f"\nHint: {hint}" if hint else "")
    data = {"message": {"message": message, "extraInfo": {
        "py_callstack": details or shown, "timestamp": str(int(time.time())),
        "spladectl_kind": kind, "spladectl_hint": hint or "", "spladectl_exit_code": exit_code,
    }}}
    try:
        with open(path, "w") as fh:
            json.dump(data, fh)
    except OSError:
        pass


def _exit_stopped(world: World, peer: dict[str, Any] | None, launched: bool, *, message: str = "",
                  code: int = 1) -> NoReturn:
    """End a process that another rank's failure (`peer`, as posted) or a signal stopped: record why for the
    launcher, say it here unless the launcher will, and exit with `code`."""
    if peer is not None:
        message = f"{STOPPED_BY_PEER} {peer['rank']} failed: {peer['message']}"
    record_error_file(message, kind="stopped", exit_code=code)
    if not launched:
        print(f"rank {world.rank}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code) from None


@contextmanager
def reporting_failures(world: World) -> Iterator[None]:
    """Around a distributed process's work: make a failure on this rank known to the others and to the launcher.

    A user error (SpladectlError) is printed as `Error: rank R: ...` (by the launcher instead, when it started this
    process), a bug keeps its traceback, and a process whose collective broke because another rank failed exits with
    one line naming that rank rather than a connection error.
    """
    if not world.distributed:
        yield
        return
    launched = bool(os.environ.get(LAUNCHED_ENV))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent already serves the store: connect before the process group exists, so that a failure
        # while preparing (reading the data, resolving the profile) is posted too and rank 0 can record it. (Other
        # launchers leave the store to rank 0's init_process_group; start() connects then.)
        _board.connect()
    try:
        yield
    except KeyboardInterrupt:
        # A peer still inside a collective sees only a broken connection: tell it why.
        _board.post(world.rank, "interrupted", interrupted=True)
        if launched:  # Ctrl-C reached every process; the launcher says so once
            raise SystemExit(130) from None
        raise
    except SystemExit:
        raise
    except Terminated as exc:
        # Rank 0, stopped by torchrun (after a peer's failure, named if the peer posted it) or by a scheduler.
        peer = peer_failure(world)
        if peer is not None:
            _exit_stopped(world, peer, launched)
        _exit_stopped(world, None, launched, message=str(exc), code=128 + exc.signum)
    except Exception as exc:
        peer = peer_failure(world)
        if peer is not None:
            _exit_stopped(world, peer, launched)
        if isinstance(exc, SpladectlError):
            _board.post(world.rank, exc.message)
            record_error_file(exc.message, kind="user", hint=exc.hint, exit_code=exc.exit_code)
            if launched:
                raise SystemExit(exc.exit_code) from None
            ranked = type(exc)(f"rank {world.rank}: {exc.message}", hint=exc.hint)
            ranked.exit_code = exc.exit_code
            raise ranked from None
        message = f"{type(exc).__name__}: {exc}"
        _board.post(world.rank, message)
        record_error_file(message, kind="bug", details=traceback.format_exc())
        raise
