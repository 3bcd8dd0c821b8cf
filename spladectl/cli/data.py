"""`spladectl data`: mine hard negatives, validate and describe training data."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer

from spladectl.errors import SpladectlError

data_app = typer.Typer(
    name="data",
    help="Mine BM25 hard negatives, validate and describe training data (JSON, JSONL, TSV triples, BEIR).",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


@data_app.command("mine")
def mine_command(
    data: Path = typer.Option(..., "--data", "-d", help="BEIR directory (corpus.jsonl, queries.jsonl, qrels/)."),
    out: Path = typer.Option(..., "--out", "-o", help="JSONL file to write (seed format, with ids)."),
    split: str = typer.Option("train", "--split", help="Qrels split whose queries get negatives."),
    k: int = typer.Option(50, "--k", min=1, help="Negatives per query."),
    stem: Optional[bool] = typer.Option(
        None, "--stem/--no-stem", help="BM25 stemming (default: when PyStemmer is installed)."
    ),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="Where to cache mined negatives (default: DATA/.spladectl-cache)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
) -> None:
    """BM25 hard negatives for every query of a split, never one of its positives, as training JSONL."""
    from spladectl.data import bm25, load_beir
    from spladectl.data.mining import cached_hard_negatives

    started = time.perf_counter()
    dataset = load_beir(data, split)
    negatives = cached_hard_negatives(data, split, k, cache_dir=cache_dir, stem=stem, show_progress=progress,
                                      dataset=dataset)
    try:
        rows = _write_mined(out, dataset, negatives, progress)
    except OSError as exc:
        raise SpladectlError(f"--out: cannot write {out} ({exc.strerror or exc})") from exc
    counts = [len(v) for v in negatives.values()]
    summary = {
        "out": str(out),
        "data": str(data),
        "split": split,
        "k": k,
        "queries": len(negatives),
        "examples": rows,
        "min_negatives": min(counts, default=0),
        "avg_negatives": round(sum(counts) / max(len(counts), 1), 2),
        "bm25": bm25.describe(stem),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        typer.echo(
            f"mined {summary['avg_negatives']:g} negatives per query (at least {summary['min_negatives']}) for "
            f"{summary['queries']} queries of {split}: {rows} examples written to {out} in {summary['seconds']:.1f} s"
            f"\n  {summary['bm25']}"
        )


def _write_mined(out: Path, dataset, negatives: dict[str, list[str]], progress: bool) -> int:
    """One seed-format line per (query, positive) pair, with ids; returns the number of lines."""
    from tqdm.auto import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for qid in tqdm(dataset.queries, desc="writing", unit="query", disable=not progress, leave=False):
            negative_ids = negatives.get(qid, [])
            for doc_id in dataset.positives(qid):
                record = {
                    "query_id": qid,
                    "query": dataset.queries[qid],
                    "positive_id": doc_id,
                    "positive_document": dataset.corpus[doc_id],
                    "negative_ids": negative_ids,
                    "negative_documents": [dataset.corpus[d] for d in negative_ids],
                }
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                rows += 1
    tmp.replace(out)  # a half-written file never takes the name of a finished one
    return rows


@data_app.command("validate")
def validate_command(
    path: Path = typer.Argument(..., help="A .json/.jsonl/.tsv training file or a BEIR directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check every row (every qrels split of a BEIR directory); the first problem is reported with file:line, exit 2."""
    from spladectl.data.stats import data_stats

    stats = data_stats(path)
    if as_json:
        typer.echo(json.dumps({"ok": True, **stats}, indent=2))
        return
    if stats["format"] == "beir":
        splits = ", ".join(f"{name} ({s['queries']} queries, {s['judgments']} judgments)"
                           for name, s in stats["splits"].items()) or "no qrels"
        typer.echo(f"OK {path}: BEIR, {stats['documents']} documents, {stats['queries']} queries; splits: {splits}")
    else:
        scores = ", teacher scores" if stats["teacher_scores"] else ""
        typer.echo(f"OK {path}: {stats['format']}, {stats['examples']} examples, {stats['queries']} queries, "
                   f"{stats['avg_negatives_per_example']:g} negatives per example{scores}")


@data_app.command("stats")
def stats_command(
    path: Path = typer.Argument(..., help="A .json/.jsonl/.tsv training file or a BEIR directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Counts and average lengths (in words) of training data or a BEIR directory."""
    from spladectl.data.stats import data_stats

    stats = data_stats(path)
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    _print_stats(stats)


def _print_stats(stats: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{stats['path']} ({stats['format']})", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        if key in ("path", "format", "splits"):
            continue
        table.add_row(key.replace("_", " "), f"{value:g}" if isinstance(value, float) else str(value))
    for split, values in stats.get("splits", {}).items():
        for key, value in values.items():
            table.add_row(f"{split}: {key.replace('_', ' ')}", f"{value:g}" if isinstance(value, float) else str(value))
    Console().print(table)
