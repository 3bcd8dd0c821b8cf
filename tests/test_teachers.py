"""Teachers (BM25, a SPLADE model, ensembles), mining with a model, and `spladectl data score`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from test_data import user_error
from test_mining import assert_no_positive

from spladectl.data import load_beir, load_training_data
from spladectl.data.mining import mine_with_teacher
from spladectl.data.teachers import (
    DocumentScorer,
    EncodeSettings,
    Member,
    encode_cached,
    ensemble,
    parse_members,
    score_examples,
)
from spladectl.encoding import encode_sparse
from spladectl.model import SpladeEncoder


@pytest.fixture(scope="module")
def tiny() -> SpladeEncoder:
    return SpladeEncoder.from_pretrained("splade-tiny")


def settings(tmp_path: Path) -> EncodeSettings:
    return EncodeSettings(max_doc_length=64, cache_dir=tmp_path / "vectors", show_progress=False)


def test_parse_members() -> None:
    assert parse_members(["bm25:stem=0.6", "splade-tiny"]) == [Member("bm25:stem", 0.6), Member("splade-tiny", 1.0)]
    assert parse_members(["runs/a=b/final"]) == [Member("runs/a=b/final", 1.0)]  # "=b/final" is no weight
    for bad, words in ((["bm25=-1"], "weight"), (["=0.5"], "no teacher"), (["bm25=0"], "sum to 0"), ([], "at least")):
        with pytest.raises(Exception, match=words):
            parse_members(bad)


def test_ensemble_is_z_normalised_in_the_first_members_units() -> None:
    first, second = np.array([10.0, 12.0, 14.0]), np.array([300.0, 100.0, 200.0])
    assert np.array_equal(ensemble([first], [1.0]), first.astype(np.float32))
    # equal weights: z-scores (-1.22, 0, 1.22) and (1.22, -1.22, 0) average to (0, -0.61, 0.61) ...
    z1 = (first - first.mean()) / first.std()
    z2 = (second - second.mean()) / second.std()
    expected = ((z1 + z2) / 2) * first.std() + first.mean()  # ... then back in the first member's units
    assert np.allclose(ensemble([first, second], [1.0, 1.0]), expected, atol=1e-5)
    # the weights are relative, and the second member's scale does not matter
    assert np.allclose(ensemble([first, second * 1000], [2.0, 2.0]), expected, atol=1e-4)
    # only the reference documents set the scale
    ref = np.array([0, 1])
    out = ensemble([first, second], [1.0, 0.0], reference=ref)
    assert np.allclose(out, first, atol=1e-5)


def test_splade_teacher_scores_are_dot_products(tiny, tmp_path: Path) -> None:
    docs = ["statins lower cholesterol", "the cat sat on the mat", "aspirin and heart attacks"]
    queries = ["do statins reduce cholesterol", "cats"]
    scorer = DocumentScorer(Member("splade-tiny"), docs, settings(tmp_path))
    rows = np.stack(list(scorer.rows(queries)))
    q = encode_sparse(tiny, queries, max_length=64)
    d = encode_sparse(tiny, docs, max_length=64)
    assert np.allclose(rows, (q @ d.T).toarray(), rtol=1e-5)
    assert rows[0].argmax() == 0 and rows[1].argmax() == 1


def test_encoded_documents_are_cached_by_text(tiny, tmp_path: Path, monkeypatch) -> None:
    s = settings(tmp_path)
    first = encode_cached(tiny, ["alpha beta", "gamma delta"], 64, s, desc="x")
    calls = []
    import spladectl.encoding as encoding

    real = encoding.encode_sparse
    monkeypatch.setattr(encoding, "encode_sparse", lambda enc, texts, **kw: calls.append(list(texts)) or
                        real(enc, texts, **kw))
    again = encode_cached(tiny, ["gamma delta", "epsilon", "alpha beta"], 64, s, desc="x")
    assert calls == [["epsilon"]]  # only the new text was encoded
    assert (again[0] != first[1]).nnz == 0 and (again[2] != first[0]).nnz == 0
    assert np.allclose(again[1].toarray(), encode_sparse(tiny, ["epsilon"], max_length=64).toarray())
    # another length is another cache
    encode_cached(tiny, ["alpha beta"], 32, s, desc="x")
    assert calls[-1] == ["alpha beta"]
    # a damaged shard is encoded again, not trusted
    for shard in (s.cache_dir).rglob("*.npz"):
        shard.write_bytes(b"not a zip")
    redo = encode_cached(tiny, ["alpha beta"], 64, s, desc="x")
    assert calls[-1] == ["alpha beta"] and np.allclose(redo.toarray(), first[0].toarray(), atol=1e-5)


def test_mining_with_a_model_follows_its_ranking(toy_beir: Path, tmp_path: Path, tiny) -> None:
    dataset = load_beir(toy_beir, "train")
    s = settings(tmp_path)
    negatives = mine_with_teacher(dataset, [Member("splade-tiny")], 3, settings=s)
    assert_no_positive(toy_beir, "train", negatives)
    doc_ids = list(dataset.corpus)
    docs = encode_sparse(tiny, [dataset.corpus[d] for d in doc_ids], max_length=64)
    for qid, mined in negatives.items():
        scores = (encode_sparse(tiny, [dataset.queries[qid]], max_length=64) @ docs.T).toarray()[0]
        positives = set(dataset.positives(qid))
        texts = {dataset.corpus[p] for p in positives}
        ranked = [doc_ids[i] for i in np.lexsort((np.arange(len(scores)), -scores))
                  if doc_ids[i] not in positives and dataset.corpus[doc_ids[i]] not in texts]
        assert mined == ranked[:3]
        skipped = mine_with_teacher(dataset, [Member("splade-tiny")], 2, skip_top=1, settings=s)[qid]
        assert skipped == ranked[1:3]
        sampled = mine_with_teacher(dataset, [Member("splade-tiny")], 2, sample_from=4, seed=1, settings=s)[qid]
        assert len(sampled) == 2 and set(sampled) <= set(ranked[:4])
        assert sampled == sorted(sampled, key=ranked.index)  # kept in rank order
    again = mine_with_teacher(dataset, [Member("splade-tiny")], 2, sample_from=4, seed=1, settings=s)
    assert again == mine_with_teacher(dataset, [Member("splade-tiny")], 2, sample_from=4, seed=1, settings=s)


def test_score_examples_bm25_and_ensemble(tmp_path: Path, tiny) -> None:
    from spladectl.data import Example

    examples = [Example("statins cholesterol", "statins lower cholesterol", ["the cat sat", "aspirin heart"]),
                Example("cat", "the cat sat", ["statins lower cholesterol", "aspirin heart"])]
    s = settings(tmp_path)
    bm25 = score_examples(examples, [Member("bm25:nostem")], s)
    assert bm25[0][0] > max(bm25[0][1:]) and bm25[1][0] > max(bm25[1][1:])
    assert bm25[0][1] == 0.0  # no shared word
    # a query of stopwords only has no term to match: zeros, not a crash
    assert score_examples([Example("what is it", "the cat sat", ["aspirin heart"])], [Member("bm25")], s) == [[0, 0]]
    model = score_examples(examples, [Member("splade-tiny")], s)
    q = encode_sparse(tiny, ["statins cholesterol"], max_length=64)
    d = encode_sparse(tiny, ["statins lower cholesterol", "the cat sat", "aspirin heart"], max_length=64)
    assert np.allclose(model[0], (q @ d.T).toarray()[0], rtol=1e-4)
    both = score_examples(examples, [Member("splade-tiny", 1.0), Member("bm25:nostem", 1.0)], s)
    for m, b, e in zip(model, bm25, both):
        assert np.allclose(e, ensemble([np.array(m), np.array(b)], [1, 1]), atol=1e-4)
        assert np.isclose(np.mean(e), np.mean(m), atol=1e-3)  # in the SPLADE member's units


def test_cli_mine_with_model_then_score_then_train(cli, toy_beir: Path, tmp_path: Path) -> None:
    mined = tmp_path / "mined.jsonl"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    result = cli("data", "mine", "--data", str(toy_beir), "--k", "3", "--model", "splade-tiny", "--skip-top", "1",
                 "--out", str(mined), "--json", "--no-progress", "--max-doc-length", "64", *cache)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["ranked_by"] == "1×splade-tiny, skip top 1" and summary["min_negatives"] == 3
    scored = tmp_path / "scored.jsonl"
    result = cli("data", "score", "--data", str(mined), "--teacher", "splade-tiny=0.5", "--teacher", "bm25:nostem=0.5",
                 "--corpus", str(toy_beir), "--out", str(scored), "--json", "--no-progress", "--max-doc-length", "64",
                 *cache)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    originals = [json.loads(line) for line in mined.read_text().splitlines()]
    assert [r["query_id"] for r in rows] == [o["query_id"] for o in originals]  # ids carried over
    assert all(len(r["negative_documents"]) == 3 and "score" in r["negative_documents"][0] for r in rows)
    examples = load_training_data(scored, show_progress=False)
    assert all(e.teacher_scores is not None and len(e.teacher_scores) == 4 for e in examples)
    # the scored file trains with the distillation term
    out = tmp_path / "run"
    result = cli("train", "--data", str(scored), "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2",
                 "--n-negatives", "2", "--precision", "32-true", "--max-doc-length", "64", "--distillation", "kl")
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # KL is ≥ 0 up to rounding: once student and teacher agree (a few 1e-9 below zero happens), it is not positive.
    assert all(m["kl"] > -1e-6 for m in metrics) and any(m["kl"] > 1e-6 for m in metrics), metrics


def test_cli_score_user_errors(cli, toy_beir: Path, tmp_path: Path) -> None:
    mined = tmp_path / "mined.jsonl"
    assert cli("data", "mine", "--data", str(toy_beir), "--k", "2", "--out", str(mined), "--no-progress").exit_code == 0
    out = tmp_path / "x.jsonl"
    out.write_text("keep me")
    assert "exists" in user_error(cli, "data", "score", "--data", str(mined), "--teacher", "bm25", "--out", str(out))
    assert out.read_text() == "keep me"
    assert "weight" in user_error(cli, "data", "score", "--data", str(mined), "--teacher", "bm25=-2", "--out",
                                  str(tmp_path / "y.jsonl"))
    assert "no such directory" in user_error(cli, "data", "score", "--data", str(mined), "--teacher", "./missing",
                                             "--out", str(tmp_path / "y.jsonl"), "--no-progress")
    assert not (tmp_path / "y.jsonl").exists()
    assert "at least --k" in user_error(cli, "data", "mine", "--data", str(toy_beir), "--k", "3", "--sample-from",
                                        "2", "--out", str(tmp_path / "z.jsonl"))
    assert "give one" in user_error(cli, "data", "mine", "--data", str(toy_beir), "--model", "splade-tiny",
                                    "--rank-by", "bm25", "--out", str(tmp_path / "z.jsonl"))


def test_csr_rows_stay_sparse(tmp_path: Path, tiny) -> None:
    out = encode_cached(tiny, ["one text"], 64, settings(tmp_path), desc="x")
    assert sp.issparse(out) and out.shape == (1, tiny.vocab_size)


def test_cli_mine_max_positives_keeps_the_most_relevant(cli, toy_beir: Path, tmp_path: Path) -> None:
    qrels = toy_beir / "qrels" / "train.tsv"
    # q3 has d6 (grade 1) and d5; make d5 the more relevant one
    qrels.write_text(qrels.read_text().replace("q3\td5\t1", "q3\td5\t2"))
    out = tmp_path / "mined.jsonl"
    result = cli("data", "mine", "--data", str(toy_beir), "--k", "2", "--max-positives", "1", "--out", str(out),
                 "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["query_id"], r["positive_id"]) for r in rows] == [("q1", "d1"), ("q2", "d3"), ("q3", "d5"),
                                                                  ("q4", "d8")]
    assert json.loads(result.stdout)["examples"] == 4
