"""spladectl.evaluate: metrics against a hand-computed case, retrieval against brute force, sparsity, end to end."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from test_data import TOY_CORPUS

from spladectl.data.beir import load_beir
from spladectl.encoding import encode_sparse, sparsify, top_terms
from spladectl.evaluate import (
    bm25_baseline,
    compute_metrics,
    evaluate_encoder,
    retrieve,
    run_from_results,
    sparsity_stats,
    write_trec_run,
)


class WordEncoder(torch.nn.Module):
    """A stand-in for SpladeEncoder: one dimension per known word, weight log(1 + count); tracks its calls."""

    def __init__(self, words: list[str]):
        super().__init__()
        self.words = sorted(set(words))
        self.index = {w: i for i, w in enumerate(self.words)}
        self.vocab_size = len(self.words)
        self.calls: list[int] = []
        self.tokenizer = _Tokenizer(self.words)

    def encode(self, texts, *, max_length, batch_size=32, precision="32-true", device=None, show_progress=False):
        assert not self.training, "evaluation must run in eval mode"
        texts = list(texts)
        self.calls.append(len(texts))
        out = torch.zeros(len(texts), self.vocab_size)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower())[:max_length]:
                if word in self.index:
                    out[row, self.index[word]] += 1
        return torch.log1p(out)


class _Tokenizer:
    def __init__(self, words: list[str]):
        self.words = words

    def convert_ids_to_tokens(self, ids):
        return [self.words[i] for i in ids]


def toy_encoder() -> WordEncoder:
    words = [w for doc in TOY_CORPUS.values() for w in re.findall(r"\w+", f"{doc['title']} {doc['text']}".lower())]
    stop = {"a", "and", "the", "is", "by", "to", "into", "from", "for", "as", "with", "their", "on", "are"}
    return WordEncoder([w for w in words if w not in stop])


# ---- metrics -------------------------------------------------------------------------------------------------------


def test_metrics_match_a_hand_computed_case() -> None:
    qrels = {
        "qA": {"a1": 1, "a2": 1},
        "qB": {"b1": 1},
        "qC": {"c1": 1, "c2": 0},
        "qD": {"d1": 1},  # retrieves nothing at all: counts as 0, not skipped
    }
    fillers = {f"f{i}": 999.0 - i for i in range(100)}
    run = {
        "qA": {"a3": 3.0, "a1": 2.0, "a4": 1.0, "a2": 0.5},  # relevant at ranks 2 and 4
        "qB": {"b1": 7.0, "x": 1.0},  # relevant at rank 1
        "qC": {"c2": 1000.0, **fillers, "c1": 1.0},  # judged non-relevant first, relevant at rank 102
    }
    ndcg_a = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    expected = {
        "nDCG@10": (ndcg_a + 1 + 0 + 0) / 4,
        "MRR@10": (1 / 2 + 1 + 0 + 0) / 4,
        "R@100": (1 + 1 + 0 + 0) / 4,  # c1 at rank 102 is beyond the cut
    }
    assert compute_metrics(qrels, run) == pytest.approx(expected, abs=1e-9)
    assert set(compute_metrics(qrels, {})) == {"nDCG@10", "MRR@10", "R@100"}
    assert compute_metrics(qrels, {}) == {"nDCG@10": 0.0, "MRR@10": 0.0, "R@100": 0.0}


# ---- retrieval -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [None, 1, 7])
@pytest.mark.parametrize("k", [5, 40, 500])
def test_retrieve_equals_brute_force(block_size: int | None, k: int) -> None:
    rng = np.random.default_rng(7)
    docs = sp.random(120, 300, density=0.05, random_state=rng, format="csr", dtype=np.float32)
    queries = sp.random(17, 300, density=0.08, random_state=rng, format="csr", dtype=np.float32)
    indices, scores = retrieve(queries, docs, k, block_size=block_size)
    dense = queries.toarray() @ docs.toarray().T
    assert indices.shape == scores.shape == (17, min(k, 120))
    for q in range(17):
        # brute force, ties (the zeros) broken by the lower document index like retrieve() does
        expected = np.lexsort((np.arange(120), -dense[q]))[: min(k, 120)]
        np.testing.assert_allclose(scores[q], dense[q][expected], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(indices[q], expected)


def test_run_from_results_leaves_out_non_matches_and_trec_format(tmp_path: Path) -> None:
    indices = np.array([[2, 0, 1], [1, 0, 2]])
    scores = np.array([[3.0, 1.5, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    run = run_from_results(["q1", "q2"], ["d0", "d1", "d2"], indices, scores)
    assert run == {"q1": {"d2": 3.0, "d0": 1.5}, "q2": {}}
    write_trec_run(tmp_path / "run.trec", run, "my model")
    assert (tmp_path / "run.trec").read_text() == "q1 Q0 d2 1 3.000000 my_model\nq1 Q0 d0 2 1.500000 my_model\n"


# ---- sparse vectors ----------------------------------------------------------------------------------------------


def test_sparsify_threshold_and_top_k() -> None:
    dense = torch.tensor([[0.0, 1.0, 0.0, 3.0], [2.0, 0.0, 0.0, 0.5]])
    assert sparsify(dense).toarray().tolist() == dense.tolist()
    assert sparsify(dense, top_k=1).toarray().tolist() == [[0, 0, 0, 3], [2, 0, 0, 0]]
    assert sparsify(dense, threshold=0.6).toarray().tolist() == [[0, 1, 0, 3], [2, 0, 0, 0]]
    assert sparsify(dense, top_k=3, threshold=0.0).nnz == 4  # top-k never brings back zeros
    assert sparsify(dense).dtype == np.float32


def test_sparsity_stats_by_hand() -> None:
    queries = sp.csr_matrix(np.array([[1, 0, 1], [0, 0, 1]], dtype=np.float32))
    docs = sp.csr_matrix(np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=np.float32))
    # p_q = (1/2, 0, 1), p_d = (1/3, 1/3, 1/3): FLOPS = 1/6 + 0 + 1/3
    expected = {"avg_query_dims": 1.5, "avg_doc_dims": 1.0, "avg_flops": 0.5}
    assert sparsity_stats(queries, docs) == pytest.approx(expected)


def test_encode_sparse_keeps_text_order_and_bounds_each_call() -> None:
    encoder = toy_encoder().eval()
    texts = [f"{d['title']} {d['text']}" for d in TOY_CORPUS.values()] * 3
    matrix = encode_sparse(encoder, texts, max_length=64, batch_size=2)
    assert isinstance(matrix, sp.csr_matrix) and matrix.shape == (36, encoder.vocab_size)
    assert max(encoder.calls) <= 8  # a few batches per call, never the whole corpus as one dense matrix
    np.testing.assert_allclose(matrix.toarray(), encoder.encode(texts, max_length=64).numpy())
    pruned = encode_sparse(encoder, texts, max_length=64, batch_size=5, top_k=2)
    assert (np.diff(pruned.indptr) <= 2).all()
    assert encode_sparse(encoder, [], max_length=8).shape == (0, encoder.vocab_size)


def test_top_terms() -> None:
    encoder = toy_encoder()
    vector = encode_sparse(encoder.eval(), ["solar solar electricity"], max_length=8)
    assert [t for t, _ in top_terms(vector, encoder.tokenizer, 5)] == ["solar", "electricity"]


# ---- end to end --------------------------------------------------------------------------------------------------


def test_evaluate_encoder_on_the_toy_dataset(toy_beir: Path) -> None:
    encoder = toy_encoder()
    encoder.train()
    metrics = evaluate_encoder(encoder, load_beir(toy_beir, "test"), batch_size=4, show_progress=False)
    assert encoder.training, "the trainer's mode must be restored"
    assert {"nDCG@10", "MRR@10", "R@100", "avg_query_dims", "avg_doc_dims", "avg_flops", "seconds"} <= set(metrics)
    assert metrics["MRR@10"] == 1.0 and metrics["R@100"] == 1.0  # word overlap finds every answer first here
    assert metrics["n_queries"] == 3 and metrics["n_docs"] == 12
    assert 0 < metrics["avg_flops"] <= metrics["avg_query_dims"]


def test_evaluate_encoder_top_k_terms_shrinks_documents(toy_beir: Path) -> None:
    dataset = load_beir(toy_beir, "test")
    full = evaluate_encoder(toy_encoder(), dataset, show_progress=False)
    pruned = evaluate_encoder(toy_encoder(), dataset, top_k=2, show_progress=False)
    assert pruned["avg_doc_dims"] <= 2 < full["avg_doc_dims"]
    assert pruned["avg_query_dims"] == full["avg_query_dims"]  # queries are not pruned


def test_bm25_baseline_on_the_toy_dataset(toy_beir: Path) -> None:
    metrics = bm25_baseline(load_beir(toy_beir, "test"))
    assert metrics["MRR@10"] == 1.0 and metrics["R@100"] == 1.0
    assert metrics["bm25"].startswith("bm25s lucene")
