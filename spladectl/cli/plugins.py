"""`spladectl plugins`: which plugins are loaded, where they come from and which hooks they implement."""

from __future__ import annotations

import json

import typer

plugins_app = typer.Typer(help="List the plugins spladectl loads (SPLADECTL_PLUGINS selects installed ones).",
                          no_args_is_help=False, invoke_without_command=True)


@plugins_app.callback()
def _default(
    ctx: typer.Context,
    all_: bool = typer.Option(False, "--all", help="Include the built-in plugins."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the plugins spladectl loads; `spladectl plugins [--all] [--json]` is `spladectl plugins list`."""
    if ctx.invoked_subcommand is None:
        list_plugins(all_=all_, as_json=as_json)


@plugins_app.command("list")
def list_plugins(
    all_: bool = typer.Option(False, "--all", help="Include the built-in plugins."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of objects (name, builtin, source, "
                                                       "distribution, version, hooks)."),
) -> None:
    """List installed (and with --all, built-in) plugins with their distribution, version and hooks."""
    from spladectl.plugin_loading import ENV_VAR, describe_plugins, load_plugins

    rows = describe_plugins(include_builtin=all_)
    for name in load_plugins().unmatched_selection:
        typer.echo(f"note: {ENV_VAR} names {name!r}, which is not an installed plugin", err=True)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"No installed plugins loaded ({ENV_VAR} selects them; --all also lists the built-ins).")
        return
    for row in rows:
        origin = "built-in" if row["builtin"] else row["source"]
        dist = f"{row['distribution']} {row['version']}".strip() or "-"
        typer.echo(f"{row['name']}  ({dist}, {origin})")
        typer.echo(f"    hooks: {', '.join(row['hooks']) or '-'}")


def register(app: typer.Typer) -> None:
    app.add_typer(plugins_app, name="plugins")
