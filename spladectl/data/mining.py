"""BM25 hard negatives for BEIR training queries, and their on-disk cache.

A mined negative is never one of the query's positives (qrels score > 0), nor a document whose text equals a positive's
(corpora carry duplicates, and a duplicate of the answer is not a negative).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Iterable, Iterator

from spladectl.data import bm25
from spladectl.data.beir import BeirDataset, load_beir, qrels_path
from spladectl.data.cache import atomic_write, cache_dirs, file_signature, place_tag

_CACHE_VERSION = 1


def mine_hard_negatives(
    beir: BeirDataset | str | Path,
    split: str = "train",
    k: int = 50,
    *,
    stem: bool | None = None,
    show_progress: bool = True,
) -> dict[str, list[str]]:
    """query id -> up to k document ids, BM25's best first, for every query of the split that has a positive.

    `beir` is a BEIR directory, or an already loaded split (then `split` is not used). `stem`: see bm25.stemmer.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    dataset = beir if isinstance(beir, BeirDataset) else load_beir(beir, split)
    query_ids = [qid for qid in dataset.queries if dataset.positives(qid)]
    if not query_ids:
        return {}
    doc_ids = list(dataset.corpus)
    index = bm25.BM25(doc_ids, [dataset.corpus[d] for d in doc_ids], stem=stem, show_progress=show_progress)
    # Ask for enough extra results that removing the positives (and their duplicates) still leaves k.
    most_positives = max(len(dataset.positives(qid)) for qid in query_ids)
    depth = k + 2 * most_positives + 8
    indices, _ = index.search([dataset.queries[q] for q in query_ids], depth, show_progress=show_progress)
    negatives: dict[str, list[str]] = {}
    for qid, row in zip(query_ids, indices):
        negatives[qid] = list(itertools.islice(_not_positive(dataset, qid, (doc_ids[i] for i in row)), k))
    return negatives


def _not_positive(dataset: BeirDataset, query_id: str, ranked: Iterable[str]) -> Iterator[str]:
    """`ranked` without the query's positives and the documents whose text equals a positive's."""
    positives = set(dataset.positives(query_id))
    positive_texts = {dataset.corpus[d] for d in positives}
    return (d for d in ranked if d not in positives and dataset.corpus[d] not in positive_texts)


def cached_hard_negatives(
    root: str | Path,
    split: str = "train",
    k: int = 50,
    *,
    cache_dir: str | Path | None = None,
    stem: bool | None = None,
    show_progress: bool = True,
    dataset: BeirDataset | None = None,
) -> dict[str, list[str]]:
    """mine_hard_negatives, read from the cache when the dataset files are unchanged, else mined and written there.

    The cache lives in `cache_dir`, else in ROOT/.spladectl-cache/, else (ROOT not writable) in ~/.cache/spladectl/.
    Its key covers the dataset's path, the split, k, the BM25 tokenisation and the size and mtime of corpus, queries
    and qrels. `dataset`, when the caller already loaded this split, saves reading it again on a cache miss.
    """
    root = Path(root)
    key = cache_key(root, split, k, stem=stem)
    prefix = f"negatives-{place_tag(root)}-{split}-k{k}-"
    name = f"{prefix}{key[:16]}.json"
    for directory in cache_dirs(root, "negatives", cache_dir):
        cached = _read_cache(directory / name, key)
        if cached is not None:
            return cached
    negatives = mine_hard_negatives(dataset or root, split, k, stem=stem, show_progress=show_progress)
    payload = {"version": _CACHE_VERSION, "key": key, "split": split, "k": k, "bm25": bm25.describe(stem),
               "negatives": negatives}
    data = json.dumps(payload).encode("utf-8")
    for directory in cache_dirs(root, "negatives", cache_dir):
        if atomic_write(directory, name, lambda handle: handle.write(data), stale_prefix=prefix):
            break
    return negatives


def cache_key(root: Path, split: str, k: int, *, stem: bool | None = None) -> str:
    files = [file_signature(p) for p in (root / "corpus.jsonl", root / "queries.jsonl", qrels_path(root, split))]
    blob = json.dumps(
        {"v": _CACHE_VERSION, "root": str(root.resolve()), "split": split, "k": k, "bm25": bm25.describe(stem),
         "files": files},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_cache(path: Path, key: str) -> dict[str, list[str]] | None:
    """The cached negatives, or None when absent, unreadable or for another key (then we mine again)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict) or payload.get("key") != key or not isinstance(payload.get("negatives"), dict):
        return None
    return payload["negatives"]


def mine_with_teacher(
    dataset: BeirDataset,
    members,
    k: int = 50,
    *,
    skip_top: int = 0,
    sample_from: int | None = None,
    seed: int = 42,
    settings=None,
) -> dict[str, list[str]]:
    """query id -> k hard negatives ranked by a teacher (a SPLADE model, BM25, or an ensemble; see teachers.py).

    The ranking leaves out the query's positives and their textual duplicates, then skips its `skip_top` best
    documents (the likeliest unjudged positives), then takes the next k, or, with `sample_from` > k, k drawn without
    replacement from the next `sample_from` (kept in rank order; the draw depends only on `seed` and the query id).
    """
    import numpy as np

    from spladectl.data import teachers

    if k < 1 or skip_top < 0 or (sample_from is not None and sample_from < k):
        raise ValueError("need k >= 1, skip_top >= 0 and sample_from >= k")
    settings = settings or teachers.EncodeSettings()
    query_ids = [qid for qid in dataset.queries if dataset.positives(qid)]
    doc_ids = list(dataset.corpus)
    texts = [dataset.corpus[d] for d in doc_ids]
    scorers = [teachers.DocumentScorer(m, texts, settings) for m in members]
    window = sample_from or k
    depth = min(len(doc_ids), max(100, skip_top + window))
    queries = [dataset.queries[q] for q in query_ids]
    negatives: dict[str, list[str]] = {}
    for qid, rows in zip(query_ids, zip(*(s.rows(queries) for s in scorers))):
        tops = [np.argpartition(-row, depth - 1)[:depth] for row in rows]
        fused = teachers.ensemble(rows, [m.weight for m in members], reference=np.unique(np.concatenate(tops)))
        ranked = (doc_ids[i] for i in np.lexsort((np.arange(len(fused)), -fused)))
        candidates = list(itertools.islice(_not_positive(dataset, qid, ranked), skip_top + window))[skip_top:]
        if sample_from and len(candidates) > k:
            rng = np.random.default_rng([seed, int(hashlib.sha1(qid.encode()).hexdigest()[:8], 16)])
            candidates = [candidates[i] for i in sorted(rng.choice(len(candidates), k, replace=False))]
        negatives[qid] = candidates[:k]
    return negatives
