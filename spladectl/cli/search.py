"""`spladectl search`: ask a model for the best documents of a BEIR corpus, and see what the query expanded to.

The encoded corpus is cached (scipy CSR arrays in one .npz, named by a hash of the model, the corpus file and the
encoding settings) in DATA/.spladectl-cache/, or ~/.cache/spladectl/index/ when DATA is read-only, so only the first
search over a corpus pays for encoding it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import scipy.sparse as sp
import typer

_INDEX_VERSION = 1


def register(app: typer.Typer) -> None:
    app.command("search")(search_command)


def search_command(
    query: Optional[str] = typer.Argument(None, help="The query; without one, asks for queries until an empty line."),
    model: str = typer.Option(
        "splade-tiny", "--model", "-m", help="Model: splade-tiny, a local directory or a hub name."
    ),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="BEIR directory (only corpus.jsonl is needed); "
                                        "with --index, only for titles and snippets."),
    index: Optional[Path] = typer.Option(None, "--index", help="Search this index (spladectl index) instead of "
                                         "encoding the corpus; it must have been built from MODEL."),
    k: int = typer.Option(10, "--k", min=1, help="Documents to show."),
    terms: int = typer.Option(20, "--terms", min=0, help="Expanded query terms to show."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (one object per query)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1, help="Texts per encoding batch."),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="32-true or bf16-mixed (default: from the hardware)."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or mps (default: the best available)."),
    top_k_terms: Optional[int] = typer.Option(
        None, "--top-k-terms", min=1, help="Keep at most this many terms per document."
    ),
    threshold: float = typer.Option(0.0, "--threshold", min=0.0, help="Drop document weights at or below this."),
    max_query_length: Optional[int] = typer.Option(None, "--max-query-length", min=1, help="Query tokens."),
    max_doc_length: Optional[int] = typer.Option(None, "--max-doc-length", min=1, help="Document tokens."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse (and write) the encoded corpus on disk."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
) -> None:
    """Top documents of a BEIR corpus for QUERY, with scores, titles and the query's expanded terms."""
    from spladectl.cli.eval import load_encoder, resolve_device_precision
    from spladectl.data import load_corpus

    from spladectl.errors import SpladectlError

    if data is None and index is None:
        raise SpladectlError("give --data (a BEIR directory to search) or --index (a built index)")
    device, precision = resolve_device_precision(None, device, precision)
    corpus, titles = load_corpus(data) if data is not None else ({}, {})
    encoder = load_encoder(model, device)
    max_query_length, max_doc_length = encoder.lengths(max_query_length, max_doc_length)
    if index is not None:
        from spladectl.index import open_index

        opened = open_index(index)
        opened.check_model(model)

        def find(vector, k: int) -> list[tuple[str, float]]:
            return opened.search(vector, k)[0]
    else:
        settings = dict(max_length=max_doc_length, batch_size=batch_size, precision=precision, device=device,
                        top_k=top_k_terms, threshold=threshold)
        doc_ids, docs, where = corpus_index(encoder, model, data, corpus, settings, cache=cache,
                                            show_progress=progress)
        if not as_json and where:
            typer.echo(f"(corpus index: {where})", err=True)

        def find(vector, k: int) -> list[tuple[str, float]]:
            from spladectl.evaluate import retrieve

            indices, scores = retrieve(vector, docs, k)
            return [(doc_ids[i], float(score)) for i, score in zip(indices[0], scores[0]) if score > 0]

    def answer(text: str) -> None:
        result = search_once(encoder, text, find, corpus, titles, k=k, n_terms=terms, max_length=max_query_length,
                             precision=precision, device=device)
        typer.echo(json.dumps(result, ensure_ascii=False) if as_json else _format(result))

    if query is not None:
        answer(query)
        return
    while True:  # interactive: an empty line or end of input ends it
        try:
            text = typer.prompt("query", default="", show_default=False, err=True)
        except (EOFError, KeyboardInterrupt, typer.Abort):
            break
        if not text.strip():
            break
        answer(text)


def search_once(encoder, text: str, find, corpus: dict[str, str], titles: dict[str, str], *, k: int, n_terms: int,
                max_length: int, precision: str, device: str) -> dict[str, Any]:
    """The top k of one query: `find(query vector, k)` gives (doc id, score) pairs, best first."""
    from spladectl.encoding import encode_sparse, top_terms

    vector = encode_sparse(encoder, [text], max_length=max_length, batch_size=1, precision=precision, device=device)
    results = []
    for rank, (doc_id, score) in enumerate(find(vector, k), start=1):
        title = titles.get(doc_id, "")
        text_of = corpus.get(doc_id, "")
        body = text_of[len(title):].strip() if title and text_of.startswith(title) else text_of
        results.append({"rank": rank, "doc_id": doc_id, "score": round(float(score), 4), "title": title,
                        "snippet": _snippet(body)})
    expanded = [{"term": t, "weight": round(w, 4)} for t, w in top_terms(vector, encoder.tokenizer, n_terms)]
    return {"query": text, "terms": expanded, "results": results}


def corpus_index(encoder, model: str, data: Path, corpus: dict[str, str], settings: dict[str, Any], *,
                 cache: bool = True, show_progress: bool = True) -> tuple[list[str], sp.csr_matrix, str | None]:
    """(doc ids, CSR document matrix, cache file or None), from the cache when model, corpus and settings match."""
    from spladectl.data.cache import atomic_write, cache_dirs, file_signature, place_tag
    from spladectl.encoding import encode_sparse

    key = hashlib.sha256(json.dumps(
        {"v": _INDEX_VERSION, "model": _model_identity(model), "root": str(Path(data).resolve()),
         "corpus": file_signature(Path(data) / "corpus.jsonl"),
         # batch size and device do not change the vectors (beyond float noise): a cache made on GPU serves a CPU
         "settings": {key: settings[key] for key in ("max_length", "precision", "top_k", "threshold")}},
        sort_keys=True, default=str,
    ).encode()).hexdigest()
    prefix = f"index-{place_tag(data)}-{hashlib.sha256(model.encode()).hexdigest()[:8]}-"
    name = f"{prefix}{key[:16]}.npz"
    if cache:
        for directory in cache_dirs(data, "index"):
            loaded = _read_index(directory / name, key)
            if loaded is not None:
                return (*loaded, str(directory / name))
    doc_ids = list(corpus)
    docs = encode_sparse(encoder, [corpus[d] for d in doc_ids], show_progress=show_progress,
                         desc="encoding documents", **settings)
    if cache:
        def write(handle) -> None:
            np.savez(handle, key=np.array(key), doc_ids=np.array(doc_ids), data=docs.data, indices=docs.indices,
                     indptr=docs.indptr, shape=np.array(docs.shape))

        for directory in cache_dirs(data, "index"):
            if atomic_write(directory, name, write, stale_prefix=prefix):
                return doc_ids, docs, str(directory / name)
    return doc_ids, docs, None


def _read_index(path: Path, key: str) -> tuple[list[str], sp.csr_matrix] | None:
    """A cached index, or None when absent, damaged or for other inputs (then the corpus is encoded again)."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            if str(saved["key"]) != key:
                return None
            docs = sp.csr_matrix((saved["data"], saved["indices"], saved["indptr"]), shape=tuple(saved["shape"]))
            return [str(d) for d in saved["doc_ids"]], docs
    except (OSError, ValueError, KeyError, EOFError):
        return None


def _model_identity(model: str) -> Any:
    """What the cached vectors depend on: a local model's files (size, mtime), or a name with our version."""
    from spladectl import __version__
    from spladectl.data.cache import file_signature

    path = Path(model)
    if path.is_dir():
        return [str(path.resolve()), [file_signature(f) for f in sorted(path.iterdir()) if f.is_file()]]
    return [model, __version__]


def _snippet(text: str, width: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1].rsplit(" ", 1)[0] + " …"


def _format(result: dict[str, Any]) -> str:
    lines = [f"query: {result['query']}"]
    if result["terms"]:
        lines.append("expanded terms: " + ", ".join(f"{t['term']} {t['weight']:.2f}" for t in result["terms"]))
    if not result["results"]:
        lines.append("no document shares a term with this query")
    for r in result["results"]:
        lines.append(f"{r['rank']:>3}. {r['score']:8.3f}  [{r['doc_id']}] {r['title']}".rstrip())
        if r["snippet"]:
            lines.append(f"      {r['snippet']}")
    return "\n".join(lines)
