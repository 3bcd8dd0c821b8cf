"""Which plugin an error came from, so that the user reads its name (and how to switch it off) instead of a
traceback; and the register hooks, called so that an error names the plugin that raised it."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from spladectl.errors import PluginError, SpladectlError
from spladectl.plugin_loading import load_plugins, pm, switch_off_hint
from spladectl.plugins import PluginManager, display_name, is_builtin


def hook_error(exc: BaseException, manager: PluginManager | None = None) -> PluginError | None:
    """If `exc` was raised by a third-party plugin (inside a hook, or in code it handed to spladectl such as an LR
    schedule's function), a PluginError naming that plugin; else None (spladectl's own errors and bugs pass through).

    The innermost frame of the traceback that belongs to a plugin decides: a hook implementation's own code, or any
    code of the module (package) a plugin was registered from, or of the class an instance plugin belongs to. A
    wrapper's frame that the exception only passed through, raised by what ran inside its `yield`, does not count.
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
        if owner is not None and not _thrown_in(tb):
            culprit = owner
        tb = tb.tb_next
    if culprit is None or is_builtin(culprit):
        return None
    plugin = manager.get_plugin(culprit)
    label = display_name(culprit, plugin)
    if isinstance(exc, SpladectlError):  # a plugin's own user-facing error: keep its message, say whose it is
        return PluginError(f"plugin {label!r}: {exc.message}", hint=exc.hint)
    hint = switch_off_hint(culprit) if manager.sources.get(culprit) == "entry point" else None
    return PluginError(f"plugin {label!r} raised {type(exc).__name__}: {exc}", hint=hint)


def _thrown_in(tb: Any) -> bool:
    """A wrapper's frame that the exception only passed through: pluggy threw it in at the wrapper's `yield` (the
    engine's own step or training, or another implementation, raised it)."""
    following = tb.tb_next
    return following is not None and following.tb_frame.f_code.co_name == "_multicall" and \
        following.tb_frame.f_globals.get("__name__", "").startswith("pluggy")


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
