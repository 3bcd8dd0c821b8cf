"""How every command prints: a rich console, plain-text tables, JSON, numbers and durations.

One place, so that `runs list`, `profile show`, `sweep` and `eval` tables look alike and a change of style is one edit.
"""

from __future__ import annotations

import json
from typing import Any

import typer


def console(piped_width: int = 120):
    """A rich console without highlighting (numbers and paths in colour add nothing). Output piped to a file or grep
    is `piped_width` wide instead of rich's 80 columns: long ids and descriptions stay on one line."""
    from rich.console import Console

    terminal = Console(highlight=False)
    return terminal if terminal.is_terminal else Console(highlight=False, width=piped_width)


def table(*columns: str, title: str | None = None, caption: str | None = None):
    from rich import box
    from rich.table import Table
    from rich.text import Text

    return Table(*columns, title=Text(title) if title else None, caption=caption, box=box.SIMPLE_HEAD,
                 title_justify="left", title_style="bold")


def row(table, *cells: Any) -> None:
    """Add a row of plain text: a description or path with [brackets] must not be read as rich markup."""
    from rich.text import Text

    table.add_row(*(Text(text(cell)) for cell in cells))


def text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def number(value: Any) -> str:
    """Five significant digits for floats, `-` for a missing value."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))
