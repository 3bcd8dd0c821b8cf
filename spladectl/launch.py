"""`spladectl train --nproc-per-node N`: hand the run over to torch.distributed.run, torchrun's own engine.

spladectl has no launcher of its own. These options become torchrun's, the `train` options the user gave are passed
on unchanged, and each process started runs `python -m spladectl train ...` as under `torchrun -m spladectl train`.
What spladectl adds is the report: when a process fails, one `Error:` line with the failing rank's own message (read
from the error file it wrote, see distributed.py) instead of torchrun's traceback of ChildFailedError.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Any, Mapping

from spladectl.distributed import LAUNCH_ARGS_ENV, LAUNCHED_ENV
from spladectl.errors import SpladectlError


@dataclass(frozen=True)
class LaunchOptions:
    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def check(self, env: Mapping[str, str]) -> None:
        """User errors before anything starts."""
        if env.get("TORCHELASTIC_RUN_ID") or (env.get("RANK") and env.get("WORLD_SIZE")):
            raise SpladectlError(
                "--nproc-per-node: this process was already started by torchrun",
                hint="give the number of processes to torchrun or to spladectl, not to both",
            )
        if self.nnodes > 1 and not self.master_addr:
            raise SpladectlError(
                f"--nnodes {self.nnodes}: several machines need --master-addr, the address of the machine with "
                "--node-rank 0 that the others can reach",
            )
        if self.node_rank >= self.nnodes:
            raise SpladectlError(f"--node-rank {self.node_rank}: must be below --nnodes {self.nnodes} "
                                 f"(machines are numbered from 0)")

    def torchrun_args(self, command: list[str]) -> list[str]:
        """torch.distributed.run's command line for `spladectl <command>` on every process."""
        args = ["--nnodes", str(self.nnodes), "--nproc-per-node", str(self.nproc_per_node),
                "--node-rank", str(self.node_rank)]
        return args + self._master_args() + ["-m", "spladectl", *command]

    def train_args(self) -> list[str]:
        """These options as `spladectl train` spells them, defaults left out (for the run's recorded command)."""
        args = ["--nproc-per-node", str(self.nproc_per_node)]
        if self.nnodes > 1:
            args += ["--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank)]
        return args + self._master_args()

    def _master_args(self) -> list[str]:
        # Spelled alike by torchrun and `spladectl train`. On one machine without a port, torchrun finds a free one.
        args = ["--master-addr", self.master_addr] if self.master_addr else []
        return args + (["--master-port", str(self.master_port)] if self.master_port is not None else [])


# The train options that start processes; every other option is passed on to each process.
LAUNCH_OPTIONS = frozenset(field.name for field in dataclasses.fields(LaunchOptions))


def launch(options: LaunchOptions, command: list[str]) -> None:
    """Run `spladectl <command>` on options.nproc_per_node processes of this machine; returns when all finished."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    options.check(os.environ)
    previous = {name: os.environ.get(name) for name in (LAUNCHED_ENV, LAUNCH_ARGS_ENV)}
    os.environ[LAUNCHED_ENV] = "1"  # inherited by the processes: they leave reporting their user errors to us
    os.environ[LAUNCH_ARGS_ENV] = shlex.join(options.train_args())
    try:
        torchrun.run(torchrun.parse_args(options.torchrun_args(command)))
    except ChildFailedError as exc:
        raise failure_error(exc.failures) from None
    except SignalException as exc:  # Ctrl-C or a scheduler's SIGTERM: torchrun has stopped the processes
        print(f"Aborted: {exc.sigval.name} stopped all {options.nproc_per_node} training processes on this machine",
              file=sys.stderr)
        raise SystemExit(128 + int(exc.sigval)) from None
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def failure_error(failures: Mapping[int, Any]) -> SpladectlError:
    """The error to report for a failed run: the rank that failed first on its own, with its message.

    Processes stopped because another rank failed, or killed by torchrun after it, are only the consequence; a rank
    on another machine can be the cause, and then the processes here name it ("stopped because rank 5 failed: ...").
    """
    def info(failure) -> tuple[str, str, str | None, int]:
        data = failure.message if isinstance(failure.message, dict) else {}
        extra = data.get("extraInfo", {}) if data else {}
        text = data.get("message", "") if data else str(failure.message or "")
        code = extra.get("spladectl_exit_code") or (failure.exitcode if 0 < failure.exitcode < 256 else 1)
        return extra.get("spladectl_kind", ""), text, extra.get("spladectl_hint") or None, int(code)

    def cause_order(item) -> tuple:
        rank, failure = item
        kind = info(failure)[0]
        level = {"user": 0, "bug": 0, "stopped": 2}.get(kind, 1 if failure.exitcode > 0 else 3)
        return level, failure.timestamp, rank

    rank, failure = min(failures.items(), key=cause_order)
    kind, text, hint, exit_code = info(failure)
    if kind == "user":
        error = SpladectlError(f"rank {rank}: {text}", hint=hint)
        error.exit_code = exit_code  # a user error's own: 2, or 1 for a plugin's
        return error
    if kind == "bug":
        error = SpladectlError(f"rank {rank} failed: {text}", hint="its traceback is printed above")
    elif kind == "stopped":
        error = SpladectlError(f"rank {rank} {text}")
    else:
        code = f"exit code {failure.exitcode}" if failure.exitcode > 0 else text
        error = SpladectlError(f"rank {rank} failed ({code})", hint="its output above says why")
    error.exit_code = 1
    return error


def command_line(ctx: Any, *, skip: set[str]) -> list[str]:
    """The options the user gave to this click/typer command, as arguments again (those named in `skip` left out).

    Only values that came from the command line are passed on, so every process resolves the rest (profile,
    hardware) itself, as a process started by torchrun directly would.
    """
    args = [ctx.info_name] if ctx.info_name else []
    for param in ctx.command.params:
        if param.name in skip or param.param_type_name != "option":
            continue
        source = ctx.get_parameter_source(param.name)
        if source is None or source.name not in ("COMMANDLINE", "ENVIRONMENT"):
            continue
        value = ctx.params[param.name]
        flag = param.opts[0]
        if param.is_flag and param.secondary_opts:
            args.append(flag if value else param.secondary_opts[0])
        elif param.is_flag:
            if value:
                args.append(flag)
        elif param.multiple:
            for item in value:
                args += [flag, str(item)]
        elif value is not None:
            args += [flag, str(value)]
    return args
