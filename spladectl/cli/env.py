"""`spladectl env`: a report of versions, hardware and settings to paste into a bug report.

It must work on a broken setup too (that is when people need it), so every part that can fail is reported as an
error line instead of ending the command.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from collections.abc import Mapping
from typing import Annotated, Any

import typer

from spladectl import __version__
from spladectl.errors import SpladectlError
from spladectl.hardware import HardwareFacts

# Variables that change what spladectl or torch does; all SPLADECTL_* ones are included as well.
RELEVANT_ENV = (
    "CUDA_VISIBLE_DEVICES",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "PYTORCH_CUDA_ALLOC_CONF",
    "PYTORCH_ENABLE_MPS_FALLBACK",
    "PYTORCH_MPS_HIGH_WATERMARK_RATIO",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "XDG_CONFIG_HOME",
)
# A report is pasted in public: never print what looks like a credential, even if a plugin's variable holds one.
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")


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


def collect(facts: HardwareFacts, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    report: dict[str, Any] = {
        "spladectl": __version__,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": facts.torch,
        "torch_cuda": facts.cuda_version,
        "transformers": _version("transformers"),
        "distributed_backends": _distributed_backends(),
        "hardware": facts.to_dict(),
    }
    report.update(_profiles(facts))
    report["plugins"] = _plugins()
    report["environment"] = {name: _mask(name, environ[name]) for name in _relevant(environ)}
    return report


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _profiles(facts: HardwareFacts) -> dict[str, Any]:
    from spladectl.profiles import default_registry
    from spladectl.resolve import pick_profile, resolve

    try:
        registry = default_registry()
        name, score, reasons = pick_profile(facts, registry)
        resolved = resolve(registry.get(name), facts)
    except SpladectlError as exc:  # a broken profile or plugin is exactly what a bug report should show
        return {"profile": None, "profile_error": exc.format_message(), "profiles": []}
    return {
        "profile": {"name": name, "score": score, "detection": reasons, "resolved": resolved.as_dict()},
        "profiles": [f"{n} ({registry.origin(n)})" for n in registry.names()],
    }


def _plugins() -> list[str] | dict[str, str]:
    from spladectl.plugins import describe_plugins

    try:
        return [f"{row['name']} {row['version']}".strip() for row in describe_plugins()]
    except SpladectlError as exc:
        return {"error": exc.format_message()}
    except Exception as exc:  # a plugin bug still leaves the rest of the report useful
        return {"error": f"{type(exc).__name__}: {exc}"}


def _relevant(environ: Mapping[str, str]) -> list[str]:
    # NCCL_* and GLOO_* steer the interconnect of distributed runs (NCCL_SOCKET_IFNAME, NCCL_IB_DISABLE, ...).
    return sorted(name for name in environ
                  if name.startswith(("SPLADECTL_", "NCCL_", "GLOO_")) or name in RELEVANT_ENV)


def _distributed_backends() -> list[str]:
    try:
        import torch.distributed as dist

        if not dist.is_available():
            return []
        return [name for name, there in (("nccl", dist.is_nccl_available()), ("gloo", dist.is_gloo_available()),
                                          ("mpi", dist.is_mpi_available())) if there]
    except Exception:  # a broken torch install: the rest of the report still helps
        return []


def _mask(name: str, value: str) -> str:
    return "***" if any(word in name.upper() for word in _SECRET_WORDS) else value


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
