"""`spladectl env`: the environment report (spladectl.runs.environment) for a bug report."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from spladectl.hardware import HardwareFacts
from spladectl.runs.environment import collect


def register(app: typer.Typer) -> None:
    if not any(command.callback is env for command in app.registered_commands):
        app.command("env")(env)


def env(json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False) -> None:
    """Print versions, hardware, the detected profile and relevant environment variables for a bug report."""
    from spladectl.hardware import detect

    facts = detect()
    report = collect(facts)
    if json_:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(format_report(report, facts))


def format_report(report: dict[str, Any], facts: HardwareFacts) -> str:
    """Markdown bullets, as `accelerate env` prints them, so the report renders well in an issue."""
    from spladectl.cli.profile import hardware_rows

    lines = [
        "Copy and paste the text below into your bug report.",
        "",
        f"- spladectl version: {report['spladectl']}",
        f"- Platform: {report['platform']}",
        f"- Python version: {report['python']}",
        f"- torch version: {report['torch']} (CUDA build: {report['torch_cuda'] or 'none'})",
        f"- transformers version: {report['transformers'] or 'not installed'}",
        f"- torch.distributed backends: {', '.join(report['distributed_backends']) or 'none'}",
    ]
    lines += [f"- {label}: {value}" for label, value in hardware_rows(facts)]
    profile = report["profile"]
    if profile:
        r = profile["resolved"]
        lines.append(f"- Detected profile: {profile['name']} (score {profile['score']}/100)")
        lines.append(
            f"- Resolved: device {r['device']}, precision {r['precision']}, batch {r['batch_size']} x "
            f"{r['grad_accum']} accumulation, tf32 {str(r['tf32']).lower()}, workers {r['dataloader_workers']}"
        )
        lines += [f"  - {reason}" for reason in r["reasons"]]
        lines.append(f"- Profiles: {', '.join(report['profiles'])}")
    else:
        lines.append(f"- Profiles: error: {report['profile_error']}")
    plugins = report["plugins"]
    if isinstance(plugins, dict):
        lines.append(f"- Plugins: error: {plugins['error']}")
    else:
        lines.append(f"- Plugins: {', '.join(plugins) or 'none'}")
    environment = report["environment"]
    lines.append("- Environment variables:" + ("" if environment else " none set"))
    lines += [f"  - {name}={value}" for name, value in environment.items()]
    return "\n".join(lines)
