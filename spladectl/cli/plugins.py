"""`spladectl plugins`: which plugins are loaded, where they come from and which hooks they implement."""

from __future__ import annotations

import json

import typer

plugins_app = typer.Typer(help="List the plugins spladectl loads (SPLADECTL_PLUGINS selects installed ones).",
                          no_args_is_help=False, invoke_without_command=True)


@plugins_app.callback()
def _default(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:  # `spladectl plugins` alone behaves like `plugins list`
        list_plugins(all_=False, as_json=False)


@plugins_app.command("list")
def list_plugins(
    all_: bool = typer.Option(False, "--all", help="Include the built-in plugins."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of objects with name and builtin."),
) -> None:
    """List installed (and with --all, built-in) plugins with their distribution, version and hooks."""
    from spladectl.plugins import describe_plugins

    rows = describe_plugins(include_builtin=all_)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("No third-party plugins loaded (see --all for built-ins; SPLADECTL_PLUGINS selects installed ones).")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "builtin", "distribution", "version", "hooks")
    for row in rows:
        table.add_row(row["name"], "yes" if row["builtin"] else "no", row["distribution"], row["version"],
                      ", ".join(row["hooks"]))
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(plugins_app, name="plugins")
