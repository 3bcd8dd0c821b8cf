"""Hardware profiles: the TOML schema, loading with named errors, and the registry.

A profile is a small TOML file (see profiles/*.toml and docs/profiles.md). The registry collects them from, in order,
the shipped files, plugins (the `register_profiles` hook) and the user's config directory; a later one with the same
name replaces an earlier one. `ProfileRegistry.get` also accepts a path, so `--profile ./mine.toml` works.

Every mistake in a profile is a `ProfileError` naming the file, the key and what was expected, e.g.
    profiles/bad.toml: key 'batch_size': expected an integer >= 1, got string "big"
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spladectl._compat import tomllib
from spladectl.errors import ProfileError, SpladectlError
from spladectl.precision import canonical_precision

DEVICES = ("cuda", "mps", "cpu")
ACCELERATORS = ("cuda", "mps", "cpu")

# What each top-level key must hold; the checker functions below turn a kind into a test and an "expected ..." text.
SETTING_KINDS: dict[str, str] = {
    "name": "string",
    "description": "string",
    "extends": "string",
    "device": "device",
    "precision": "precision",
    "batch_size": "positive",
    "batch_size_32": "positive",
    "grad_accum": "positive",
    "tf32": "bool",
    "gradient_checkpointing": "bool",
    "max_query_length": "positive",
    "max_doc_length": "positive",
    "dataloader_workers": "count",
    "match": "table",
}
MATCH_KINDS: dict[str, str] = {
    "accelerator": "accelerator",
    "gpu_name": "regex",
    "memory_gib": "number",
    "compute_capability": "capability",
    "cpu_features": "strings",
    "os": "string",
    "arch": "string",
}
REQUIRED = ("description", "device", "precision", "batch_size")
DEFAULTS: dict[str, Any] = {
    "batch_size_32": None,  # None: the same as batch_size
    "grad_accum": 1,
    "tf32": False,
    "gradient_checkpointing": False,
    "max_query_length": 64,
    "max_doc_length": 256,
    "dataloader_workers": 0,
}


@dataclass(frozen=True)
class Match:
    """What `profile detect` compares the machine with. Not inherited through `extends` (see docs/profiles.md)."""

    accelerator: str = "cpu"
    gpu_name: str | None = None  # a case-insensitive regular expression searched in the GPU name
    memory_gib: float | None = None  # the memory the batch sizes were chosen for
    compute_capability: tuple[int, int] | None = None
    cpu_features: tuple[str, ...] = ()
    os: str | None = None  # "linux", "darwin", "windows"
    arch: str | None = None  # "x86_64", "arm64"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["compute_capability"] = _capability_text(self.compute_capability)
        out["cpu_features"] = list(self.cpu_features)
        return {k: v for k, v in out.items() if v not in (None, [])}


@dataclass(frozen=True)
class Profile:
    """One profile with `extends` already applied; values are as written, before any hardware fallback."""

    name: str
    description: str
    device: str
    precision: str
    batch_size: int
    batch_size_32: int | None = None
    grad_accum: int = 1
    tf32: bool = False
    gradient_checkpointing: bool = False
    max_query_length: int = 64
    max_doc_length: int = 256
    dataloader_workers: int = 0
    match: Match | None = None
    extends: str | None = None
    origin: str = "builtin"
    path: str | None = None  # the file it was read from; None for a table a plugin registered

    @property
    def batch_size_for_32_true(self) -> int:
        return self.batch_size_32 if self.batch_size_32 is not None else self.batch_size

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["match"] = self.match.to_dict() if self.match else None
        return out


@dataclass
class _Source:
    """A profile's own keys as read, before `extends` is applied."""

    name: str
    values: dict[str, Any]
    origin: str
    where: str  # how errors name it: a path, or "profile 'x' from plugin y"
    path: str | None


class ProfileRegistry:
    """Profiles by name. `register` adds a file or table, `get` builds one (applying `extends`), `names` lists them."""

    def __init__(self) -> None:
        self._sources: dict[str, _Source] = {}

    def register(self, path_or_mapping: str | os.PathLike | Mapping[str, Any], origin: str = "plugin") -> str:
        """Add one profile from a TOML file or a table (which must then have a `name`); returns its name.

        This is the callable plugins receive in the `register_profiles` hook. A later profile replaces an earlier one
        with the same name, which is how a user's file overrides a shipped one.
        """
        source = _read_source(path_or_mapping, origin)
        self._sources[source.name] = source
        return source.name

    def register_dir(self, directory: str | os.PathLike, origin: str) -> list[str]:
        directory = Path(directory)
        if not directory.is_dir():
            return []
        return [self.register(path, origin=origin) for path in sorted(directory.glob("*.toml"))]

    def names(self) -> list[str]:
        return sorted(self._sources)

    def origin(self, name: str) -> str:
        return self._source(name).origin

    def get(self, name_or_path: str | os.PathLike) -> Profile:
        """A profile by name, or by path to a TOML file (a path may `extends` any registered profile)."""
        text = str(name_or_path)
        if _looks_like_path(text):
            path = Path(text).expanduser()
            if not path.is_file():
                raise ProfileError(f"{text}: no such profile file")
            source = _read_source(path, "path")
            return self._build(source, (str(path),))
        return self._build(self._source(text), (text,))

    def all(self) -> list[Profile]:
        return [self.get(name) for name in self.names()]

    def validate(self) -> None:
        """Build every profile so that a broken file (or a cycle through `extends`) is reported when loading."""
        self.all()

    def _source(self, name: str) -> _Source:
        if name not in self._sources:
            close = difflib.get_close_matches(name, self.names(), n=1)
            raise ProfileError(
                f"unknown profile {name!r}; known profiles: {', '.join(self.names()) or '(none)'}",
                hint=(f"did you mean {close[0]!r}? " if close else "") + "a path to a .toml file works too",
            )
        return self._sources[name]

    def _build(self, source: _Source, chain: tuple[str, ...]) -> Profile:
        values = {k: v for k, v in source.values.items() if k != "match"}
        parent_name = values.get("extends")
        if parent_name is not None:
            if parent_name in chain:
                cycle = " -> ".join((*chain, parent_name))
                raise ProfileError(f"{source.where}: key 'extends': profiles extend each other in a cycle ({cycle})")
            if parent_name not in self._sources:
                raise ProfileError(
                    f"{source.where}: key 'extends': expected the name of a known profile, got {parent_name!r}; "
                    f"known profiles: {', '.join(self.names())}"
                )
            parent = self._build(self._sources[parent_name], (*chain, parent_name))
            inherited = {k: getattr(parent, k) for k in SETTING_KINDS if k not in ("name", "extends", "match")}
            values = {**inherited, **values}
        for key in REQUIRED:
            if key not in values:
                raise ProfileError(f"{source.where}: missing key {key!r} (expected {_EXPECTED[SETTING_KINDS[key]]})")
        values = {**DEFAULTS, **values}
        values.pop("name", None)
        match = _make_match(source.values["match"]) if "match" in source.values else None
        return Profile(name=source.name, match=match, origin=source.origin, path=source.path, **values)


# ---- reading and checking one file ------------------------------------------------------------------------------

def _looks_like_path(text: str) -> bool:
    return text.endswith(".toml") or os.sep in text or "/" in text


def _display(path: Path) -> str:
    """A path as errors show it: relative to the current directory when it is below it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)
    return str(path) if rel.startswith("..") else rel


def _read_source(path_or_mapping: str | os.PathLike | Mapping[str, Any], origin: str) -> _Source:
    if isinstance(path_or_mapping, Mapping):
        values = dict(path_or_mapping)
        name = values.get("name")
        where = f"profile {name!r} from {origin}" if isinstance(name, str) else f"a profile from {origin}"
        if not isinstance(name, str) or not name:
            raise ProfileError(f"{where}: missing key 'name' (a table registered without a file needs one)")
        return _Source(name, _check_table(values, where), origin, where, None)
    path = Path(path_or_mapping)
    where = _display(path)
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # -sig: an editor's BOM is not a statement
    except OSError as exc:
        raise ProfileError(f"{where}: cannot read the profile ({exc.strerror or exc})") from exc
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError, UnicodeDecodeError, a 5000-digit integer
        raise ProfileError(f"{where}: not valid TOML ({toml_problem(exc)})") from exc
    values = _check_table(values, where)
    return _Source(values.get("name", path.stem), values, origin, where, str(path))


def toml_problem(exc: Exception) -> str:
    """What made tomllib fail: its message, or for a RecursionError arrays nested too deeply (the advice after `;`
    in Python's message about integers of over 4300 digits is for programmers, not for the file's author)."""
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]


def _check_table(values: dict[str, Any], where: str) -> dict[str, Any]:
    checked = {}
    for key, value in values.items():
        if key not in SETTING_KINDS:
            raise ProfileError(_unknown_key(where, key, list(SETTING_KINDS)))
        checked[key] = _check(where, key, value, SETTING_KINDS[key])
    if "match" in checked:
        match = {}
        for key, value in checked["match"].items():
            if key not in MATCH_KINDS:
                raise ProfileError(_unknown_key(where, f"match.{key}", [f"match.{k}" for k in MATCH_KINDS]))
            match[key] = _check(where, f"match.{key}", value, MATCH_KINDS[key])
        checked["match"] = match
    return checked


def _unknown_key(where: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    suggestion = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where}: unknown key {key!r}{suggestion}; expected one of: {', '.join(known)}"


_EXPECTED = {
    "string": "a string",
    "device": f"one of {', '.join(DEVICES)}",
    "accelerator": f"one of {', '.join(ACCELERATORS)}",
    "precision": "a precision: 32-true, 16-mixed or bf16-mixed (aliases fp32/no, fp16, bf16)",
    "positive": "an integer >= 1",
    "count": "an integer >= 0",
    "bool": "true or false",
    "number": "a number > 0",
    "table": "a table ([match])",
    "strings": "a list of strings",
    "regex": "a regular expression string",
    "capability": 'a compute capability string like "8.0"',
}


def _describe(value: Any) -> str:
    """How TOML would name the value we got, for error messages."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f'string "{value}"'
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML's true is not a batch size


def _is_precision(value: Any) -> bool:
    try:
        return isinstance(value, str) and bool(canonical_precision(value))
    except SpladectlError:
        return False


def _is_regex(value: Any) -> bool:
    try:
        return isinstance(value, str) and bool(re.compile(value))
    except (re.error, OverflowError, RecursionError):  # a{99999999999}; groups nested a thousand deep
        return False


_VALID: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "device": lambda v: isinstance(v, str) and v in DEVICES,
    "accelerator": lambda v: isinstance(v, str) and v in ACCELERATORS,
    "precision": _is_precision,
    "positive": lambda v: _is_int(v) and v >= 1,
    "count": lambda v: _is_int(v) and v >= 0,
    "bool": lambda v: isinstance(v, bool),
    "number": lambda v: (_is_int(v) or isinstance(v, float)) and v > 0,
    "table": lambda v: isinstance(v, dict),
    "strings": lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v),
    "regex": _is_regex,
    "capability": lambda v: isinstance(v, str) and re.fullmatch(r"\d{1,9}\.\d{1,9}", v.strip()) is not None,
}
_NORMALISE: dict[str, Callable[[Any], Any]] = {
    "precision": canonical_precision,
    "strings": tuple,
    "capability": lambda v: tuple(int(part) for part in v.strip().split(".")),
}


def _check(where: str, key: str, value: Any, kind: str) -> Any:
    """The value, normalised (canonical precision, capability tuple), or an error naming where, key and expectation."""
    if not _VALID[kind](value):
        raise ProfileError(f"{where}: key {key!r}: expected {_EXPECTED[kind]}, got {_describe(value)}")
    normalise = _NORMALISE.get(kind)
    return normalise(value) if normalise else value


def _make_match(values: dict[str, Any]) -> Match:
    values = dict(values)
    if "memory_gib" in values:
        values["memory_gib"] = float(values["memory_gib"])
    for key in ("os", "arch"):
        if key in values:
            values[key] = values[key].lower()
    return Match(**values)


def _capability_text(capability: tuple[int, int] | None) -> str | None:
    return f"{capability[0]}.{capability[1]}" if capability else None


# ---- where profiles come from -------------------------------------------------------------------------------------

def builtin_dir() -> Path:
    """The shipped profiles: spladectl/profiles/ in an installed wheel, else the checkout's top-level profiles/."""
    package = Path(__file__).resolve().parent
    installed = package / "profiles"
    return installed if installed.is_dir() else package.parent / "profiles"


def user_dir(env: Mapping[str, str] | None = None) -> Path:
    """$XDG_CONFIG_HOME/spladectl/profiles, with XDG's default of ~/.config."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "spladectl" / "profiles"


def default_registry(*, env: Mapping[str, str] | None = None, plugins: bool = True) -> ProfileRegistry:
    """Shipped profiles, then plugin profiles, then the user's directory; every profile is checked before returning."""
    registry = ProfileRegistry()
    if plugins:  # the shipped ones come first, from the built-in plugin builtin_plugins/profiles.py
        _register_plugin_profiles(registry.register)
    else:
        registry.register_dir(builtin_dir(), origin="builtin")
    registry.register_dir(user_dir(env), origin="user")
    registry.validate()
    return registry


def _register_plugin_profiles(register: Callable[..., str]) -> None:
    from spladectl.plugin_errors import call_register_profiles

    call_register_profiles(register)
