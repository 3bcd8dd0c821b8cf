"""The root `spladectl` Typer app: global options, command registration and user-error handling."""

from __future__ import annotations

import importlib
import sys

import typer

from spladectl import __version__
from spladectl.errors import SpladectlError

# Each module exposes `register(app)`; listing them here keeps start-up imports lazy and the order of --help stable.
COMMAND_MODULES = (
    "spladectl.cli.train",
    "spladectl.cli.sweep",
    "spladectl.cli.tune",
    "spladectl.cli.runs",
    "spladectl.cli.eval",
    "spladectl.cli.search",
    "spladectl.cli.export",
    "spladectl.cli.encode",
    "spladectl.cli.index",
    "spladectl.cli.data",
    "spladectl.cli.bench",
    "spladectl.cli.profile",
    "spladectl.cli.env",
    "spladectl.cli.plugins",
)

app = typer.Typer(
    name="spladectl",
    help="Train SPLADE sparse retrieval models fast on whatever hardware you have.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"spladectl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Train SPLADE sparse retrieval models fast on whatever hardware you have.

    Start with `spladectl profile detect` to see how this machine would train, then `spladectl train`.
    """


def build_app() -> typer.Typer:
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(app)
    from spladectl.plugin_errors import call_register_commands
    from spladectl.plugin_loading import load_plugins

    call_register_commands(app, load_plugins())
    return app


def main() -> None:
    try:
        build_app()
    except SpladectlError as exc:  # a broken plugin package: say which, never a traceback
        exc.show()
        sys.exit(exc.exit_code)
    app()
