"""`spladectl data`: mine hard negatives, validate and describe training data."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

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
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Rank with this SPLADE model instead of BM25 (splade-tiny, a run's final/ ...)."
    ),
    rank_by: Optional[list[str]] = typer.Option(
        None, "--rank-by", help="Rank with a teacher ensemble instead: repeat NAME[=WEIGHT], NAME one of bm25, "
        "bm25:stem, bm25:nostem or a SPLADE model; e.g. --rank-by bm25:stem=0.6 --rank-by splade-tiny=0.4.",
    ),
    skip_top: int = typer.Option(
        0, "--skip-top", min=0, help="Skip the best N non-positive documents of each query (likely unjudged "
        "positives, i.e. false negatives).",
    ),
    sample_from: Optional[int] = typer.Option(
        None, "--sample-from", min=1, help="Draw the k negatives at random from the next N ranks (after --skip-top) "
        "instead of taking the first k.",
    ),
    seed: int = typer.Option(42, "--seed", help="Seed of --sample-from's draw."),
    max_positives: Optional[int] = typer.Option(
        None, "--max-positives", min=1, help="At most N examples per query: its N most relevant positives (qrels "
        "order among equals). Sets with dozens of positives per query otherwise repeat each query dozens of times.",
    ),
    max_doc_length: int = typer.Option(256, "--max-doc-length", min=1, help="Document tokens for a SPLADE ranker."),
    max_query_length: int = typer.Option(64, "--max-query-length", min=1, help="Query tokens for a SPLADE ranker."),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="SPLADE ranker: 32-true or bf16-mixed (default: bf16-mixed with native bf16)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
) -> None:
    """Hard negatives for every query of a split, never one of its positives, as training JSONL.

    BM25 ranks by default (cached); --model or --rank-by rank with a SPLADE model or an ensemble, e.g. the zero-shot
    model, or a run's own model for a second round of mining.
    """
    from spladectl.data import bm25, load_beir
    from spladectl.data.mining import cached_hard_negatives, mine_with_teacher
    from spladectl.data.teachers import describe, parse_members

    if model and rank_by:
        raise SpladectlError("--model and --rank-by: give one (--model M is --rank-by M)")
    if sample_from is not None and sample_from < k:
        raise SpladectlError(f"--sample-from {sample_from}: must be at least --k ({k})")
    started = time.perf_counter()
    dataset = load_beir(data, split)
    specs = [model] if model else rank_by
    members = parse_members(specs, "--rank-by") if specs else None
    if members is None and not skip_top and sample_from is None:
        negatives = cached_hard_negatives(data, split, k, cache_dir=cache_dir, stem=stem, show_progress=progress,
                                          dataset=dataset)
        ranker = bm25.describe(stem)
    else:
        from spladectl.data.teachers import Member

        members = members or [Member(bm25.variant(stem))]
        settings = _encode_settings(precision, max_query_length, max_doc_length, cache_dir, progress)
        negatives = mine_with_teacher(dataset, members, k, skip_top=skip_top, sample_from=sample_from, seed=seed,
                                      settings=settings)
        ranker = describe(members) + (f", skip top {skip_top}" if skip_top else "") + \
            (f", {k} sampled from the next {sample_from}" if sample_from else "")
    rows = _write_jsonl(out, _mined_records(dataset, negatives, progress, max_positives))
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
        "ranked_by": ranker,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if members is None:
        summary["bm25"] = ranker  # the key scripts read before other rankers existed
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        typer.echo(
            f"mined {summary['avg_negatives']:g} negatives per query (at least {summary['min_negatives']}) for "
            f"{summary['queries']} queries of {split}: {rows} examples written to {out} in {summary['seconds']:.1f} s"
            f"\n  ranked by {summary['ranked_by']}"
        )


def _mined_records(dataset, negatives: dict[str, list[str]], progress: bool,
                   max_positives: int | None = None) -> Iterator[dict[str, Any]]:
    """One seed-format record per (query, positive) pair, with ids."""
    from tqdm.auto import tqdm

    for qid in tqdm(dataset.queries, desc="writing", unit="query", disable=not progress, leave=False):
        negative_ids = negatives.get(qid, [])
        grades = dataset.qrels.get(qid, {})
        positives = sorted(dataset.positives(qid), key=lambda d: -grades.get(d, 1))[:max_positives]
        for doc_id in positives:
            yield {
                "query_id": qid,
                "query": dataset.queries[qid],
                "positive_id": doc_id,
                "positive_document": dataset.corpus[doc_id],
                "negative_ids": negative_ids,
                "negative_documents": [dataset.corpus[d] for d in negative_ids],
            }


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


@data_app.command("prepare")
def prepare_command(
    source: Path = typer.Argument(..., help="A .jsonl, seed .json or .tsv training file (optionally .gz)."),
    out: Path = typer.Argument(..., help="The directory to write: part-NNNNN.arrow files and prepared.json."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="A progress bar on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Convert training data once into Arrow files, for data too large to read into memory.

    Every row is checked as `spladectl data validate` checks it (the first problem is reported with file:line, exit 2,
    and OUT is not written). `spladectl train --data OUT` then starts at once and reads rows as micro-batches need
    them. TSV triples: adjacent lines with the same query and positive become one example (see docs/data.md).
    Stopped (Ctrl-C, a kill), the same command continues after the last whole part of a million rows.
    """
    from tqdm import tqdm

    from spladectl.data import detect_format
    from spladectl.data.prepared import prepare

    if out.exists() and not overwrite:
        raise SpladectlError(f"{out} exists", hint="add --overwrite to replace it")
    started = time.perf_counter()
    fmt = detect_format(source)
    with tqdm(desc=f"preparing {source.name}", unit=" rows", disable=not progress, file=sys.stderr) as bar:
        manifest = prepare(source, out, fmt=fmt, progress=lambda rows: bar.update(rows - bar.n),
                           log=lambda message: bar.write(message, file=sys.stderr))
    manifest = {"out": str(out), **manifest, "seconds": round(time.perf_counter() - started, 2)}
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
    else:
        scores = ", teacher scores" if manifest["teacher_scores"] else ""
        typer.echo(f"prepared {manifest['rows']} examples ({manifest['min_negatives']}–{manifest['max_negatives']} "
                   f"negatives{scores}) from {source} into {out} in {manifest['seconds']:.1f} s")


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
    from rich.table import Table

    from spladectl.cli import output

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
    output.console().print(table)


@data_app.command("score")
def score_command(
    data: Path = typer.Option(..., "--data", "-d", help="Training file to score (.json/.jsonl/.tsv triples)."),
    out: Path = typer.Option(..., "--out", "-o", help="JSONL file to write: the examples with teacher scores."),
    teacher: list[str] = typer.Option(
        ..., "--teacher", "-t", help="NAME[=WEIGHT], repeatable: bm25, bm25:stem, bm25:nostem or a SPLADE model "
        "(splade-tiny, a run's final/). Several form an ensemble, z-normalised per example and put in the units "
        "of the first.",
    ),
    corpus: Optional[Path] = typer.Option(
        None, "--corpus", help="BEIR directory whose corpus gives BM25 its statistics (default: the file's documents)."
    ),
    max_doc_length: int = typer.Option(256, "--max-doc-length", min=1, help="Document tokens for a SPLADE teacher."),
    max_query_length: int = typer.Option(64, "--max-query-length", min=1, help="Query tokens for a SPLADE teacher."),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="SPLADE teacher: 32-true or bf16-mixed (default: bf16-mixed with native bf16)."
    ),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="Where encoded documents are cached (default: ~/.cache/spladectl/vectors)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
) -> None:
    """Attach teacher scores to every example (positive and each negative), for distillation (--distillation).

    Training on the written file adds the distillation term (MarginMSE by default, or KL) to the ranking loss.
    """
    from spladectl.data import detect_format, load_corpus, load_training_data
    from spladectl.data.examples import iter_records
    from spladectl.data.teachers import describe, parse_members, score_examples

    if out.exists() and not overwrite:
        raise SpladectlError(f"--out: {out} exists (add --overwrite to replace it)")
    members = parse_members(teacher)
    started = time.perf_counter()
    examples = load_training_data(data, show_progress=progress)
    extra_texts = list(load_corpus(corpus)[0].values()) if corpus is not None else []
    settings = _encode_settings(precision, max_query_length, max_doc_length, cache_dir, progress)
    scores = score_examples(examples, members, settings, corpus=extra_texts)
    for example, values in zip(examples, scores):
        example.teacher_scores = values
    records = list(iter_records(examples))
    if detect_format(data) == "jsonl":  # keep ids and other fields the input carried
        from spladectl.data._io import iter_jsonl

        for record, (_, original) in zip(records, iter_jsonl(data)):
            for key, value in original.items():
                record.setdefault(key, value)
    _write_jsonl(out, records)
    summary = {"out": str(out), "data": str(data), "examples": len(records), "teacher": describe(members),
               "seconds": round(time.perf_counter() - started, 2)}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        typer.echo(f"scored {len(records)} examples with {summary['teacher']}: written to {out} in "
                   f"{summary['seconds']:.1f} s")


def _write_jsonl(out: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object a line to `out` through a temporary file; returns the number of lines."""
    tmp = out.with_name(f".{out.name}.tmp")
    rows = 0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                rows += 1
        tmp.replace(out)  # a half-written file never takes the name of a finished one
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SpladectlError(f"--out: cannot write {out} ({exc.strerror or exc})") from exc
    return rows


def _encode_settings(precision, max_query_length, max_doc_length, cache_dir, progress):
    from spladectl.cli.eval import resolve_device_precision
    from spladectl.data.teachers import EncodeSettings

    device, precision = resolve_device_precision(None, None, precision)
    return EncodeSettings(max_query_length=max_query_length, max_doc_length=max_doc_length, precision=precision,
                          device=device, cache_dir=cache_dir, show_progress=progress)
