"""Counts and average lengths of training files and BEIR directories, for `spladectl data stats` and `data validate`.

Lengths are in whitespace-separated words: cheap, tokenizer-free, and enough to choose max lengths and spot mistakes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spladectl.data.beir import available_splits, qrels_path, read_corpus, read_qrels, read_queries
from spladectl.data.examples import Example
from spladectl.data.loading import detect_format, load_training_data


def data_stats(path: str | Path) -> dict[str, Any]:
    """Validate PATH (every row, every split) and describe it. Raises DataError at the first bad row."""
    fmt = detect_format(path)
    if fmt == "beir":
        return beir_stats(path)
    # n_negatives=None: every negative as written, nothing mined or selected
    return {"path": str(path), "format": fmt, **examples_stats(load_training_data(path, show_progress=False))}


def examples_stats(examples: list[Example]) -> dict[str, Any]:
    negatives = [n for e in examples for n in e.negatives]
    return {
        "examples": len(examples),
        "queries": len({e.query for e in examples}),
        "negatives": len(negatives),
        "avg_negatives_per_example": _mean(len(e.negatives) for e in examples),
        "teacher_scores": bool(examples) and examples[0].teacher_scores is not None,
        "avg_query_words": _mean(_words(e.query) for e in examples),
        "avg_positive_words": _mean(_words(e.positive) for e in examples),
        "avg_negative_words": _mean(_words(n) for n in negatives),
    }


def beir_stats(path: str | Path) -> dict[str, Any]:
    root = Path(path)
    corpus, _ = read_corpus(root / "corpus.jsonl")
    queries = read_queries(root / "queries.jsonl")
    splits = {}
    for split in available_splits(root):
        # read_qrels validates every row against the corpus and the queries
        qrels, _ = read_qrels(qrels_path(root, split), queries=queries, corpus=corpus)
        pairs = [(q, d, r) for q, docs in qrels.items() for d, r in docs.items()]
        splits[split] = {
            "queries": len(qrels),
            "judgments": len(pairs),
            "positives": sum(1 for *_, r in pairs if r > 0),
            "judged_documents": len({d for _, d, _ in pairs}),
            "avg_positives_per_query": _mean(sum(r > 0 for r in docs.values()) for docs in qrels.values()),
        }
    return {
        "path": str(root),
        "format": "beir",
        "documents": len(corpus),
        "queries": len(queries),
        "avg_document_words": _mean(_words(t) for t in corpus.values()),
        "avg_query_words": _mean(_words(t) for t in queries.values()),
        "splits": splits,
    }


def _words(text: str) -> int:
    return len(text.split())


def _mean(values) -> float:
    total = count = 0
    for value in values:
        total += value
        count += 1
    return round(total / count, 2) if count else 0.0
