"""`spladectl index`: a search index over the vectors `spladectl encode` wrote.

Two kinds, one interface (`SparseIndex.search(queries, k)`):
- `seismic` (default): Seismic (pyseismic-lsr), an approximate inverted index made for learned sparse vectors, with
  millisecond queries on millions of documents;
- `exact`: every document vector in one scipy CSR matrix, scored exhaustively; for small corpora, and the reference
  the approximate index is measured against.

INDEX/index.json records the model, its files and the quantisation the vectors were made with, so that queries
encoded by another model are refused rather than silently scored against the wrong vocabulary weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from spladectl.data.cache import staged_directory
from spladectl.errors import SpladectlError
from spladectl.vector_files import model_signature, read_manifest, shard_files
from spladectl.vector_formats import read_shard

KINDS = ("seismic", "exact")
INDEX_FILE = "index.json"
READABLE = ("jsonl", "anserini", "parquet", "qdrant")  # formats that carry documents' vectors back losslessly


@dataclass(frozen=True)
class SeismicSettings:
    """Build and search knobs of Seismic (its paper's names); the defaults are the library's, except heap_factor."""

    n_postings: int = 3500  # postings kept per term (the most important documents of each term)
    centroid_fraction: float = 0.1  # blocks per posting list, as a fraction of its length
    summary_energy: float = 0.4  # mass of a block's summary vector kept
    query_cut: int = 0  # query terms used, heaviest first (0: all of them)
    heap_factor: float = 0.9  # a block is scanned when its summary score exceeds this × the current k-th score


def build_index(vectors: str | os.PathLike, out: str | os.PathLike, *, kind: str = "seismic",
                settings: SeismicSettings = SeismicSettings(), overwrite: bool = False,
                progress: bool = True) -> dict[str, Any]:
    """Index the documents of an encode directory into `out` (written whole or not at all); what was built."""
    if kind not in KINDS:
        raise SpladectlError(f"--kind {kind!r}: not one of {', '.join(KINDS)}")
    manifest = read_manifest(vectors)
    job = manifest["job"]
    if job["kind"] != "documents":
        raise SpladectlError(f"{vectors} holds encoded queries; an index is built from documents")
    if job["format"] not in READABLE:
        raise SpladectlError(f"{vectors}: format {job['format']} is for an engine to ingest; index a jsonl, parquet, "
                             "anserini or qdrant encode", hint="spladectl encode ... --format parquet")
    out = Path(out)
    if out.exists() and not overwrite:
        raise SpladectlError(f"{out} already exists", hint="give another directory, or --overwrite to replace it")
    if kind == "seismic":
        _require_seismic()
    started = time.perf_counter()
    ids, matrix = _read_vectors(vectors, manifest, progress=progress)
    with staged_directory(out) as staging:
        staging.mkdir()
        (staging / "doc_ids.txt").write_text("".join(i + "\n" for i in ids), encoding="utf-8")
        present = np.bincount(matrix.indices, minlength=matrix.shape[1]).astype(np.float32) / max(len(ids), 1)
        np.save(staging / "term_document_fraction.npy", present)  # for FLOPS, without the documents
        if kind == "exact":
            sp.save_npz(staging / "vectors.npz", matrix)
        else:
            _build_seismic(ids, matrix, settings, staging / "vectors")
        meta = {"kind": kind, "model": job["model"], "model_files": job["model_files"], "scale": job["scale"],
                "max_length": job["max_length"], "precision": job["precision"], "count": len(ids),
                "terms": int(matrix.nnz), "vocab_size": int(matrix.shape[1]), "source": str(Path(vectors).resolve()),
                "settings": settings.__dict__ if kind == "seismic" else {}}
        (staging / INDEX_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir())
    return {**meta, "out": str(out), "seconds": round(time.perf_counter() - started, 2), "bytes": size}


def _require_seismic() -> None:
    import importlib.util

    if importlib.util.find_spec("seismic") is None:
        raise SpladectlError("--kind seismic needs pyseismic-lsr, which is not installed",
                             hint="pip install 'spladectl[serving]', or --kind exact for a small corpus")


def _read_vectors(vectors, manifest, *, progress: bool) -> tuple[list[str], sp.csr_matrix]:
    """Every document's id and vector, as one CSR matrix (term ids as columns)."""
    from tqdm.auto import tqdm

    job = manifest["job"]
    token_ids = None
    if job["format"] in ("jsonl", "anserini"):  # these name terms by token
        from transformers import AutoTokenizer

        from spladectl.model import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(job["model"]))
        token_ids = {token: i for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))}
    ids: list[str] = []
    indptr, indices, data = [0], [], []
    for path in tqdm(shard_files(vectors, manifest), desc="reading shards", unit="shard", disable=not progress):
        for text_id, terms, weights in read_shard(job["format"], path, token_ids=token_ids):
            order = np.argsort(terms, kind="stable")
            ids.append(text_id)
            indices.append(terms[order])
            data.append(weights[order].astype(np.float32))
            indptr.append(indptr[-1] + len(terms))
    vocab = int(max((int(t.max()) for t in indices if len(t)), default=0)) + 1
    vocab = max(vocab, len(token_ids) if token_ids else 0, _vocab_size(job["model"]))
    matrix = sp.csr_matrix((np.concatenate(data) if data else np.zeros(0, np.float32),
                            np.concatenate(indices) if indices else np.zeros(0, np.int64), np.asarray(indptr)),
                           shape=(len(ids), vocab), dtype=np.float32)
    return ids, matrix


def _vocab_size(model: str) -> int:
    from transformers import AutoConfig

    from spladectl.model import resolve_model_path

    try:
        return int(AutoConfig.from_pretrained(resolve_model_path(model)).vocab_size)
    except Exception:  # noqa: BLE001 - the columns seen in the vectors are enough when the config is gone
        return 0


@contextlib.contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """Seismic's Rust core prints its progress straight to file descriptor 1, past sys.stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _build_seismic(ids: list[str], matrix: sp.csr_matrix, settings: SeismicSettings, path: Path) -> None:
    from seismic import SeismicDataset, SeismicIndex

    with _native_stdout_silenced():
        dataset = SeismicDataset()
        dataset.add_documents_by_id(ids, matrix.indices.astype(np.int64), matrix.data.astype(np.float32),
                                    matrix.indptr.astype(np.int64))
        index = SeismicIndex.build_from_dataset(dataset, n_postings=settings.n_postings,
                                                centroid_fraction=settings.centroid_fraction,
                                                summary_energy=settings.summary_energy)
        index.save(str(path))


# ---- searching ----------------------------------------------------------------------------------------------------

class SparseIndex:
    """A built index, opened for search: `search(query CSR matrix, k)` -> per query [(doc id, score)], best first."""

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any]):
        self.path, self.meta = Path(path), meta
        self.doc_ids = (self.path / "doc_ids.txt").read_text(encoding="utf-8").splitlines()
        self.kind = meta["kind"]
        self.settings = SeismicSettings(**meta.get("settings", {})) if self.kind == "seismic" else None
        if self.kind == "exact":
            self._inverted = sp.load_npz(self.path / "vectors.npz").T.tocsr()  # term -> documents, built once
        else:
            _require_seismic()
            from seismic import SeismicIndex

            with _native_stdout_silenced():
                self._seismic = SeismicIndex.load(str(self.path / "vectors.index.seismic"))

    def check_model(self, model: str) -> None:
        """Queries from `model` may be scored against this index only if it was built from the same model."""
        files = model_signature(model)
        if model != self.meta["model"] and files != self.meta["model_files"]:
            raise SpladectlError(f"{self.path} was built from model {self.meta['model']!r}, not {model!r}",
                                 hint=f"search it with --model {self.meta['model']}, or encode and index the corpus "
                                      "with this model")
        if files != self.meta["model_files"]:
            raise SpladectlError(f"{self.path}: model {model!r} changed since the index was built (its files differ)",
                                 hint="encode and index the corpus again")

    def term_document_fraction(self) -> np.ndarray:
        return np.load(self.path / "term_document_fraction.npy")

    def search(self, queries: sp.csr_matrix, k: int, *, query_cut: int | None = None,
               heap_factor: float | None = None, threads: int = 0) -> list[list[tuple[str, float]]]:
        """Top `k` of each query row; Seismic's `query_cut` / `heap_factor` default to the index's settings, and its
        `threads` to every core (0)."""
        queries = sp.csr_matrix(queries, dtype=np.float32)
        if self.kind == "exact":
            from spladectl.evaluate import retrieve_inverted

            columns = self._inverted.shape[0]
            if queries.shape[1] != columns:
                queries = sp.csr_matrix((queries.data, queries.indices, queries.indptr),
                                        shape=(queries.shape[0], columns))
            indices, scores = retrieve_inverted(queries, self._inverted, k)
            return [[(self.doc_ids[i], float(s)) for i, s in zip(row, row_scores) if s > 0]
                    for row, row_scores in zip(indices, scores)]
        import seismic

        text = seismic.get_seismic_string()
        cut = query_cut if query_cut is not None else self.settings.query_cut
        heap = heap_factor if heap_factor is not None else self.settings.heap_factor
        components, values, names = [], [], []
        for row in range(queries.shape[0]):
            start, end = queries.indptr[row], queries.indptr[row + 1]
            components.append(np.asarray([str(t) for t in queries.indices[start:end]], dtype=text))
            values.append(queries.data[start:end].astype(np.float32))
            names.append(str(row))
        cut = cut or max((len(c) for c in components), default=1) or 1
        results = self._seismic.batch_search(np.asarray(names, dtype=text), components, values, k=k, query_cut=cut,
                                             heap_factor=heap, num_threads=threads)
        return [[(doc, float(score)) for _, score, doc in hits if score > 0] for hits in results]


def open_index(path: str | os.PathLike) -> SparseIndex:
    meta_file = Path(path) / INDEX_FILE
    if not meta_file.is_file():
        raise SpladectlError(f"{path}: not an index (no {INDEX_FILE})", hint="build one with `spladectl index`")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise SpladectlError(f"{meta_file}: unreadable ({exc})") from exc
    return SparseIndex(path, meta)


def index_run(encoder, index: SparseIndex, query_ids: list[str], query_texts: list[str], *, max_length: int,
              precision: str, device: str, batch_size: int = 64, k: int = 1000, show_progress: bool = True,
              query_cut: int | None = None, heap_factor: float | None = None):
    """Encode the queries and search the index: an evaluate.RunResult, with latency per query and the sparsity
    statistics (document side from what the index recorded when it was built)."""
    from spladectl.encoding import encode_sparse
    from spladectl.evaluate import RunResult

    started = time.perf_counter()
    queries = encode_sparse(encoder, query_texts, max_length=max_length, batch_size=batch_size, precision=precision,
                            device=device, show_progress=show_progress, desc="encoding queries")
    encode_seconds = time.perf_counter() - started
    latencies, hits = [], []
    for row in range(queries.shape[0]):  # one at a time, as a search service would get them
        started = time.perf_counter()
        hits.extend(index.search(queries[row], k, query_cut=query_cut, heap_factor=heap_factor, threads=1))
        latencies.append(time.perf_counter() - started)
    run = {qid: dict(found) for qid, found in zip(query_ids, hits)}
    present = (np.bincount(queries.indices, minlength=queries.shape[1]) / max(queries.shape[0], 1))
    fraction = index.term_document_fraction()
    width = min(len(present), len(fraction))
    stats = {"avg_query_dims": float(queries.nnz / max(queries.shape[0], 1)),
             "avg_doc_dims": index.meta["terms"] / max(index.meta["count"], 1),
             "avg_flops": float(np.dot(present[:width], fraction[:width])),
             "encode_docs_seconds": 0.0, "encode_queries_seconds": round(encode_seconds, 2),
             "retrieve_seconds": round(float(sum(latencies)), 2),
             "latency_ms_p50": round(float(np.percentile(latencies, 50)) * 1000, 3) if latencies else None,
             "latency_ms_p99": round(float(np.percentile(latencies, 99)) * 1000, 3) if latencies else None,
             "n_queries": len(query_ids), "n_docs": index.meta["count"], "precision": precision,
             "index": str(index.path), "index_kind": index.kind}
    return RunResult(run, stats)
