"""BM25 with bm25s, shared by hard-negative mining and the `--baseline bm25` row of `spladectl eval`.

Tokenisation: bm25s's regex tokenizer, lower-cased, English stopwords (bundled with bm25s), and the Snowball English
stemmer when PyStemmer is installed (`pip install PyStemmer`). Scoring: bm25s defaults (Lucene variant, k1=1.5, b=0.75).
Stemming changes results (SciFact test nDCG@10: 0.662 without, 0.686 with), so every summary names which one ran.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np


@lru_cache(maxsize=1)
def _auto_stemmer():
    try:
        import Stemmer
    except ImportError:
        return None
    return Stemmer.Stemmer("english")


def stemmer(stem: bool | None = None):
    """The English Snowball stemmer (PyStemmer) or None. stem=None: use it when installed; True: require it."""
    if stem is False:
        return None
    found = _auto_stemmer()
    if stem and found is None:
        from spladectl.errors import SpladectlError

        raise SpladectlError("BM25 stemming needs PyStemmer", hint="pip install PyStemmer")
    return found


# The names commands take for BM25 (`eval --baseline`, `data mine --rank-by`, `data score --teacher`) -> stemming.
VARIANTS = {"bm25": None, "bm25:stem": True, "bm25:nostem": False}


def variant(stem: bool | None) -> str:
    """The name of VARIANTS that stems as `stem` says."""
    return next(name for name, value in VARIANTS.items() if value is stem)


def describe(stem: bool | None = None) -> str:
    """One line saying how BM25 tokenises here, for summaries and cache keys."""
    return "bm25s lucene k1=1.5 b=0.75, stopwords=en, stemmer=" + ("snowball-en" if stemmer(stem) else "none")


class BM25:
    """A bm25s index over documents named by id."""

    def __init__(
        self, doc_ids: Sequence[str], texts: Sequence[str], *, stem: bool | None = None, show_progress: bool = False
    ):
        import bm25s

        self.doc_ids = list(doc_ids)
        self._stemmer = stemmer(stem)
        self._retriever = bm25s.BM25()
        tokens = bm25s.tokenize(list(texts), stopwords="en", stemmer=self._stemmer, show_progress=show_progress)
        # No document with a word to index (only stopwords, digits, single letters): bm25s cannot build an index, and
        # every query scores every document 0, in corpus order.
        self._empty = not tokens.vocab
        if not self._empty:
            self._retriever.index(tokens, show_progress=show_progress)

    def search(
        self, queries: Sequence[str], k: int, *, show_progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(document indices, scores), each (len(queries), min(k, corpus size)), best first.

        Queries are tokenised to strings, not ids: bm25s then drops words the corpus never uses, and a query left with
        no words scores every document 0 instead of failing.
        """
        k = min(k, len(self.doc_ids))
        if not queries or k == 0:
            return np.zeros((len(queries), 0), dtype=np.int64), np.zeros((len(queries), 0), dtype=np.float32)
        if self._empty:
            return np.tile(np.arange(k, dtype=np.int64), (len(queries), 1)), np.zeros((len(queries), k), np.float32)
        tokens = self._query_tokens(queries)
        indices, scores = self._retriever.retrieve(tokens, k=k, show_progress=show_progress, n_threads=1)
        return np.asarray(indices, dtype=np.int64), np.asarray(scores, dtype=np.float32)

    def scores(self, queries: Sequence[str]) -> Iterator[np.ndarray]:
        """Each query's score of every document, (corpus size,) float32, in document order."""
        for words in self._query_tokens(queries):
            if not words or self._empty:  # only stopwords (e.g. "what is it"): no term to match, every document 0
                yield np.zeros(len(self.doc_ids), dtype=np.float32)
            else:
                yield np.asarray(self._retriever.get_scores(words), dtype=np.float32)

    def _query_tokens(self, queries: Sequence[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(list(queries), stopwords="en", stemmer=self._stemmer, return_ids=False,
                              show_progress=False)
