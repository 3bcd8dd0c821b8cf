"""`spladectl index`: a Seismic (approximate) or exact index over encoded documents (docs/serving.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spladectl.cli import output


def register(app: typer.Typer) -> None:
    app.command("index")(index_command)


def index_command(
    vectors: Annotated[Path, typer.Argument(help="An encode directory of documents (spladectl encode, format jsonl, "
                                                 "parquet, anserini or qdrant).")],
    out: Annotated[Path, typer.Argument(help="The index directory to write.")],
    kind: Annotated[str, typer.Option("--kind", help="seismic: approximate, fast on millions of documents; exact: "
                                                     "every vector scored, for small corpora.")] = "seismic",
    n_postings: Annotated[int, typer.Option("--n-postings", min=1, help="Seismic: postings kept per term.")] = 3500,
    centroid_fraction: Annotated[float, typer.Option("--centroid-fraction", min=0.0, max=1.0,
                                                     help="Seismic: blocks per posting list, as a fraction of its "
                                                          "length.")] = 0.1,
    summary_energy: Annotated[float, typer.Option("--summary-energy", min=0.0, max=1.0,
                                                  help="Seismic: mass of each block's summary kept.")] = 0.4,
    query_cut: Annotated[int, typer.Option("--query-cut", min=0, help="Seismic search default: query terms used, "
                                                                      "heaviest first (0: all).")] = 0,
    heap_factor: Annotated[float, typer.Option("--heap-factor", min=0.0, max=1.0,
                                               help="Seismic search default: lower scans more blocks (slower, "
                                                    "closer to exact).")] = 0.9,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="A progress bar on stderr.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was built as JSON.")] = False,
) -> None:
    """Build a Seismic (or exact) index of encoded documents.

    `spladectl search --index OUT` and `spladectl eval --index OUT` search it."""
    from spladectl.index import SeismicSettings, build_index

    settings = SeismicSettings(n_postings=n_postings, centroid_fraction=centroid_fraction,
                               summary_energy=summary_energy, query_cut=query_cut, heap_factor=heap_factor)
    result = build_index(vectors, out, kind=kind, settings=settings, overwrite=overwrite,
                         progress=progress and not as_json)
    if as_json:
        output.print_json(result)
        return
    typer.echo(f"{result['kind']} index of {result['count']} documents ({result['terms']} terms) in {result['out']}: "
               f"{result['bytes'] / 2**20:.1f} MiB, built in {output.duration(result['seconds'])}")
