"""`spladectl eval`: retrieval quality of a model on a BEIR split, optionally beside BM25."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from spladectl.config import TrainConfig
from spladectl.errors import SpladectlError


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)


def eval_command(
    model: str = typer.Option(
        "splade-tiny", "--model", "-m", help="Model: splade-tiny, a local directory or a hub name."
    ),
    data: Path = typer.Option(..., "--data", "-d", help="BEIR directory (corpus.jsonl, queries.jsonl, qrels/)."),
    split: str = typer.Option("test", "--split", help="Qrels split to evaluate (qrels/SPLIT.tsv)."),
    baseline: Optional[str] = typer.Option(
        None, "--baseline", help="Add baseline rows, comma-separated: bm25 (stemmed per --bm25-stem), bm25:stem, "
        "bm25:nostem; e.g. --baseline bm25:nostem,bm25:stem for both BM25 rows users compare with.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of rows instead of a table."),
    run_file: Optional[Path] = typer.Option(
        None, "--run-file", help="Write the model's TREC run here (BM25's to FILE.bm25)."
    ),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1, help="Texts per encoding batch."),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="32-true or bf16-mixed (default: bf16-mixed where the hardware has native bf16)."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or mps (default: the best available)."),
    profile: Optional[str] = typer.Option(
        None, "--profile", help="Hardware profile to take device and precision from (default: detected)."
    ),
    top_k_terms: Optional[int] = typer.Option(
        None, "--top-k-terms", min=1, help="Keep at most this many terms per document."
    ),
    threshold: float = typer.Option(0.0, "--threshold", min=0.0, help="Drop document weights at or below this."),
    max_query_length: Optional[int] = typer.Option(
        None, "--max-query-length", min=1, help=f"Query tokens (default: the model's, else {TrainConfig.max_query_length})."
    ),
    max_doc_length: Optional[int] = typer.Option(
        None, "--max-doc-length", min=1, help=f"Document tokens (default: the model's, else {TrainConfig.max_doc_length})."
    ),
    k: int = typer.Option(1000, "--k", min=1, help="Documents retrieved per query."),
    index: Optional[Path] = typer.Option(
        None, "--index", help="Search this index (spladectl index) instead of encoding the corpus; it must have been "
        "built from MODEL. Adds per-query latency (p50/p99) to --json.",
    ),
    bm25_stem: Optional[bool] = typer.Option(
        None, "--bm25-stem/--no-bm25-stem", help="Stem for the BM25 baseline (default: when PyStemmer is installed)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
) -> None:
    """Evaluate MODEL on a BEIR split: nDCG@10, MRR@10, R@100, active dimensions and FLOPS."""
    from spladectl.data.beir import load_beir
    from spladectl.evaluate import bm25_run, compute_metrics, encoder_run, write_trec_run

    baselines = _parse_baselines(baseline, bm25_stem)
    if run_file is not None and run_file.is_dir():  # say so now, not after minutes of encoding
        raise SpladectlError(f"--run-file: {run_file} is a directory")
    device, precision = resolve_device_precision(profile, device, precision)
    opened = None
    if index is not None:
        from spladectl.index import open_index

        opened = open_index(index)
        opened.check_model(model)
    # With an index and no BM25 row the corpus text is not needed: its ids come from the index.
    indexed = (set(opened.doc_ids), opened.path / "doc_ids.txt") if opened is not None and not baselines else None
    dataset = load_beir(data, split, indexed=indexed)
    encoder = load_encoder(model, device)
    max_query_length, max_doc_length = encoder.lengths(max_query_length, max_doc_length)

    rows: list[dict[str, Any]] = []
    if opened is not None:
        from spladectl.index import index_run

        max_doc_length = opened.meta["max_length"]
        query_ids = list(dataset.queries)
        result = index_run(encoder, opened, query_ids, [dataset.queries[q] for q in query_ids],
                           max_length=max_query_length, precision=precision, device=device, batch_size=batch_size,
                           k=k, show_progress=progress)
    else:
        result = encoder_run(encoder, dataset, precision=precision, device=device, batch_size=batch_size,
                             max_query_length=max_query_length, max_doc_length=max_doc_length, top_k=top_k_terms,
                             threshold=threshold, k=k, show_progress=progress)
    stats = result.stats
    seconds = stats["encode_docs_seconds"] + stats["encode_queries_seconds"] + stats["retrieve_seconds"]
    rows.append({"name": model, **compute_metrics(dataset.qrels, result.run), **result.stats,
                 "max_query_length": max_query_length, "max_doc_length": max_doc_length,
                 "seconds": round(seconds, 2)})
    baseline_runs = {}
    for name, stem in baselines.items():
        bm25 = bm25_run(dataset, k, stem=stem, show_progress=progress)
        rows.append({"name": name, **compute_metrics(dataset.qrels, bm25.run), **bm25.stats,
                     "seconds": bm25.stats["index_and_search_seconds"]})
        baseline_runs[name] = bm25.run
    if run_file is not None:
        try:
            run_file.parent.mkdir(parents=True, exist_ok=True)
            write_trec_run(run_file, result.run, model)
            for name, run in baseline_runs.items():  # FILE.bm25, FILE.bm25:stem ...
                write_trec_run(Path(f"{run_file}.{name}"), run, name)
        except OSError as exc:
            raise SpladectlError(f"--run-file: cannot write {run_file} ({exc.strerror or exc})") from exc

    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        _print_table(rows, f"{data} · {split} · {len(dataset.queries)} queries · {len(dataset.corpus)} documents")


def _parse_baselines(text: str | None, bm25_stem: bool | None) -> dict[str, bool | None]:
    """Row name -> BM25 stemming, in the order given; plain `bm25` follows --bm25-stem."""
    from spladectl.data.bm25 import VARIANTS as BASELINES

    out: dict[str, bool | None] = {}
    for name in filter(None, (part.strip().lower() for part in (text or "").split(","))):
        if name not in BASELINES:
            raise SpladectlError(f"--baseline: unknown baseline {name!r}; expected {', '.join(BASELINES)}")
        out[name] = bm25_stem if name == "bm25" else BASELINES[name]
    return out


def _print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich import box
    from rich.table import Table

    from spladectl.cli import output

    model = rows[0]
    caption = (f"{model['name']}: {model['precision']}, max lengths {model['max_query_length']}/"
               f"{model['max_doc_length']} tokens; dims = active terms per query/document, FLOPS = expected "
               "multiplications per query-document pair")
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD)
    table.add_column("name", overflow="fold")
    for column in ("nDCG@10", "MRR@10", "R@100", "q dims", "d dims", "FLOPS", "time s"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        sparse = "avg_flops" in row
        table.add_row(
            row["name"],
            f"{row['nDCG@10']:.4f}", f"{row['MRR@10']:.4f}", f"{row['R@100']:.4f}",
            f"{row['avg_query_dims']:.1f}" if sparse else "-",
            f"{row['avg_doc_dims']:.1f}" if sparse else "-",
            f"{row['avg_flops']:.2f}" if sparse else "-",
            f"{row['seconds']:.1f}",
        )
    output.console().print(table)


# ---- shared with `spladectl search` -------------------------------------------------------------------------------


def resolve_device_precision(profile: str | None, device: str | None, precision: str | None) -> tuple[str, str]:
    """Device and precision for inference: the flags when given, else what the hardware profile resolves to.

    Precision follows the profile's fallbacks: bf16-mixed on a CPU with native bf16 (AVX512-BF16/AMX) or a GPU of
    compute capability 8.0+, 32-true otherwise. fp16 autocast is never used here: it brings nothing to inference on
    CPU, and SPLADE's log-saturated weights overflow it more easily than bf16's.
    """
    from spladectl.precision import canonical_precision

    if precision is not None:
        precision = canonical_precision(precision, where="--precision")
    flags = {key: value for key, value in (("device", device), ("precision", precision)) if value is not None}
    from spladectl.resolve import resolve_for_machine

    resolved = resolve_for_machine(profile, flags=flags)
    device, precision = resolved.device, resolved.precision
    if precision == "16-mixed":
        precision = "bf16-mixed" if _native_bf16(device) else "32-true"
    return device, precision


def _native_bf16(device: str) -> bool:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device == "cpu":
        from spladectl.hardware import detect

        return detect().bf16_pays_off
    return False


def load_encoder(model: str, device: str):
    """SpladeEncoder.from_pretrained with a one-line error for a model that is not there."""
    from spladectl.model import SpladeEncoder

    try:
        return SpladeEncoder.from_pretrained(model, device=device)
    except SpladectlError:
        raise
    except (OSError, ValueError) as exc:  # transformers: missing path, unknown hub name offline, bad config
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpladectlError(f"--model: cannot load {model!r} ({detail})") from exc
