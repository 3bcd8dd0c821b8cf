"""The hardware profiles shipped with spladectl (profiles/*.toml), offered through the same hook as a plugin's."""

from __future__ import annotations

from spladectl.hookspecs import hookimpl
from spladectl.profiles import builtin_dir


@hookimpl
def register_profiles(register):
    # Built-ins register first, so a third-party plugin's profile of the same name replaces a shipped one.
    for path in sorted(builtin_dir().glob("*.toml")):
        register(path, origin="builtin")
