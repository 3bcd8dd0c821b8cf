"""`spladectl export`: a trained model in the format a serving stack loads (docs/serving.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spladectl.cli import output


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)


def export_command(
    model: Annotated[str, typer.Argument(help="splade-tiny, a run's final/ or best/ directory, or any SPLADE model "
                                              "directory.")],
    out: Annotated[Path, typer.Argument(help="The directory to write; it must not exist (see --overwrite).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="sentence-transformers: loads with SparseEncoder(OUT); "
                                                            "hf: transformers weights + splade_config.json; onnx: "
                                                            "model.onnx for onnxruntime.")] = "sentence-transformers",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists (only once the new "
                                                                "export is complete).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
) -> None:
    """Write MODEL as a sentence-transformers, Hugging Face or ONNX model.

    OUT carries the query and document lengths the model was trained with and a model card (README.md) naming its
    training run and evaluation numbers; it is written whole or not at all."""
    from spladectl.export import export_model

    result = export_model(model, out, fmt, overwrite=overwrite)
    if as_json:
        output.print_json(result)
        return
    console = output.console()
    console.print(f"exported {model} as {fmt} to {result['out']}", markup=False)
    console.print(f"  lengths: queries {result['max_query_length']}, documents {result['max_doc_length']} tokens"
                  + (f"; training run {result['run']}" if result["run"] else ""), markup=False)
    console.print("  files: " + ", ".join(result["files"]), markup=False)
