"""Teachers: scores of (query, document) pairs from BM25, a SPLADE model, or a weighted ensemble of them.

A teacher serves twice: `spladectl data mine --model` ranks the corpus with it to choose hard negatives, and
`spladectl data score` attaches its scores to training examples for distillation (MarginMSE or KL).

An ensemble's members are z-normalised per query (over the documents being compared), weighted, summed, and put back
into the units of the first member (its mean and spread for that query). With a SPLADE model first, the ensemble
scores on the scale of a SPLADE student's dot products, which MarginMSE compares with directly; a single member's
scores are used as they are.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from spladectl.data import bm25
from spladectl.errors import SpladectlError


@dataclass(frozen=True)
class Member:
    """One scorer of an ensemble: "bm25", "bm25:stem", "bm25:nostem", or a SPLADE model name or directory."""

    name: str
    weight: float = 1.0

    @property
    def is_bm25(self) -> bool:
        return self.name in bm25.VARIANTS


def parse_members(specs: Sequence[str], option: str = "--teacher") -> list[Member]:
    """`["bm25:stem=0.6", "splade-tiny=0.4"]` -> members; a missing weight is 1. Weights need not sum to 1."""
    members = []
    for spec in specs:
        name, _, weight = spec.rpartition("=") if "=" in spec else (spec, "=", "1")
        try:
            value = float(weight)
        except ValueError:
            name, value = spec, 1.0  # a model path containing "="
        if not name.strip():
            raise SpladectlError(f"{option} {spec!r}: no teacher named")
        if not np.isfinite(value) or value < 0:
            raise SpladectlError(f"{option} {spec!r}: the weight must be a number >= 0")
        members.append(Member(name.strip(), value))
    if not members:
        raise SpladectlError(f"{option}: name at least one teacher (bm25, bm25:stem or a SPLADE model)")
    if sum(m.weight for m in members) <= 0:
        raise SpladectlError(f"{option}: the weights sum to 0")
    return members


def describe(members: Sequence[Member]) -> str:
    return " + ".join(f"{m.weight:g}×{m.name}" for m in members)


@dataclass
class EncodeSettings:
    """How a SPLADE member encodes texts: lengths, precision, batch size, and where encoded vectors are cached."""

    max_query_length: int = 64
    max_doc_length: int = 256
    precision: str = "32-true"
    batch_size: int = 32
    device: str = "cpu"
    cache_dir: Path | None = None
    show_progress: bool = True


class DocumentScorer:
    """One member's scores of queries against a fixed list of documents (a corpus, or the distinct texts of a file)."""

    def __init__(self, member: Member, documents: Sequence[str], settings: EncodeSettings):
        self.member, self.settings = member, settings
        self.n_docs = len(documents)
        if member.is_bm25:
            self._bm25 = bm25.BM25([str(i) for i in range(len(documents))], documents,
                                   stem=bm25.VARIANTS[member.name], show_progress=settings.show_progress)
        else:
            from spladectl.model import SpladeEncoder

            self._encoder = SpladeEncoder.from_pretrained(member.name, memory_efficient_head=True)
            self._docs = encode_cached(self._encoder, documents, settings.max_doc_length, settings,
                                       desc=f"encoding documents ({member.name})")
            self._inverted = self._docs.T.tocsr()

    def rows(self, queries: Sequence[str], block: int = 256) -> Iterator[np.ndarray]:
        """One (n_docs,) float32 score row per query, in order, computed `block` queries at a time."""
        for start in range(0, len(queries), block):
            chunk = list(queries[start:start + block])
            if self.member.is_bm25:
                yield from self._bm25.scores(chunk)
            else:
                encoded = _encode(self._encoder, chunk, self.settings.max_query_length, self.settings,
                                  desc="encoding queries")
                yield from np.asarray((encoded @ self._inverted).todense(), dtype=np.float32)


def ensemble(scores: Sequence[np.ndarray], weights: Sequence[float], reference: np.ndarray | None = None) -> np.ndarray:
    """Weighted sum of z-normalised score vectors, in the units of the first one.

    Each vector is normalised by its mean and standard deviation over `reference` (indices into it: the documents
    that define the query's scale, e.g. the candidates or a member's top ranks), or over all of it.
    """
    if len(scores) == 1:
        return np.asarray(scores[0], dtype=np.float32)
    total = sum(weights)
    fused = np.zeros_like(scores[0], dtype=np.float64)
    stats = []
    for values, weight in zip(scores, weights):
        sample = values if reference is None else values[reference]
        mean, spread = float(np.mean(sample)), float(np.std(sample))
        stats.append((mean, spread))
        fused += (weight / total) * (values - mean) / (spread if spread > 0 else 1.0)
    mean, spread = stats[0]
    return (fused * (spread if spread > 0 else 1.0) + mean).astype(np.float32)


def _encode(encoder, texts: Sequence[str], max_length: int, settings: EncodeSettings, *, desc: str) -> sp.csr_matrix:
    from spladectl.encoding import encode_sparse

    return encode_sparse(encoder, texts, max_length=max_length, batch_size=settings.batch_size,
                         precision=settings.precision, device=settings.device, show_progress=settings.show_progress,
                         desc=desc)


def encode_cached(encoder, texts: Sequence[str], max_length: int, settings: EncodeSettings, *,
                  desc: str) -> sp.csr_matrix:
    """SPLADE vectors of `texts` (CSR, rows in order), reusing vectors this model encoded before with these settings.

    The cache is keyed by the model's weights file, the length, the precision and each text's hash, so mining and
    scoring the same corpus encode it once. It lives in settings.cache_dir, else ~/.cache/spladectl/vectors.
    """
    from spladectl.data.cache import atomic_write, user_cache_dir

    directory = Path(settings.cache_dir or user_cache_dir() / "vectors") / _model_key(encoder, max_length, settings)
    hashes = [hashlib.sha1(t.encode("utf-8")).hexdigest() for t in texts]
    known: dict[str, tuple[sp.csr_matrix, int]] = {}
    for shard in sorted(directory.glob("*.npz")) if directory.is_dir() else []:
        try:
            with np.load(shard, allow_pickle=False) as payload:
                matrix = sp.csr_matrix((payload["data"], payload["indices"], payload["indptr"]),
                                       shape=tuple(payload["shape"]))
                shard_hashes = [str(h) for h in payload["hashes"]]
        except (OSError, ValueError, KeyError):
            continue  # a damaged shard is encoded again, not trusted
        known.update({h: (matrix, row) for row, h in enumerate(shard_hashes)})
    missing = sorted({h: i for i, h in enumerate(hashes) if h not in known}.values())
    if missing:
        fresh = _encode(encoder, [texts[i] for i in missing], max_length, settings, desc=desc)
        fresh_hashes = np.asarray([hashes[i] for i in missing])

        def write(handle) -> None:
            np.savez(handle, data=fresh.data, indices=fresh.indices, indptr=fresh.indptr,
                     shape=np.asarray(fresh.shape), hashes=fresh_hashes)

        name = hashlib.sha1("".join(fresh_hashes).encode()).hexdigest()[:16] + ".npz"
        atomic_write(directory, name, write)  # a cache that cannot be written only costs time next run
        known.update({h: (fresh, row) for row, h in enumerate(fresh_hashes)})
    return sp.vstack([known[h][0][known[h][1]] for h in hashes], format="csr") if hashes else \
        sp.csr_matrix((0, encoder.vocab_size), dtype=np.float32)


def _model_key(encoder, max_length: int, settings: EncodeSettings) -> str:
    from spladectl.precision import canonical_precision

    source = Path(getattr(encoder, "source", "") or "")
    weights = [p for p in (source / "model.safetensors", source / "pytorch_model.bin") if p.is_file()]
    signature = [str(source.resolve()) if str(source) else repr(type(encoder))]
    signature += [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights]
    signature += [max_length, canonical_precision(settings.precision)]
    return hashlib.sha256(repr(signature).encode()).hexdigest()[:20]


def score_examples(examples, members: Sequence[Member], settings: EncodeSettings,
                   corpus: Sequence[str] = ()) -> list[list[float]]:
    """Teacher scores [positive, *negatives] of every example (an ensemble is normalised over those candidates).

    `corpus`: more documents for BM25's statistics (its IDF), e.g. the BEIR corpus the examples were mined from;
    without it BM25 sees only the examples' own documents.
    """
    texts = list(dict.fromkeys(t for e in examples for t in (e.positive, *e.negatives)))
    position = {t: i for i, t in enumerate(texts)}
    queries = list(dict.fromkeys(e.query for e in examples))
    per_member = []
    for member in members:
        documents = texts + [t for t in dict.fromkeys(corpus) if t not in position] if member.is_bm25 else texts
        scorer = DocumentScorer(member, documents, settings)
        per_member.append(dict(zip(queries, scorer.rows(queries))))
    scores = []
    for example in examples:
        candidates = np.asarray([position[t] for t in (example.positive, *example.negatives)])
        rows = [member_rows[example.query][candidates] for member_rows in per_member]
        fused = ensemble(rows, [m.weight for m in members])
        scores.append([round(float(s), 5) for s in fused])
    return scores
