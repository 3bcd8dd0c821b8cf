"""Which plugins load: the built-ins always, installed packages (entry-point group `spladectl`) as
SPLADECTL_PLUGINS selects them, and `--plugin module:object` for one run; and a description of each for
`spladectl plugins list` and the environment report.

`SPLADECTL_PLUGINS` unset loads every installed package, an empty value loads none, otherwise it is a comma-separated
list of entry-point or distribution names (so a broken package can always be switched off).

`pm` is the process-wide manager the CLI uses, filled on the first `load_plugins()`. Tests and embedders can build
an independent one with `make_plugin_manager(env=...)`, or empty the global one with `reset()`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
from collections.abc import Mapping
from typing import Any

from spladectl.errors import PluginError
from spladectl.plugins import ENTRY_POINT_GROUP, PluginManager, display_name, is_builtin, register, register_builtins

ENV_VAR = "SPLADECTL_PLUGINS"

pm = PluginManager()
_loaded = False


def selection(env: Mapping[str, str] | None = None) -> set[str] | None:
    """The names SPLADECTL_PLUGINS selects (normalised), or None when it is unset (everything loads)."""
    env = os.environ if env is None else env
    wanted = env.get(ENV_VAR)
    if wanted is None:
        return None
    return {_normalise(item) for item in wanted.split(",") if item.strip()}


def _normalise(name: str) -> str:
    # PEP 503: distribution names compare case-insensitively with runs of -_. equal.
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def make_plugin_manager(env: Mapping[str, str] | None = None, *, installed: bool = True) -> PluginManager:
    """A new manager holding the built-ins and (unless `installed=False`) the installed plugins `env` selects."""
    manager = PluginManager()
    register_builtins(manager)
    if installed:
        load_entry_points(manager, env)
    return manager


def load_entry_points(manager: PluginManager, env: Mapping[str, str] | None = None) -> list[str]:
    """Register the installed plugins selected by SPLADECTL_PLUGINS; returns their names."""
    wanted = selection(env)
    matched: set[str] = set()
    loaded = []
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else ""
        version = ep.dist.version if ep.dist is not None else ""
        names = {_normalise(ep.name), _normalise(dist)} - {""}
        if wanted is not None:
            if not names & wanted:
                continue
            matched |= names & wanted
        where = f"plugin {ep.name!r} (entry point {ep.value!r} of {dist or 'an unknown distribution'})"
        if manager.has_plugin(ep.name):
            raise PluginError(f"{where}: another plugin is already registered as {ep.name!r}",
                              hint=f"select one of them with {ENV_VAR}=<distribution name>")
        try:
            plugin = ep.load()
            if isinstance(plugin, type):  # "module:Class" -> an instance, as for --plugin
                plugin = plugin()
        except Exception as exc:  # a broken package names itself and how to switch it off; never a traceback
            raise PluginError(f"{where} failed to load: {type(exc).__name__}: {exc}",
                              hint=switch_off_hint(ep.name)) from exc
        register(manager, plugin, ep.name, source="entry point", where=where)
        if dist:
            manager.distributions[ep.name] = (dist, version)
        loaded.append(ep.name)
    manager.unmatched_selection = sorted((wanted or set()) - matched)
    return loaded


def switch_off_hint(name: str) -> str:
    return f"switch it off with {ENV_VAR}= (none) or a list without {name!r}, or uninstall it"


def load_plugins(env: Mapping[str, str] | None = None) -> PluginManager:
    """Fill the global `pm` with the built-ins and the selected installed plugins, once; returns it."""
    global _loaded
    if not _loaded:
        _loaded = True
        try:
            register_builtins(pm)
            load_entry_points(pm, env)
        except BaseException:
            reset()  # leave no half-loaded manager behind: the next call reports the same error
            raise
    return pm


def reset() -> None:
    """Unregister everything from the global `pm` (it stays the same object); the next `load_plugins()` refills it."""
    global _loaded
    for _, plugin in list(pm.list_name_plugin()):
        if plugin is not None and pm.is_registered(plugin):
            pm.unregister(plugin)
    pm.sources.clear()
    pm.distributions.clear()
    pm.unmatched_selection = []
    _loaded = False


def add_plugin(spec: str, manager: PluginManager | None = None) -> str:
    """Register `module:object` (or a bare module) for this process; returns the name it is registered under.

    A class is instantiated with no arguments. Adding the same spec twice registers it once.
    """
    manager = manager if manager is not None else load_plugins()
    module_name, _, attr = spec.partition(":")
    if manager.has_plugin(spec):
        return spec
    try:
        module = importlib.import_module(module_name)
        plugin = module
        for part in filter(None, attr.split(".")):
            plugin = getattr(plugin, part)
        if isinstance(plugin, type):
            plugin = plugin()
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"--plugin {spec}: cannot import it ({type(exc).__name__}: {exc})",
                          hint="give module:object with the module on PYTHONPATH") from exc
    except Exception as exc:  # the module or the class's __init__ raised
        raise PluginError(f"--plugin {spec}: loading it raised {type(exc).__name__}: {exc}") from exc
    register(manager, plugin, spec, source="--plugin", where=f"--plugin {spec}")
    return spec


def distribution_of(name: str, manager: PluginManager | None = None) -> tuple[str, str] | None:
    """(distribution, version) for an installed plugin registered through an entry point."""
    return (manager if manager is not None else pm).distributions.get(name)


def describe_plugins(include_builtin: bool = False, manager: PluginManager | None = None) -> list[dict[str, Any]]:
    """One dict per registered plugin: name, builtin, source, distribution, version and the hooks it implements."""
    manager = manager if manager is not None else load_plugins()
    rows = []
    for name, plugin in manager.list_name_plugin():
        if plugin is None or (is_builtin(name) and not include_builtin):
            continue
        hooks = sorted(caller.name for caller in manager.get_hookcallers(plugin) or [])
        dist, version = distribution_of(name, manager) or ("", "")
        if is_builtin(name):
            dist, version = "spladectl", _own_version()
        rows.append({"name": display_name(name, plugin), "builtin": is_builtin(name),
                     "source": manager.sources.get(name, "registered"), "distribution": dist, "version": version,
                     "hooks": hooks})
    return sorted(rows, key=lambda row: (not row["builtin"], row["name"]))


def _own_version() -> str:
    from spladectl import __version__

    return __version__
