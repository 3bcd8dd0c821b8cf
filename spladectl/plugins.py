"""What a spladectl plugin is to the code: the manager with the eight hooks (hookspecs.py), how one plugin is
registered or refused, the built-ins, and the name messages give a plugin.

Which plugins load (built-ins, installed packages, --plugin) is plugin_loading.py; which plugin an error came from
is plugin_errors.py.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import pluggy

from spladectl import hookspecs
from spladectl.errors import PluginError

ENTRY_POINT_GROUP = "spladectl"
DEFAULT_PLUGINS = (
    "spladectl.builtin_plugins.profiles",
    "spladectl.builtin_plugins.memory",
    "spladectl.builtin_plugins.optim",
    "spladectl.builtin_plugins.flops",
    "spladectl.builtin_plugins.distillation",
    "spladectl.builtin_plugins.track_tensorboard",
    "spladectl.builtin_plugins.track_mlflow",
)
WRAPPER_ONLY = ("train", "train_step")  # hooks around the engine's own code: plugins implement them as wrappers


class PluginManager(pluggy.PluginManager):
    """A pluggy manager with spladectl's hookspecs and a record of where each plugin came from."""

    def __init__(self) -> None:
        super().__init__(ENTRY_POINT_GROUP)
        self.add_hookspecs(hookspecs)
        self.sources: dict[str, str] = {}  # plugin name -> "builtin", "entry point", "--plugin"
        self.distributions: dict[str, tuple[str, str]] = {}  # entry-point plugin name -> (distribution, version)
        self.unmatched_selection: list[str] = []  # SPLADECTL_PLUGINS names that matched no installed plugin


def register_builtins(manager: PluginManager) -> None:
    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)
        # A built-in that keeps per-run state or calls hooks itself offers `plugin(manager)`; others are the module.
        factory = getattr(module, "plugin", None)
        register(manager, factory(manager) if callable(factory) else module, module_name, source="builtin")


def register(manager: PluginManager, plugin: Any, name: str, *, source: str, where: str | None = None) -> None:
    """Register `plugin` as `name`, turning pluggy's validation errors into a PluginError that names it.

    A hook implementation whose name matches no hook (a typo such as `train_setp`) is an error too, unless it is
    marked `@hookimpl(optionalhook=True)`: otherwise it would silently never run. So is a `train` or `train_step`
    implementation that is not a wrapper.
    """
    where = where or f"plugin {name!r}"
    try:
        manager.register(plugin, name=name)
    except ValueError as exc:  # pluggy: already registered, or blocked
        raise PluginError(f"{where}: {exc}") from exc
    except pluggy.PluginValidationError as exc:
        detail = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise PluginError(f"{where} does not match the hook specifications: {detail}",
                          hint="see docs/plugins.md for each hook's arguments") from exc
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        if exc.plugin is not plugin:
            raise  # another plugin's, added without this function: not this one's fault
        unknown = sorted(caller.name for caller in manager.get_hookcallers(plugin) or [] if not caller.has_spec())
        manager.unregister(plugin)
        raise PluginError(f"{where} implements unknown hook(s) {', '.join(unknown) or str(exc)}",
                          hint="the hooks are listed in docs/plugins.md (mark a deliberate extra one "
                               "@hookimpl(optionalhook=True))") from exc
    # The engine's own code is the innermost implementation of these: a plain one would never run, or with
    # tryfirst would run instead of the training or the step.
    plain = sorted(caller.name for caller in manager.get_hookcallers(plugin) or [] if caller.name in WRAPPER_ONLY
                   and any(impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper)
                           for impl in caller.get_hookimpls()))
    if plain:
        manager.unregister(plugin)
        raise PluginError(f"{where} implements {' and '.join(plain)} without wrapper=True",
                          hint="implement it as @hookimpl(wrapper=True), a generator that yields to the engine's "
                               "own code and returns its result (see docs/plugins.md)")
    manager.sources[name] = source


def is_builtin(name: str) -> bool:
    return name in DEFAULT_PLUGINS


def display_name(name: str | None, plugin: Any) -> str:
    """How messages name a plugin: its registered name, or for an object registered without one, its class."""
    if name and not name.isdigit():  # pluggy names an unnamed object by its id()
        return name
    if isinstance(plugin, ModuleType):
        return plugin.__name__
    kind = plugin if isinstance(plugin, type) else type(plugin)
    return f"{kind.__module__}.{kind.__qualname__}"
