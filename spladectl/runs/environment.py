"""The environment report: versions, hardware, the detected profile, plugins and the variables that matter.

`spladectl env` prints it for a bug report and every run keeps a copy (env.json). It must work on a broken setup too
(that is when people need it), so every part that can fail is reported as an error entry instead of raising.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Mapping
from typing import Any

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
    from spladectl.plugin_loading import describe_plugins

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
