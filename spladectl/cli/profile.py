"""`spladectl profile list|show|detect`: the hardware profiles, and what they become on this machine."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Annotated, Any

import typer

from spladectl.cli import output
from spladectl.hardware import HardwareFacts, detect
from spladectl.profiles import Profile, default_registry
from spladectl.resolve import Resolved, pick_profile, resolve

profile_app = typer.Typer(
    name="profile",
    help="Hardware profiles: list them, show one, or detect which fits this machine.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    if not any(group.typer_instance is profile_app for group in app.registered_groups):
        app.add_typer(profile_app, name="profile")


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
# The same overrides `spladectl train` takes, so users can see what a flag would do before training with it.
DeviceOption = Annotated[
    str | None, typer.Option("--device", help="Preferred device (cuda, mps, cpu); falls back if missing.")
]
ForceDeviceOption = Annotated[
    str | None, typer.Option("--force-device", help="Use exactly this device; an error if it is missing.")
]
PrecisionOption = Annotated[
    str | None, typer.Option("--precision", help="32-true, 16-mixed or bf16-mixed (or fp32/no, fp16, bf16).")
]
BatchSizeOption = Annotated[int | None, typer.Option("--batch-size", min=1, help="Batch size per device and step.")]
GradAccumOption = Annotated[
    int | None, typer.Option("--grad-accum", min=1, help="Micro-batches accumulated per optimizer step.")
]
WorldSizeOption = Annotated[
    int | None, typer.Option("--world-size", min=1, help="Training processes (GPUs) in all, as torchrun would start; "
                                                         "default: WORLD_SIZE or 1.")
]

_OVERRIDES = {"device": DeviceOption, "force_device": ForceDeviceOption, "precision": PrecisionOption,
              "batch_size": BatchSizeOption, "grad_accum": GradAccumOption, "world_size": WorldSizeOption}


def with_overrides(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` the hardware overrides as options; it receives the ones given as one `flags` dict."""
    signature = inspect.signature(command, eval_str=True)
    kept = [p for p in signature.parameters.values() if p.name != "flags"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=option)
             for name, option in _OVERRIDES.items()]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        given = {name: kwargs.pop(name, None) for name in _OVERRIDES}
        return command(*args, flags={k: v for k, v in given.items() if v is not None}, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=kept + added)
    return wrapper


@profile_app.command("list")
def list_profiles(json_: JsonOption = False) -> None:
    """List the known profiles: shipped, from plugins, and from your config directory."""
    profiles = default_registry().all()
    rows = [_summary(p) for p in profiles]
    if json_:
        output.print_json(rows)
        return
    table = output.table("name", "origin", "device", "precision", "batch", "accum", "description")
    table.caption = "batch: with mixed precision / with 32-true"
    for p in profiles:
        batch = f"{p.batch_size}/{p.batch_size_for_32_true}"
        output.row(table, p.name, p.origin, p.device, p.precision, batch, p.grad_accum, p.description)
    output.console().print(table)


@profile_app.command("show")
@with_overrides
def show(
    name: Annotated[str, typer.Argument(help="A profile name, or a path to a .toml file.")],
    resolve_: Annotated[
        bool, typer.Option("--resolve", help="Show the values this machine would use, with their sources.")
    ] = False,
    json_: JsonOption = False,
    *,
    flags: dict[str, Any],
) -> None:
    """Show a profile as written, or with --resolve as it applies here (any override flag implies --resolve)."""
    profile = default_registry().get(name)
    if not (resolve_ or flags):
        if json_:
            output.print_json(profile.to_dict())
        else:
            _print_profile(profile)
        return
    resolved = resolve(profile, detect(), env=os.environ, flags=flags)
    if json_:
        output.print_json(resolved.as_dict())
    else:
        _print_resolved(resolved)


@profile_app.command("detect")
@with_overrides
def detect_command(json_: JsonOption = False, *, flags: dict[str, Any]) -> None:
    """Detect this machine's hardware, pick the profile that fits best, and show how it would train."""
    facts = detect()
    registry = default_registry()
    name, score, why = pick_profile(facts, registry)
    resolved = resolve(registry.get(name), facts, env=os.environ, flags=flags)
    if json_:
        output.print_json(
            {
                "hardware": facts.to_dict(),
                "profile": name,
                "score": score,
                "resolved": resolved.as_dict(),
                "detection": why,
                "reasons": why + resolved.reasons,
            }
        )
        return
    console = output.console()
    console.print(hardware_table(facts))
    console.print(f"\nProfile: {name} (score {score}/100, origin {registry.origin(name)})", markup=False)
    for line in why:
        console.print(f"  - {line}", markup=False)
    console.print()
    _print_resolved(resolved, console=console)


# ---- output -------------------------------------------------------------------------------------------------------

def _summary(p: Profile) -> dict[str, Any]:
    return {
        "name": p.name,
        "origin": p.origin,
        "description": p.description,
        "device": p.device,
        "precision": p.precision,
        "batch_size": p.batch_size,
        "batch_size_32": p.batch_size_for_32_true,
        "grad_accum": p.grad_accum,
        "extends": p.extends,
        "path": p.path,
    }


def _print_profile(p: Profile) -> None:
    table = output.table("key", "value", title=f"Profile {p.name} ({p.origin}{', ' + p.path if p.path else ''})")
    for key, value in p.to_dict().items():
        if key in ("name", "origin", "path", "match") or value is None:
            continue
        output.row(table, key, value)
    for key, value in (p.match.to_dict() if p.match else {}).items():
        output.row(table, f"match.{key}", value)
    output.console().print(table)


def _print_resolved(r: Resolved, console=None) -> None:
    console = console or output.console()
    table = output.table("setting", "value", "source", title=f"Resolved settings of {r.name} on this machine")
    for key, value in r.values.items():
        output.row(table, key, value, r.sources[key])
    console.print(table)
    console.print(
        f"effective batch: {r.batch_size} per device x {r.grad_accum} accumulation x {r.world_size} process(es)"
        f" = {r.effective_batch_size}",
        markup=False,
    )
    if r.reasons:
        console.print("\nChanged for this machine:")
        for reason in r.reasons:
            console.print(f"  - {reason}", markup=False)


def hardware_table(facts: HardwareFacts):
    """The hardware facts as a two-column table (also used by `spladectl env`)."""
    table = output.table("hardware", "", title="This machine")
    for label, value in hardware_rows(facts):
        output.row(table, label, value)
    return table


def hardware_rows(facts: HardwareFacts) -> list[tuple[str, str]]:
    cores = f"{facts.cpu_cores_physical or '?'} physical / {facts.cpu_cores_logical} logical cores"
    bf16 = "yes" if facts.has_bf16 else "no"
    if facts.bf16_matmul_speedup is not None:
        verdict = "used by bf16-mixed" if facts.bf16_pays_off else "too slow: bf16-mixed runs in 32-true"
        bf16 += f" (bf16 matmul {facts.bf16_matmul_speedup:g}× float32, {verdict})"
    rows = [
        ("CPU", f"{facts.cpu_model}, {cores}"),
        ("RAM", f"{facts.ram_gib:g} GiB"),
        ("CPU features", " ".join(facts.cpu_flags) or "none of note"),
        ("native bf16 / AMX", f"{bf16} / {'yes' if facts.has_amx else 'no'}"),
        ("CUDA", "yes" if facts.cuda_available else f"no (torch {facts.torch})"),
    ]
    for index, gpu in enumerate(facts.gpus):
        driver = f", driver {gpu.driver}" if gpu.driver else ""
        described = f"{gpu.name}, {gpu.memory_gib:g} GiB, compute capability {gpu.capability_text}{driver}"
        rows.append((f"GPU {index}", described))
    if not facts.gpus:
        rows.append(("GPU", "none"))
    rows.append(("Apple MPS", "yes" if facts.mps_available else "no"))
    rows.append(("OS", f"{facts.os} {facts.os_release} ({facts.arch}), Python {facts.python}"))
    for note in facts.notes:
        rows.append(("note", note))
    return rows
