"""Retrieval quality of a SPLADE encoder (and of BM25) on a BEIR split.

The pipeline never holds a dense corpus × vocabulary matrix: documents are encoded a batch at a time and each batch
becomes scipy CSR at once (optionally pruned to its top-k terms or above a threshold); retrieval multiplies a block of
queries with the transposed document matrix (an inverted index: one row per vocabulary term listing the documents that
use it), which gives a dense block-of-queries × corpus score matrix and nothing larger.

Metrics come from ir-measures: nDCG@10, MRR@10 (RR@10) and R@100, averaged over every query of the qrels (a query
that retrieves nothing scores 0). Sparsity: average active dimensions of queries and documents, and the average FLOPS
of a query-document product, sum over the vocabulary of p_q(v) * p_d(v), with p(v) the fraction of queries (documents)
in which term v is active (Paria et al. 2020; Formal et al., SPLADE).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from spladectl.data.beir import BeirDataset
from spladectl.encoding import encode_sparse

METRIC_NAMES = ("nDCG@10", "MRR@10", "R@100")


def sparsity_stats(query_matrix: sp.spmatrix, doc_matrix: sp.spmatrix) -> dict[str, float]:
    """Average active dimensions of queries and documents, and the average FLOPS of a query-document product."""
    query_matrix, doc_matrix = sp.csr_matrix(query_matrix), sp.csr_matrix(doc_matrix)
    n_q, n_d = query_matrix.shape[0], doc_matrix.shape[0]
    vocab = max(query_matrix.shape[1], doc_matrix.shape[1])
    p_q = np.bincount(query_matrix.indices, minlength=vocab) / max(n_q, 1)
    p_d = np.bincount(doc_matrix.indices, minlength=vocab) / max(n_d, 1)
    return {
        "avg_query_dims": float(query_matrix.nnz / max(n_q, 1)),
        "avg_doc_dims": float(doc_matrix.nnz / max(n_d, 1)),
        "avg_flops": float(np.dot(p_q, p_d)),
    }


# --------------------------------------------------------------------------------------------------------- retrieval


def retrieve(
    query_matrix: sp.spmatrix, doc_matrix: sp.spmatrix, k: int = 1000, *, block_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k documents of each query by dot product: (indices, scores), each (n_queries, min(k, n_docs)), best first.

    Ties are broken by the lower document index, so results are deterministic. Scores of 0 (no shared term) are
    returned like any other; run_from_results drops them.
    """
    inverted = sp.csr_matrix(doc_matrix, dtype=np.float32).T.tocsr()  # (vocab, n_docs): term -> documents
    return retrieve_inverted(query_matrix, inverted, k, block_size=block_size)


def retrieve_inverted(
    query_matrix: sp.spmatrix, inverted: sp.csr_matrix, k: int = 1000, *, block_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`retrieve` against an inverted index already built: `inverted` is (vocab, n_docs), term -> documents, so that
    an index searched many times transposes its documents once."""
    query_matrix = sp.csr_matrix(query_matrix, dtype=np.float32)
    n_q, n_d = query_matrix.shape[0], inverted.shape[1]
    k = min(k, n_d)
    indices = np.zeros((n_q, k), dtype=np.int64)
    scores = np.zeros((n_q, k), dtype=np.float32)
    if k == 0:
        return indices, scores
    # Bound the dense score block to ~32M floats (128 MB) whatever the corpus size.
    block_size = block_size or int(np.clip(2**25 // max(n_d, 1), 1, 512))
    for start in range(0, n_q, block_size):
        block = (query_matrix[start:start + block_size] @ inverted).toarray()
        top = np.argpartition(-block, k - 1, axis=1)[:, :k] if k < n_d else np.tile(np.arange(n_d), (len(block), 1))
        top_scores = np.take_along_axis(block, top, axis=1)
        order = np.lexsort((top, -top_scores), axis=1)
        indices[start:start + len(block)] = np.take_along_axis(top, order, axis=1)
        scores[start:start + len(block)] = np.take_along_axis(top_scores, order, axis=1)
    return indices, scores


def run_from_results(
    query_ids: Sequence[str], doc_ids: Sequence[str], indices: np.ndarray, scores: np.ndarray
) -> dict[str, dict[str, float]]:
    """A run (qid -> docid -> score) from retrieve()'s arrays; documents scoring <= 0 matched nothing: left out."""
    run: dict[str, dict[str, float]] = {}
    for qid, row_idx, row_scores in zip(query_ids, indices, scores):
        run[qid] = {doc_ids[i]: float(s) for i, s in zip(row_idx, row_scores) if s > 0}
    return run


def write_trec_run(path: str | Path, run: dict[str, dict[str, float]], name: str) -> None:
    """A TREC run file: `qid Q0 docid rank score name`, ranks from 1, best first."""
    tag = "".join(c if not c.isspace() else "_" for c in name) or "spladectl"
    lines = []
    for qid, docs in run.items():
        ranked = sorted(docs.items(), key=lambda item: (-item[1], item[0]))
        lines.extend(f"{qid} Q0 {doc} {rank} {score:.6f} {tag}" for rank, (doc, score) in enumerate(ranked, start=1))
    Path(path).write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------- metrics


def compute_metrics(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """nDCG@10, MRR@10 and R@100 with ir-measures, averaged over every query in qrels (missing from run: 0)."""
    import ir_measures
    from ir_measures import RR, R, nDCG

    measures = {"nDCG@10": nDCG @ 10, "MRR@10": RR @ 10, "R@100": R @ 100}
    totals = dict.fromkeys(measures, 0.0)
    if qrels:
        names = {measure: name for name, measure in measures.items()}
        for metric in ir_measures.iter_calc(list(measures.values()), qrels, run):
            totals[names[metric.measure]] += float(metric.value)
    return {name: total / max(len(qrels), 1) for name, total in totals.items()}


# -------------------------------------------------------------------------------------------------------- end to end


@dataclass
class RunResult:
    """A retrieval run plus what it cost: sparsity, timings and sizes."""

    run: dict[str, dict[str, float]]
    stats: dict[str, Any] = field(default_factory=dict)


def encoder_run(
    encoder,
    dataset: BeirDataset,
    *,
    precision: str = "32-true",
    device: str = "cpu",
    batch_size: int = 64,
    max_query_length: int = 64,
    max_doc_length: int = 256,
    top_k: int | None = None,
    threshold: float = 0.0,
    k: int = 1000,
    show_progress: bool = True,
) -> RunResult:
    """Encode the corpus and the split's queries, retrieve the top k for each query."""
    from spladectl.precision import canonical_precision

    precision = canonical_precision(precision)
    was_training = getattr(encoder, "training", False)
    if hasattr(encoder, "eval"):
        encoder.eval()  # dropout off: the trainer calls us mid-run
    try:
        doc_ids, query_ids = list(dataset.corpus), list(dataset.queries)
        started = time.perf_counter()
        docs = encode_sparse(encoder, [dataset.corpus[d] for d in doc_ids], max_length=max_doc_length,
                             batch_size=batch_size, precision=precision, device=device, top_k=top_k,
                             threshold=threshold, show_progress=show_progress, desc="encoding documents")
        doc_seconds = time.perf_counter() - started
        started = time.perf_counter()
        # Queries are short and few: they keep every active term (pruning is a document-side index-size knob).
        queries = encode_sparse(encoder, [dataset.queries[q] for q in query_ids], max_length=max_query_length,
                                batch_size=batch_size, precision=precision, device=device,
                                show_progress=show_progress, desc="encoding queries")
        query_seconds = time.perf_counter() - started
    finally:
        if was_training and hasattr(encoder, "train"):
            encoder.train(True)
    started = time.perf_counter()
    indices, scores = retrieve(queries, docs, k)
    run = run_from_results(query_ids, doc_ids, indices, scores)
    stats = {
        **sparsity_stats(queries, docs),
        "encode_docs_seconds": round(doc_seconds, 2),
        "encode_queries_seconds": round(query_seconds, 2),
        "retrieve_seconds": round(time.perf_counter() - started, 2),
        "n_queries": len(query_ids),
        "n_docs": len(doc_ids),
        "precision": precision,
    }
    return RunResult(run, stats)


def evaluate_encoder(encoder, dataset: BeirDataset, **settings: Any) -> dict[str, Any]:
    """Metrics (nDCG@10, MRR@10, R@100), sparsity (avg_query_dims, avg_doc_dims, avg_flops) and timings of an encoder
    on one BEIR split; `settings` are `encoder_run`'s (precision, device, lengths, pruning, k, show_progress). The
    trainer calls this during training and for the demo's before/after."""
    started = time.perf_counter()
    result = encoder_run(encoder, dataset, **settings)
    return {**compute_metrics(dataset.qrels, result.run), **result.stats,
            "seconds": round(time.perf_counter() - started, 2)}


def bm25_run(
    dataset: BeirDataset, k: int = 1000, *, stem: bool | None = None, show_progress: bool = False
) -> RunResult:
    """BM25 (bm25s, see spladectl.data.bm25 for the tokenisation) over the same corpus and queries."""
    from spladectl.data import bm25

    started = time.perf_counter()
    doc_ids, query_ids = list(dataset.corpus), list(dataset.queries)
    index = bm25.BM25(doc_ids, [dataset.corpus[d] for d in doc_ids], stem=stem, show_progress=show_progress)
    indices, scores = index.search([dataset.queries[q] for q in query_ids], k, show_progress=show_progress)
    run = run_from_results(query_ids, doc_ids, indices, scores)
    return RunResult(run, {"bm25": bm25.describe(stem), "n_queries": len(query_ids), "n_docs": len(doc_ids),
                           "index_and_search_seconds": round(time.perf_counter() - started, 2)})


def bm25_baseline(
    dataset: BeirDataset, k: int = 1000, *, stem: bool | None = None, show_progress: bool = False
) -> dict[str, Any]:
    """The BM25 row: the same metrics as evaluate_encoder (no sparsity numbers: BM25 has no learned vectors)."""
    started = time.perf_counter()
    result = bm25_run(dataset, k, stem=stem, show_progress=show_progress)
    return {**compute_metrics(dataset.qrels, result.run), **result.stats,
            "seconds": round(time.perf_counter() - started, 2)}
