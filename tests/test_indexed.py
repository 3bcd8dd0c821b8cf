"""Large JSONL and TSV files read a row at a time (spladectl.data.indexed): the same examples as reading the file
whole, the same training, a row index cached and rebuilt when the file changes, and bad rows named when reached.
INDEX_BYTES is lowered so that small files take the large-file path."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from spladectl import plugin_loading
from spladectl.data import indexed, load_training_data, read_jsonl
from spladectl.data.examples import SAMPLE_ROWS
from spladectl.data.indexed import IndexedExamples
from spladectl.engine import Trainer
from spladectl.errors import DataError
from test_prepared import final_weights, scored_jsonl
import tiny


@pytest.fixture(autouse=True)
def every_file_is_large(monkeypatch):
    monkeypatch.setattr(indexed, "INDEX_BYTES", 0)


def rows(n: int, start: int = 0) -> list[str]:
    return [json.dumps({"query": f"query {i}", "positive_document": f"positive {i}",
                        "negative_documents": [f"negative {i}", f"other {i}"]}) for i in range(start, start + n)]


def test_the_rows_are_the_files_rows_with_their_lines(tmp_path):
    source = tmp_path / "train.jsonl"
    lines = rows(40)
    lines[3] += "\r\n   \r\n"  # a blank line of spaces after row 4, CRLF line ends, a BOM, no final newline
    source.write_text("\ufeff" + "\r\n".join(lines), encoding="utf-8")
    examples = load_training_data(source)
    assert isinstance(examples, IndexedExamples)
    assert list(examples) == read_jsonl(source)  # texts, negatives and file:line sources
    assert examples[4].source == f"{source}:7" and len(examples) == 40 and examples[-1] == examples[39]
    with pytest.raises(IndexError):
        examples[40]
    copy = pickle.loads(pickle.dumps(examples))  # what a DataLoader worker gets
    assert copy.index_file == examples.index_file and list(copy) == list(examples)
    tsv = tmp_path / "triples.tsv"
    tsv.write_text("q1\tp1\tn1\nq1\tp1\tn2\tn3\n\nq2\tp2\tn4\n")
    # one example per line (reading the file whole would group the first two)
    assert [(e.query, e.negatives, e.source) for e in load_training_data(tsv)] == \
        [("q1", ["n1"], f"{tsv}:1"), ("q1", ["n2", "n3"], f"{tsv}:2"), ("q2", ["n4"], f"{tsv}:4")]


def test_the_row_index_is_cached_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    source = tmp_path / "train.jsonl"
    source.write_text("\n".join(rows(5)) + "\n")
    first = IndexedExamples(source, "jsonl")
    assert first.index_file.is_file() and first.index_file.parent == tmp_path / ".spladectl-cache"
    scans = []
    build = indexed.row_index
    monkeypatch.setattr(indexed, "row_index", lambda *a, **k: scans.append(1) or build(*a, **k))
    assert len(IndexedExamples(source, "jsonl")) == 5 and scans == []  # the cached index
    source.write_text("\n".join(rows(7)) + "\n")
    again = IndexedExamples(source, "jsonl")
    assert len(again) == 7 and scans == [1] and not first.index_file.exists()  # rebuilt, the stale one removed


@pytest.mark.parametrize("workers", [0, 1])
def test_training_on_a_file_read_by_offset_equals_training_on_it_in_memory(tmp_path, workers):
    source = scored_jsonl(tmp_path / "train.jsonl")
    runs = {}
    for name, examples in [("memory", read_jsonl(source)), ("offset", load_training_data(source))]:
        pm = plugin_loading.make_plugin_manager(installed=False)
        config = tiny.config(tmp_path / name, max_steps=3, n_negatives=2, distillation="margin-mse",
                             dataloader_workers=workers)
        runs[name] = (final_weights(Trainer(config, examples, pm=pm, progress=False)),
                      tiny.metrics_rows(tmp_path / name))
    assert isinstance(examples, IndexedExamples)
    (memory_weights, memory_rows), (offset_weights, offset_rows) = runs["memory"], runs["offset"]
    assert all(torch.equal(memory_weights[k], offset_weights[k]) for k in memory_weights)
    assert [r["loss"] for r in memory_rows] == [r["loss"] for r in offset_rows]


def test_a_bad_row_past_the_sample_is_named_when_training_reaches_it(tmp_path, cli):
    source = tmp_path / "train.jsonl"
    bad_line = SAMPLE_ROWS + 3
    lines = rows(SAMPLE_ROWS + 5)
    lines[bad_line - 1] = json.dumps({"query": "q", "negative_documents": ["n"]})
    source.write_text("\n".join(lines) + "\n")
    examples = load_training_data(source)  # opening reads the sample only
    assert len(examples) == SAMPLE_ROWS + 5
    with pytest.raises(DataError, match=rf"train\.jsonl:{bad_line}: missing field 'positive_document'"):
        examples[bad_line - 1]
    lines[bad_line - 1] = json.dumps({"query": "q", "positive_document": "p", "negative_documents": ["n"]})
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf":{bad_line}: 1 negative\(s\), but each of the first {SAMPLE_ROWS} rows"):
        load_training_data(source)[bad_line - 1]
    lines[bad_line - 1] = json.dumps({"query": "q", "positive_document": "p", "positive_score": 2.0,
                                      "negative_documents": [{"document": "n", "score": 1.0}] * 2})
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="teacher scores on some rows only"):
        load_training_data(source)[bad_line - 1]
    # the command: a run that reaches the row stops with its file and line, exit 2, no traceback
    result = cli("train", "--data", str(source), "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
                 "--batch-size", str(SAMPLE_ROWS + 5), "--max-query-length", "8", "--max-doc-length", "8",
                 "--precision", "32-true", "--no-progress")
    assert result.exit_code == 2 and "teacher scores on some rows only" in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("source", ["offset", "prepared"])
def test_a_run_on_large_data_resumes_to_the_exact_micro_batch(tmp_path, pm, registered, source):
    """Killed after a checkpoint in the middle of an epoch, resumed: the same weights and losses as a straight run."""
    from spladectl.checkpoint import find_checkpoint
    from spladectl.data.prepared import prepare
    from test_engine import KilledAfterCheckpoint, weights

    data = tiny.write_jsonl(tmp_path / "train.jsonl")
    if source == "prepared":
        prepare(data, tmp_path / "prepared", fmt="jsonl")
        data = tmp_path / "prepared"

    def trainer(name, **overrides):
        return Trainer(tiny.config(tmp_path / name, max_steps=6, batch_size=2, **overrides),
                       load_training_data(data), pm=pm, progress=False)

    straight = trainer("s")
    straight.fit()
    killer = registered(KilledAfterCheckpoint())
    with pytest.raises(KeyboardInterrupt):
        trainer("r", save_every=3).fit()
    pm.unregister(killer)
    resumed = trainer("r")
    resumed.resume(find_checkpoint("latest", tmp_path / "r" / "out"))
    assert resumed.state.step == 3 and resumed.state.position == 3  # 3 of the epoch's 4 micro-batches done
    resumed.fit()
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in tiny.metrics_rows(tmp_path / "s")] == [r["loss"] for r in tiny.metrics_rows(tmp_path / "r")]
