"""Errors caused by the user's input or environment.

They are Click exceptions, so every command (and CliRunner in tests) prints them as one `Error: ...` line, no
traceback, and exits with `exit_code`. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

try:  # typer >= 0.2x runs commands on its own vendored click and only catches that copy's exceptions
    from typer._click.exceptions import ClickException
except ImportError:  # older typer runs on click itself
    from click import ClickException


class SpladectlError(ClickException):
    """A mistake in what the user gave us (a file, a flag, a profile) or a machine that cannot do what was asked."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def format_message(self) -> str:
        return self.message if not self.hint else f"{self.message}\nHint: {self.hint}"

    def __str__(self) -> str:
        return self.message


class DataError(SpladectlError):
    """A data file that cannot be read as training or evaluation data; the message names the file and line."""


class ProfileError(SpladectlError):
    """A hardware profile that does not load or resolve; the message names the file and key."""


class CheckpointError(SpladectlError):
    """A checkpoint that is missing, corrupt or does not match the run being resumed."""


class CollapseError(SpladectlError):
    """A run whose representations collapsed (see collapse.py); the message says at which step, what was seen and
    what to change."""


class NonFiniteError(SpladectlError):
    """A step whose loss or gradient is NaN or infinite, under --on-nan stop (or after the last rollback); the message
    names the step and the terms that were not finite."""


class PluginError(SpladectlError):
    """A plugin failed to load or raised inside a hook; the message names the plugin."""

    exit_code = 1
