"""`spladectl encode`: a corpus or query file as sparse vectors for a search engine (docs/serving.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from spladectl.cli import output


def register(app: typer.Typer) -> None:
    app.command("encode")(encode_command)


def encode_command(
    data: Annotated[Path, typer.Option("--data", "-d", help="A BEIR directory, or a JSONL (_id/id, title, text) or "
                                                            "TSV (id<TAB>text) file; .gz works too.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The directory of shards and manifest.json. Running the "
                                                          "same command again continues an interrupted encode.")],
    model: Annotated[str, typer.Option("--model", "-m", help="splade-tiny, a run's final/ directory, or any SPLADE "
                                                             "model directory.")] = "splade-tiny",
    fmt: Annotated[str, typer.Option("--format", "-f", help="jsonl | anserini (JsonVectorCollection, integer "
                                                            "impacts) | parquet | opensearch | elasticsearch (bulk "
                                                            "NDJSON + mapping + query template) | qdrant.")] = "jsonl",
    queries: Annotated[bool, typer.Option("--queries", help="Encode queries (BEIR queries.jsonl or the file given) "
                                                            "at the query length, as search requests.")] = False,
    quantize: Annotated[Optional[int], typer.Option("--quantize", min=1, help="Integer weights: round(weight x N). "
                                                    "anserini always quantises, by 100 unless given.")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", min=1, help="Tokens per text (default: the "
                                                      "model's trained query or document length).")] = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Encoding processes (on CUDA, one per GPU); the files "
                                                              "are the same for any number.")] = 1,
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Texts per shard file.")] = 10_000,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Texts per forward pass.")] = 32,
    precision: Annotated[Optional[str], typer.Option("--precision", help="32-true or bf16-mixed (default: "
                                                     "bf16-mixed where the hardware has it).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or mps (default: the best "
                                                                   "available).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT when it holds something else.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="A progress bar on stderr.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Encode a corpus (or its queries) into sparse vectors for a search engine.

    Streams in shards: memory stays flat whatever the corpus size, and running the same command again continues an
    interrupted encode where it stopped."""
    from spladectl.cli.eval import resolve_device_precision
    from spladectl.vector_files import EncodeJob, encode_to

    device, precision = resolve_device_precision(None, device, precision)
    kind = "queries" if queries else "documents"
    if max_length is None:
        from spladectl.model import SpladeEncoder

        query_length, doc_length = SpladeEncoder.trained_lengths(model)
        max_length = query_length if queries else doc_length
    job = EncodeJob(model=model, source=str(data), kind=kind, fmt=fmt, max_length=max_length, precision=precision,
                    device=device, scale=quantize, shard_size=shard_size, batch_size=batch_size)
    log = (lambda message: None) if as_json else (lambda message: typer.echo(message, err=True))
    summary = encode_to(job, out, nproc=nproc, overwrite=overwrite, progress=progress and not as_json, log=log)
    if as_json:
        output.print_json(summary)
        return
    rate = f", {output.number(summary['per_second'])} {kind}/s" if summary["per_second"] else ""
    typer.echo(f"{summary['count']} {kind} in {summary['shards']} shard(s) of {fmt} in {summary['out']}"
               f" ({summary['avg_terms']} terms each on average{rate})")
    if summary["companions"]:
        typer.echo("with " + ", ".join(summary["companions"]))
