"""`spladectl train` options as data: which were given, as a command line again, and from TOML keys.

Sweeps describe points with the train command's own option names and turn them into its command line, so every
train option (and any option added later) works in an experiment file, with the CLI's own checks and messages.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

# Option values that change how the command talks, not what the run is.
NOT_RECORDED = ("progress", "as_json", "runs_root")


def explicit(ctx) -> set[str]:
    """The parameters the user set (command line or environment), not left at their defaults."""
    given = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            given.add(name)
    return given


def recorded(params: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """The given options worth keeping in run.json, as JSON values, in the command's order."""
    return {name: _plain(params[name]) for name in params if name in given and name not in NOT_RECORDED}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def option_names(command) -> dict[str, str]:
    """Every spelling of each option (`max_steps`, `max-steps`, `--max-steps`, `json` for --json) -> its name."""
    names: dict[str, str] = {}
    for param in command.params:
        if param.name is None:
            continue
        names[param.name] = param.name
        for opt in param.opts:  # not `--no-x`: `"--no-x" = true` would read as x = true (the value is x's)
            if opt.startswith("--"):
                for spelling in (opt, opt[2:], opt[2:].replace("-", "_")):
                    names.setdefault(spelling, param.name)
    return names


def argv_for(command, settings: dict[str, Any]) -> list[str]:
    """The command line that sets `settings` (option name -> value): flags for booleans, one option per item of a
    list for repeatable options."""
    params = {p.name: p for p in command.params}
    argv: list[str] = []
    for name, value in settings.items():
        param = params[name]
        long = _long(param.opts)
        if getattr(param, "is_flag", False) and isinstance(value, bool):
            secondary = getattr(param, "secondary_opts", [])
            if value:
                argv.append(long)
            elif secondary:
                argv.append(_long(secondary))
            continue
        values = value if getattr(param, "multiple", False) and isinstance(value, (list, tuple)) else [value]
        for item in values:
            argv += [long, text(item)]
    return argv


def _long(opts: list[str]) -> str:
    return max(opts, key=len)


def text(value: Any) -> str:
    """A TOML value as the command line would spell it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ",".join(text(v) for v in value)
    return str(value)


def command_line(command, settings: dict[str, Any]) -> str:
    """`spladectl train ...` as a shell line, for run.json and `runs show`."""
    return shlex.join(["spladectl", "train", *argv_for(command, settings)])
