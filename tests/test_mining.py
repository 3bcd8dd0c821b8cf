"""BM25 hard-negative mining: never a positive, cached by dataset state, and `spladectl data mine`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_data import user_error

from spladectl.data import load_beir, load_training_data, mine_hard_negatives, mining
from spladectl.data.mining import cached_hard_negatives

SCIFACT = Path(os.environ.get("SPLADECTL_SCIFACT", Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"))


def assert_no_positive(root: Path, split: str, negatives: dict[str, list[str]]) -> None:
    dataset = load_beir(root, split)
    for qid in dataset.queries:
        positives = set(dataset.positives(qid))
        positive_texts = {dataset.corpus[d] for d in positives}
        assert not positives & set(negatives.get(qid, [])), qid
        assert not positive_texts & {dataset.corpus[d] for d in negatives.get(qid, [])}, qid
        assert len(set(negatives.get(qid, []))) == len(negatives.get(qid, [])), f"{qid}: a negative twice"


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("k", [1, 3, 50])
def test_never_a_positive_on_the_fixture(toy_beir: Path, split: str, k: int) -> None:
    negatives = mine_hard_negatives(toy_beir, split, k, show_progress=False)
    dataset = load_beir(toy_beir, split)
    assert set(negatives) == {q for q in dataset.queries if dataset.positives(q)}
    assert_no_positive(toy_beir, split, negatives)
    for qid, docs in negatives.items():
        # the corpus minus the positives (and d11, d1's duplicate, for q1) caps what there is to mine
        assert len(docs) == min(k, 12 - len(dataset.positives(qid)) - (qid == "q1"))


def test_best_bm25_match_comes_first_and_judged_non_relevant_is_allowed(toy_beir: Path) -> None:
    negatives = mine_hard_negatives(toy_beir, "train", 3, show_progress=False)
    assert negatives["q1"][0] == "d12"  # "batteries store electricity from solar panels": q1 judged it 0
    assert "d11" not in negatives["q1"]  # the duplicate of its positive


def test_mine_from_a_loaded_dataset(toy_beir: Path) -> None:
    dataset = load_beir(toy_beir, "train")
    assert mine_hard_negatives(dataset, k=4, show_progress=False) == mine_hard_negatives(toy_beir, "train", 4,
                                                                                          show_progress=False)


def test_cache_is_reused_and_follows_the_files(toy_beir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = cached_hard_negatives(toy_beir, "train", 4, show_progress=False)
    files = list((toy_beir / ".spladectl-cache").iterdir())
    assert len(files) == 1 and "-train-k4-" in files[0].name

    def no_mining(*args, **kwargs):
        raise AssertionError("mined again although nothing changed")

    monkeypatch.setattr(mining, "mine_hard_negatives", no_mining)
    assert cached_hard_negatives(toy_beir, "train", 4, show_progress=False) == first

    # a changed qrels file (new mtime) is a new key: mined again, and the stale entry is replaced
    qrels = toy_beir / "qrels" / "train.tsv"
    stat = qrels.stat()
    os.utime(qrels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    monkeypatch.undo()
    cached_hard_negatives(toy_beir, "train", 4, show_progress=False)
    after = list((toy_beir / ".spladectl-cache").iterdir())
    assert len(after) == 1 and after[0].name != files[0].name


def test_read_only_dataset_caches_in_the_user_cache(toy_beir: Path, tmp_path: Path) -> None:
    toy_beir.chmod(0o555)
    try:
        cached_hard_negatives(toy_beir, "train", 2, show_progress=False)
    finally:
        toy_beir.chmod(0o755)
    assert not (toy_beir / ".spladectl-cache").exists()
    assert len(list((tmp_path / "user-cache" / "spladectl" / "negatives").glob("negatives-*.json"))) == 1


def test_explicit_cache_dir(toy_beir: Path, tmp_path: Path) -> None:
    load_training_data(toy_beir, mine_k=2, cache_dir=tmp_path / "mine", show_progress=False)
    assert len(list((tmp_path / "mine").glob("negatives-*-train-k2-*.json"))) == 1
    assert not (toy_beir / ".spladectl-cache").exists()


def test_damaged_cache_is_mined_again(toy_beir: Path) -> None:
    first = cached_hard_negatives(toy_beir, "train", 2, show_progress=False)
    (entry,) = (toy_beir / ".spladectl-cache").iterdir()
    entry.write_text("{half a file")
    assert cached_hard_negatives(toy_beir, "train", 2, show_progress=False) == first


def test_cli_data_mine(cli, toy_beir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "triples.jsonl"
    result = cli("data", "mine", "--data", str(toy_beir), "--split", "train", "--k", "3", "--out", str(out), "--json",
                 "--no-progress")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["examples"] == 5 and summary["queries"] == 4 and summary["min_negatives"] == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["query_id"] for r in rows] == ["q1", "q2", "q3", "q3", "q4"]
    dataset = load_beir(toy_beir, "train")
    for row in rows:
        assert row["positive_id"] in dataset.positives(row["query_id"])
        assert row["positive_document"] == dataset.corpus[row["positive_id"]]
        assert row["negative_documents"] == [dataset.corpus[d] for d in row["negative_ids"]]
        assert not set(row["negative_ids"]) & set(dataset.positives(row["query_id"]))
    # the output is training data in our seed format
    examples = load_training_data(out, show_progress=False)
    assert len(examples) == 5 and all(len(e.negatives) == 3 for e in examples)

    human = cli("data", "mine", "--data", str(toy_beir), "--k", "3", "--out", str(out), "--no-progress")
    assert human.exit_code == 0 and "5 examples written" in human.output


def test_cli_data_mine_user_errors(cli, toy_beir: Path, tmp_path: Path) -> None:
    assert "no qrels for split 'dev'" in user_error(cli, "data", "mine", "--data", str(toy_beir), "--split", "dev",
                                                    "--out", str(tmp_path / "x.jsonl"))
    (tmp_path / "dir.jsonl").mkdir()
    assert "cannot write" in user_error(cli, "data", "mine", "--data", str(toy_beir), "--out",
                                        str(tmp_path / "dir.jsonl"), "--no-progress")


@pytest.mark.skipif(not (SCIFACT / "corpus.jsonl").is_file(), reason=f"SciFact is not at {SCIFACT}")
def test_never_a_positive_on_scifact_train(tmp_path: Path) -> None:
    negatives = cached_hard_negatives(SCIFACT, "train", 50, cache_dir=tmp_path, show_progress=False)
    assert len(negatives) == 809 and all(len(v) == 50 for v in negatives.values())
    assert_no_positive(SCIFACT, "train", negatives)
