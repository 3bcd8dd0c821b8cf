"""spladectl-csvlog: every optimizer step's metrics in OUTPUT/metrics.csv, and `spladectl csvlog show OUTPUT`.

A spladectl plugin is a module (or object) with functions marked `@hookimpl`; this package's pyproject registers the
module under the entry-point group `spladectl`, which is all spladectl needs to find it.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from spladectl.hookspecs import hookimpl

__version__ = "0.1.0"

FILENAME = "metrics.csv"
DEFAULT_COLUMNS = ("step", "loss", "lr", "query_dims", "doc_dims", "examples_per_s")


class CsvLog:
    """One run's metrics.csv. The header is the first step's keys; a step with new keys rewrites the file once with
    the wider header (earlier rows get empty cells)."""

    def __init__(self, path: Path, *, resumed_at: int = 0):
        self.path = path
        self.columns: list[str] = []
        rows: list[dict[str, str]] = []
        if resumed_at and path.exists():  # a resumed run redoes the steps after its checkpoint: drop their rows
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or [])
                rows = [row for row in reader if row.get("step") and int(row["step"]) <= resumed_at]
        self._rewrite(rows)

    def write(self, metrics: dict[str, Any]) -> None:
        row = {key: _cell(value) for key, value in metrics.items()}
        new = [key for key in row if key not in self.columns]
        if new:
            self._fh.close()
            with open(self.path, newline="") as fh:
                old_rows = list(csv.DictReader(fh))
            self.columns += new
            self._rewrite(old_rows)
        self._writer.writerow(row)
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=self.columns, restval="")
        if self.columns:
            self._writer.writeheader()
        self._writer.writerows(rows)
        self._fh.flush()


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return value


# ------------------------------------------------------------------------------------------------ hooks

@hookimpl(wrapper=True)
def train(state):
    log = CsvLog(Path(state.output_dir) / FILENAME, resumed_at=state.step) if state.is_main_process else None
    state.extras["csvlog"] = log
    try:
        return (yield)
    finally:
        state.extras.pop("csvlog", None)
        if log is not None:
            log.close()


# tryfirst: the outermost wrapper, so the row has every key the other plugins add (lambda_q, memory, ...).
@hookimpl(wrapper=True, tryfirst=True)
def train_step(state):
    metrics = yield
    log = state.extras.get("csvlog")
    if log is not None:
        log.write(metrics)
    return metrics


@hookimpl
def register_commands(cli):
    import typer

    app = typer.Typer(help="Read the metrics.csv that spladectl-csvlog writes during training.", no_args_is_help=True)

    @app.command("show")
    def show(
        output_dir: Path = typer.Argument(..., help="A training output directory (holding metrics.csv)."),
        columns: str = typer.Option(",".join(DEFAULT_COLUMNS), "--columns", "-c",
                                    help="Comma-separated columns, or 'all'."),
        tail: int = typer.Option(20, "--tail", "-n", min=0, help="Show the last N steps (0: all)."),
    ) -> None:
        """Print the last steps of OUTPUT/metrics.csv as a table."""
        typer.echo(render(output_dir, columns=columns, tail=tail))

    cli.add_typer(app, name="csvlog")


def read(output_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    from spladectl.errors import SpladectlError

    path = Path(output_dir) / FILENAME
    if not path.is_file():
        raise SpladectlError(f"{path}: no such file", hint="train with spladectl-csvlog installed and enabled")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def render(output_dir: Path, *, columns: str = ",".join(DEFAULT_COLUMNS), tail: int = 20) -> str:
    """The table `csvlog show` prints: one line per step, numbers at 4 significant digits."""
    from spladectl.errors import SpladectlError

    available, rows = read(output_dir)
    wanted = available if columns.strip() == "all" else [c.strip() for c in columns.split(",") if c.strip()]
    missing = [c for c in wanted if c not in available]
    if missing:
        raise SpladectlError(f"column(s) {', '.join(missing)} not in {Path(output_dir) / FILENAME}",
                             hint=f"available: {', '.join(available)}")
    total = len(rows)
    rows = rows[-tail:] if tail else rows
    table = [wanted] + [[_short(row.get(c, "")) for c in wanted] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(wanted))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in table]
    lines.append(f"({len(rows)} of {total} steps)")
    return "\n".join(lines)


def _short(cell: str) -> str:
    try:
        value = float(cell)
    except ValueError:
        return cell
    if value.is_integer() and "." not in cell and "e" not in cell.lower():
        return cell
    return f"{value:.4g}" if math.isfinite(value) else cell
