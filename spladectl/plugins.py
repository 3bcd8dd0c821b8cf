"""The plugin manager: built-ins, installed packages (entry-point group `spladectl`) and `--plugin module:object`.

`SPLADECTL_PLUGINS` controls which installed packages load: unset loads all, an empty value loads none, otherwise a
comma-separated list of entry-point or distribution names. Built-in plugins always load; flags switch their behaviour.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from typing import Any

import pluggy

from spladectl import hookspecs
from spladectl.errors import PluginError

ENTRY_POINT_GROUP = "spladectl"
ENV_VAR = "SPLADECTL_PLUGINS"

DEFAULT_PLUGINS = (
    "spladectl.default_plugins.core",
    "spladectl.default_plugins.memory",
    "spladectl.default_plugins.optim",
    "spladectl.default_plugins.flops",
    "spladectl.default_plugins.distillation",
)

pm = pluggy.PluginManager("spladectl")
pm.add_hookspecs(hookspecs)

_loaded = False
_DISTRIBUTIONS: dict[str, tuple[str, str]] = {}


def _selected(names: set[str]) -> bool:
    wanted = os.environ.get(ENV_VAR)
    if wanted is None:
        return True
    allowed = {item.strip() for item in wanted.split(",") if item.strip()}
    return bool(allowed & names)


def load_plugins() -> pluggy.PluginManager:
    """Register built-ins and the installed plugins selected by SPLADECTL_PLUGINS; safe to call more than once."""
    global _loaded
    if _loaded:
        return pm
    _loaded = True
    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)
        pm.register(module, name=module_name)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else ""
        if not _selected({ep.name, dist}) or pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party package must not take the CLI down silently
            raise PluginError(
                f"plugin {ep.name!r} (from {dist or 'unknown distribution'}) failed to load: {exc}",
                hint=f"switch it off with {ENV_VAR}= or uninstall it",
            ) from exc
        pm.register(plugin, name=ep.name)
        if dist:
            _DISTRIBUTIONS[ep.name] = (dist, ep.dist.version)
    return pm


def add_plugin(spec: str) -> str:
    """Register `module:object` (or a bare module) for this process; returns the name it was registered under."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        plugin = getattr(module, attr) if attr else module
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"--plugin {spec}: cannot import it ({exc})") from exc
    if isinstance(plugin, type):
        plugin = plugin()
    name = spec
    if pm.get_plugin(name) is None:
        pm.register(plugin, name=name)
    return name


def distribution_of(name: str) -> tuple[str, str] | None:
    """(distribution, version) for an installed plugin registered through an entry point."""
    return _DISTRIBUTIONS.get(name)


def is_builtin(name: str) -> bool:
    return name in DEFAULT_PLUGINS


def describe_plugins(include_builtin: bool = False) -> list[dict[str, Any]]:
    """One dict per registered plugin: name, builtin, hooks it implements, and its distribution and version."""
    load_plugins()
    rows = []
    for name, plugin in pm.list_name_plugin():
        if name is None or (is_builtin(name) and not include_builtin):
            continue
        hooks = sorted(impl.name for impl in pm.get_hookcallers(plugin) or [])
        dist, version = distribution_of(name) or ("", "")
        if is_builtin(name):
            dist, version = "spladectl", _own_version()
        rows.append({"name": name, "builtin": is_builtin(name), "hooks": hooks, "distribution": dist, "version": version})
    return rows


def _own_version() -> str:
    from spladectl import __version__

    return __version__


def hook_error(exc: BaseException) -> PluginError | None:
    """If `exc` was raised inside a plugin's hook, a PluginError naming that plugin; else None."""
    tb = exc.__traceback__
    culprit = None
    while tb is not None:
        module = sys.modules.get(tb.tb_frame.f_globals.get("__name__", ""))
        for name, plugin in pm.list_name_plugin():
            if plugin is module or getattr(plugin, "__module__", None) == tb.tb_frame.f_globals.get("__name__"):
                culprit = name
        tb = tb.tb_next
    if culprit is None:
        return None
    return PluginError(f"plugin {culprit!r} raised {type(exc).__name__}: {exc}")
