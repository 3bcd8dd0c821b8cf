"""A trained model in the form a serving stack loads: sentence-transformers, plain Hugging Face, or ONNX.

Every format is written into a staging directory beside OUT and renamed into place at the end, so OUT is either the
whole export or absent: an interrupted export never leaves a directory that looks usable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spladectl.data.cache import staged_directory
from spladectl.errors import SpladectlError
from spladectl.model import SPLADE_CONFIG_NAME, SpladeEncoder

FORMATS = ("sentence-transformers", "hf", "onnx")
_EXTRA_HINT = "pip install 'spladectl[export]'"


def export_model(model: str, out: str | os.PathLike, fmt: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Write `model` (a name or a directory) to directory `out` in format `fmt`; what was written, as a dict."""
    if fmt not in FORMATS:
        raise SpladectlError(f"--format {fmt!r}: not one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise SpladectlError(f"{out} already exists", hint="give another directory, or --overwrite to replace it")
    writer = WRITERS[fmt]
    if fmt != "hf":
        _require(fmt)
    encoder = SpladeEncoder.from_pretrained(model, memory_efficient_head=False)
    encoder.eval()
    lengths = encoder.lengths()
    run = training_run(encoder.source)
    with staged_directory(out) as staging:
        with _quiet():
            writer(encoder, staging, lengths)
        (staging / "README.md").write_text(model_card(model, fmt, lengths, run))
    return {"model": model, "format": fmt, "out": str(out), "files": sorted(p.name for p in out.iterdir()),
            "max_query_length": lengths[0], "max_doc_length": lengths[1], "run": run.get("id") if run else None}


def _require(fmt: str) -> None:
    import importlib.util

    needed = {"sentence-transformers": ["sentence_transformers"], "onnx": ["onnx", "onnxscript"]}[fmt]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise SpladectlError(f"--format {fmt} needs {', '.join(missing)}, which is not installed", hint=_EXTRA_HINT)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the libraries' per-file progress bars and the ONNX exporter's chatter; errors still raise."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    noisy = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "sentence_transformers")]
    levels = [logger.level for logger in noisy]
    for logger in noisy:
        logger.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation notes are about its internals, not the user's
            yield
    finally:
        for logger, level in zip(noisy, levels):
            logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


# ---- the formats --------------------------------------------------------------------------------------------------

def _write_hf(encoder: SpladeEncoder, out: Path, lengths: tuple[int, int]) -> None:
    encoder.max_query_length, encoder.max_doc_length = lengths
    encoder.save_pretrained(out)


def _write_sentence_transformers(encoder: SpladeEncoder, out: Path, lengths: tuple[int, int]) -> None:
    """An MLM transformer and SPLADE max pooling (log(1 + ReLU)), saved the way `SparseEncoder(out)` loads it, with
    queries truncated at the query length and documents at the document length where sentence-transformers can
    tell them apart (6.x); 5.x has one length for both, the document length."""
    import inspect

    from sentence_transformers import SparseEncoder

    try:  # sentence-transformers 6
        from sentence_transformers.sparse_encoder.modules import SpladePooling, Transformer
    except ImportError:  # 5.x
        from sentence_transformers.sparse_encoder.models import MLMTransformer as Transformer
        from sentence_transformers.sparse_encoder.models import SpladePooling

    query_length, doc_length = lengths
    hf_dir = out / "_hf"
    _write_hf(encoder, hf_dir, lengths)
    if "query_length" in inspect.signature(Transformer.__init__).parameters:
        transformer = Transformer(str(hf_dir), transformer_task="fill-mask", query_length=query_length,
                                  document_length=doc_length, max_seq_length=doc_length)
    else:
        transformer = Transformer(str(hf_dir), max_seq_length=doc_length)
    pooling = SpladePooling(pooling_strategy="max", activation_function="relu")
    SparseEncoder(modules=[transformer, pooling], device="cpu").save(str(out), create_model_card=False)
    shutil.move(str(hf_dir / SPLADE_CONFIG_NAME), str(out / SPLADE_CONFIG_NAME))
    shutil.rmtree(hf_dir)


class _Graph(nn.Module):
    """The encoder as one traceable function: masked max pooling of log(1 + ReLU(logits)), without data-dependent
    branches, so the exported graph serves any batch size and length."""

    def __init__(self, encoder: SpladeEncoder):
        super().__init__()
        self.model = encoder.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        weights = torch.log1p(torch.relu(logits)) * attention_mask.unsqueeze(-1).to(logits.dtype)
        return weights.max(dim=1).values


def _write_onnx(encoder: SpladeEncoder, out: Path, lengths: tuple[int, int]) -> None:
    """model.onnx (inputs input_ids, attention_mask; output `sparse` of batch × vocabulary), the tokenizer, and the
    SPLADE settings; checked against the torch encoder before it is written."""
    out.mkdir(parents=True)
    graph = _Graph(encoder).eval()
    sample = encoder.tokenize(["a query about proteins", "a longer document about what proteins fold into"], 16)
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    shapes = {"input_ids": {0: batch, 1: tokens}, "attention_mask": {0: batch, 1: tokens}}
    with torch.no_grad():
        program = torch.onnx.export(graph, (sample["input_ids"], sample["attention_mask"]), dynamo=True,
                                    input_names=["input_ids", "attention_mask"], output_names=["sparse"],
                                    dynamic_shapes=shapes, external_data=False, verbose=False)
    program.save(str(out / "model.onnx"))
    encoder.tokenizer.save_pretrained(out)
    meta = {**encoder.splade_metadata, "max_query_length": lengths[0], "max_doc_length": lengths[1],
            "onnx": {"file": "model.onnx", "inputs": ["input_ids", "attention_mask"], "output": "sparse",
                     "pooling": "max", "activation": "log1p_relu"}}
    (out / SPLADE_CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _check_onnx(out / "model.onnx", encoder)


def _check_onnx(path: Path, encoder: SpladeEncoder) -> None:
    """The exported graph gives the torch encoder's vectors on texts of another batch size and length."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return  # onnxruntime is for serving; without it the graph is written unchecked, as the exporter made it
    import numpy as np
    import onnxruntime

    texts = ["short", "a third text, longer than the ones the graph was traced with, to check dynamic shapes", "x y"]
    batch = encoder.tokenize(texts, 64)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["sparse"], {k: v.numpy() for k, v in batch.items()})[0]
    with torch.no_grad():
        want = encoder(**batch).numpy()
    worst = float(np.abs(got - want).max())
    if worst > 1e-3:
        raise SpladectlError(f"the ONNX export differs from the torch model by {worst:.2g} (> 1e-3)",
                             hint="report this with the model; the torch formats (hf, sentence-transformers) work")


# ---- the model card -----------------------------------------------------------------------------------------------

def training_run(model_dir: str | None) -> dict[str, Any] | None:
    """The run a model directory came from (RUN/final, RUN/best or RUN/checkpoints/step-N): its run.json and
    config.toml, or None for a model not trained by spladectl."""
    if not model_dir:
        return None
    here = Path(model_dir).resolve()
    for candidate in (here.parent, here.parent.parent):
        if (candidate / "run.json").is_file() and (candidate / "config.toml").is_file():
            import tomllib

            try:
                record = json.loads((candidate / "run.json").read_text())
                config = tomllib.loads((candidate / "config.toml").read_text())
            except (OSError, ValueError):
                return None  # a card without the training table is better than no export
            return {"id": record.get("id"), "dir": str(candidate), "record": record, "config": config}
    return None


_CARD_SETTINGS = ("data", "epochs", "max_steps", "batch_size", "grad_accum", "precision", "lr", "n_negatives",
                  "lambda_q", "lambda_d", "max_query_length", "max_doc_length", "seed")


def model_card(model: str, fmt: str, lengths: tuple[int, int], run: dict[str, Any] | None) -> str:
    """README.md: what the model is, how to load it in its format, how it was trained and how well it retrieves."""
    tags = ["sparse-encoder", "splade", "spladectl"] + (["sentence-transformers"] if fmt == "sentence-transformers" else [])
    lines = ["---", "library_name: " + {"sentence-transformers": "sentence-transformers", "hf": "transformers",
                                        "onnx": "onnx"}[fmt],
             "pipeline_tag: feature-extraction", "tags:", *[f"- {tag}" for tag in tags], "---", "",
             f"# SPLADE model exported by spladectl ({fmt})", "",
             f"Exported from `{model}`. Queries are truncated at {lengths[0]} tokens and documents at {lengths[1]}, "
             "the lengths it was trained with. Vectors are max-pooled log(1 + ReLU(MLM logits)) over the vocabulary.",
             "", "## Usage", "", _USAGE[fmt].strip(), ""]
    if run is not None:
        config, record = run["config"], run["record"]
        lines += ["## Training", "", f"spladectl run `{run['id']}`" + (f": `{record['command']}`" if record.get("command")
                                                                        else ""), "",
                  "| setting | value |", "|---|---|"]
        lines += [f"| {key} | {config[key]} |" for key in _CARD_SETTINGS if config.get(key) is not None]
        lines += _metric_rows(record)
    return "\n".join(lines) + "\n"


def _metric_rows(record: dict[str, Any]) -> list[str]:
    tables = dict((record.get("heldout") or {}).items())
    if record.get("final_metrics"):
        tables.setdefault("final", record["final_metrics"])
    if not tables:
        return []
    names = sorted({name for metrics in tables.values() for name in metrics})
    rows = ["", "## Evaluation", "", "| metric | " + " | ".join(tables) + " |", "|---|" + "---|" * len(tables)]
    for name in names:
        cells = [f"{tables[t][name]:.4f}" if isinstance(tables[t].get(name), (int, float)) else "" for t in tables]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


_USAGE = {
    "sentence-transformers": """
```python
from sentence_transformers import SparseEncoder

model = SparseEncoder("PATH")
queries = model.encode_query(["what do proteins fold into?"])
documents = model.encode_document(["Proteins fold into three-dimensional structures."])
print(model.similarity(queries, documents))
```
""",
    "hf": """
```python
from spladectl.model import SpladeEncoder

encoder = SpladeEncoder.from_pretrained("PATH")
vectors = encoder.encode(["what do proteins fold into?"], max_length=encoder.max_query_length)
```

Any transformers masked-LM loader reads the weights; `splade_config.json` holds the SPLADE settings.
""",
    "onnx": """
```python
import onnxruntime
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("PATH")
session = onnxruntime.InferenceSession("PATH/model.onnx")
batch = tokenizer(["what do proteins fold into?"], return_tensors="np", truncation=True, max_length=64)
vectors = session.run(["sparse"], {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})[0]
```
""",
}


WRITERS = {"sentence-transformers": _write_sentence_transformers, "hf": _write_hf, "onnx": _write_onnx}
