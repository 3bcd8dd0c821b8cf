"""The plugin manager: built-ins, installed packages (entry-point group `spladectl`) and `--plugin module:object`.

`SPLADECTL_PLUGINS` selects which installed packages load: unset loads all, an empty value loads none, otherwise a
comma-separated list of entry-point or distribution names (so a broken package can always be switched off). Built-in
plugins always load, registered exactly as an installed package is; flags and config keys switch their behaviour.

`pm` is the process-wide manager the CLI uses, filled on the first `load_plugins()`. Tests and embedders can build
an independent one with `make_plugin_manager(env=...)`, or empty the global one with `reset()`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import pluggy

from spladectl import hookspecs
from spladectl.errors import PluginError, SpladectlError

ENTRY_POINT_GROUP = "spladectl"
ENV_VAR = "SPLADECTL_PLUGINS"

DEFAULT_PLUGINS = (
    "spladectl.default_plugins.core",
    "spladectl.default_plugins.memory",
    "spladectl.default_plugins.optim",
    "spladectl.default_plugins.flops",
    "spladectl.default_plugins.distillation",
    "spladectl.default_plugins.track_tensorboard",
    "spladectl.default_plugins.track_mlflow",
)


class PluginManager(pluggy.PluginManager):
    """A pluggy manager with spladectl's hookspecs and a record of where each plugin came from."""

    def __init__(self) -> None:
        super().__init__(ENTRY_POINT_GROUP)
        self.add_hookspecs(hookspecs)
        self.sources: dict[str, str] = {}  # plugin name -> "builtin", "entry point", "--plugin"
        self.distributions: dict[str, tuple[str, str]] = {}  # entry-point plugin name -> (distribution, version)
        self.unmatched_selection: list[str] = []  # SPLADECTL_PLUGINS names that matched no installed plugin


pm = PluginManager()
_loaded = False


# ------------------------------------------------------------------------------------------------ building managers

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


def register_builtins(manager: PluginManager) -> None:
    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)
        # A built-in that keeps per-run state or calls hooks itself offers `plugin(manager)`; others are the module.
        factory = getattr(module, "plugin", None)
        register(manager, factory(manager) if callable(factory) else module, module_name, source="builtin")


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
                              hint=_switch_off_hint(ep.name)) from exc
        register(manager, plugin, ep.name, source="entry point", where=where)
        if dist:
            manager.distributions[ep.name] = (dist, version)
        loaded.append(ep.name)
    manager.unmatched_selection = sorted((wanted or set()) - matched)
    return loaded


def _switch_off_hint(name: str) -> str:
    return f"switch it off with {ENV_VAR}= (none) or a list without {name!r}, or uninstall it"


def register(manager: PluginManager, plugin: Any, name: str, *, source: str, where: str | None = None) -> None:
    """Register `plugin` as `name`, turning pluggy's validation errors into a PluginError that names it.

    A hook implementation whose name matches no hook (a typo such as `on_step_ned`) is an error too, unless it is
    marked `@hookimpl(optionalhook=True)`: otherwise it would silently never run.
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
    unknown = sorted(caller.name for caller in manager.get_hookcallers(plugin) or []
                     if not caller.has_spec() and not all(i.optionalhook for i in caller.get_hookimpls()
                                                          if i.plugin is plugin))
    if unknown:
        manager.unregister(plugin)
        raise PluginError(f"{where} implements unknown hook(s) {', '.join(unknown)}",
                          hint="the hooks are listed in docs/plugins.md (mark a deliberate extra one "
                               "@hookimpl(optionalhook=True))")
    manager.sources[name] = source


# ------------------------------------------------------------------------------------------------ the global manager

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


# ------------------------------------------------------------------------------------------------ describing them

def distribution_of(name: str, manager: PluginManager | None = None) -> tuple[str, str] | None:
    """(distribution, version) for an installed plugin registered through an entry point."""
    return (manager if manager is not None else pm).distributions.get(name)


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


# ------------------------------------------------------------------------------------------------ errors and results

def hook_error(exc: BaseException, manager: PluginManager | None = None) -> PluginError | None:
    """If `exc` was raised by a third-party plugin (inside a hook, or in code it handed to spladectl such as an LR
    schedule's function), a PluginError naming that plugin; else None (spladectl's own errors and bugs pass through).

    The innermost frame of the traceback that belongs to a plugin decides: a hook implementation's own code, or any
    code of the module (package) a plugin was registered from, or of the class an instance plugin belongs to.
    """
    manager = manager if manager is not None else pm
    if isinstance(exc, PluginError):
        return None
    codes, modules = _plugin_frames(manager)
    culprit = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        module_name = frame.f_globals.get("__name__", "")
        owner = codes.get(frame.f_code)
        if owner is None:
            owner = next((name for prefix, name in modules if module_name == prefix
                          or module_name.startswith(prefix + ".")), None)
        if owner is not None:
            culprit = owner
        tb = tb.tb_next
    if culprit is None or is_builtin(culprit):
        return None
    plugin = manager.get_plugin(culprit)
    label = display_name(culprit, plugin)
    if isinstance(exc, SpladectlError):  # a plugin's own user-facing error: keep its message, say whose it is
        return PluginError(f"plugin {label!r}: {exc.message}", hint=exc.hint)
    hint = _switch_off_hint(culprit) if manager.sources.get(culprit) == "entry point" else None
    return PluginError(f"plugin {label!r} raised {type(exc).__name__}: {exc}", hint=hint)


def _plugin_frames(manager: PluginManager) -> tuple[dict[Any, str], list[tuple[str, str]]]:
    """Which code belongs to which plugin: code objects (hook implementations, an object plugin's methods, and the
    functions and lambdas nested in them) and, for a module plugin, its module or package name."""
    codes: dict[Any, str] = {}
    modules: list[tuple[str, str]] = []
    for name, plugin in manager.list_name_plugin():
        if plugin is None:
            continue
        functions = [impl.function for caller in manager.get_hookcallers(plugin) or []
                     for impl in caller.get_hookimpls() if impl.plugin is plugin]
        if isinstance(plugin, ModuleType):
            modules.append((plugin.__name__, name))
        else:
            # Its class's methods, and those of base classes from the same module (never a library's base class).
            cls = plugin if isinstance(plugin, type) else type(plugin)
            functions += [value for klass in cls.__mro__ if klass.__module__ == cls.__module__
                          for value in vars(klass).values()]
        for function in functions:
            function = getattr(function, "__func__", function)  # methods, classmethods, staticmethods
            if callable(function):
                function = inspect.unwrap(function)
            code = getattr(function, "__code__", None)
            if code is not None:
                for nested in _code_tree(code):
                    codes.setdefault(nested, name)
    return codes, modules


def _code_tree(code: Any) -> list[Any]:
    out = [code]
    for const in code.co_consts:
        if inspect.iscode(const):
            out += _code_tree(const)
    return out


def summary_rows(state: Any, manager: PluginManager | None = None) -> list[tuple[str, str]]:
    """Every plugin's `summary_rows` for the end-of-run summary, flattened into (label, value) pairs."""
    manager = manager if manager is not None else pm
    rows: list[tuple[str, str]] = []
    for result in reversed(manager.hook.summary_rows(state=state)):  # registration order: built-ins first
        rows.extend((str(label), str(value)) for label, value in result or [])
    return rows


def call_register_commands(cli: Any, manager: PluginManager | None = None) -> None:
    """Run the `register_commands` hook, naming the plugin if one raises."""
    _call_naming_culprit(lambda m: m.hook.register_commands(cli=cli), manager, "register_commands")


def call_register_profiles(register: Callable[..., Any], manager: PluginManager | None = None) -> None:
    """Run the `register_profiles` hook one plugin at a time, so that `origin` defaults to the plugin's distribution
    (or its name) and an error names the plugin."""
    manager = manager if manager is not None else load_plugins()
    impls = manager.hook.register_profiles.get_hookimpls()
    for impl in impls:
        dist = manager.distributions.get(impl.plugin_name)
        default_origin = dist[0] if dist else display_name(impl.plugin_name, impl.plugin)

        def register_with_origin(path_or_mapping, origin=None, _default=default_origin):
            return register(path_or_mapping, origin=origin or _default)

        others = [other.plugin for other in impls if other is not impl]
        hook = manager.subset_hook_caller("register_profiles", remove_plugins=others)
        _call_naming_culprit(lambda m, h=hook, r=register_with_origin: h(register=r), manager, "register_profiles")


@contextmanager
def naming_plugin_errors(manager: PluginManager | None = None, *, during: str | None = None) -> Iterator[None]:
    """Re-raise an exception from a third-party plugin as a PluginError naming it (see `hook_error`); spladectl's
    own errors and bugs pass through unchanged. `with naming_plugin_errors(): trainer.fit()`."""
    try:
        yield
    except Exception as exc:
        named = hook_error(exc, manager if manager is not None else pm)
        if named is None:
            raise
        if during:
            named = PluginError(f"{named.message} in {during}", hint=named.hint)
        raise named from exc


def _call_naming_culprit(call: Callable[[PluginManager], Any], manager: PluginManager | None, hook: str) -> None:
    manager = manager if manager is not None else load_plugins()
    with naming_plugin_errors(manager, during=hook):
        call(manager)
