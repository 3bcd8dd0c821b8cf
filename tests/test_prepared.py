"""Prepared training data (`spladectl data prepare`): the same examples as the file it came from, read on demand from
a memory-mapped Arrow file, and a training run on it equal to one on the file."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from spladectl import plugin_loading
from spladectl.data import load_training_data, read_jsonl, read_tsv_triples
from spladectl.data.prepared import MANIFEST, PreparedExamples, prepare
from spladectl.engine import Trainer
from spladectl.errors import DataError
import tiny


def scored_jsonl(path, n=8):
    rows = [{"query": q, "positive_document": p, "positive_score": 10.0 - i,
             "negative_documents": [{"document": neg, "score": 2.5 + i}, {"document": f"{neg} again", "score": 1.0}],
             "id": f"row{i}"} for i, (q, p, neg) in enumerate(tiny.TOPICS[:n])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prepared_examples_equal_the_files_rows(tmp_path):
    source = scored_jsonl(tmp_path / "train.jsonl")
    manifest = prepare(source, tmp_path / "prepared", fmt="jsonl")
    examples = load_training_data(tmp_path / "prepared")
    assert isinstance(examples, PreparedExamples)
    assert list(examples) == read_jsonl(source)  # queries, texts, negatives, teacher scores and file:line sources
    assert manifest["rows"] == len(examples) == 8
    assert (manifest["min_negatives"], manifest["max_negatives"], manifest["teacher_scores"]) == (2, 2, True)
    assert examples[-1] == examples[7] and examples[2:4] == [examples[2], examples[3]]
    with pytest.raises(IndexError):
        examples[8]
    copy = pickle.loads(pickle.dumps(examples))  # a spawned DataLoader worker re-maps the file
    assert copy.path == examples.path and list(copy) == list(examples)
    assert len(pickle.dumps(examples)) < 500


def test_tsv_groups_adjacent_lines_of_one_query_and_positive(tmp_path):
    lines = ["q1\tp1\tn1", "q1\tp1\tn2\tn3", "q2\tp2\tn4", "q1\tp1\tn5"]
    source = tmp_path / "triples.tsv"
    source.write_text("\n".join(lines) + "\n")
    prepare(source, tmp_path / "prepared", fmt="tsv")
    rows = [(e.query, e.positive, e.negatives, e.source) for e in PreparedExamples(tmp_path / "prepared")]
    assert rows == [("q1", "p1", ["n1", "n2", "n3"], f"{source}:1"), ("q2", "p2", ["n4"], f"{source}:3"),
                    ("q1", "p1", ["n5"], f"{source}:4")]
    # Reading the file directly groups the non-adjacent line too: sorted input gives the same examples both ways.
    ordered = tmp_path / "sorted.tsv"
    ordered.write_text("\n".join(sorted(lines)) + "\n")
    prepare(ordered, tmp_path / "sorted", fmt="tsv")
    direct = read_tsv_triples(ordered)
    assert [(e.query, e.negatives) for e in PreparedExamples(tmp_path / "sorted")] == \
        [(e.query, e.negatives) for e in direct]


def final_weights(trainer):
    trainer.fit()
    return {k: v.clone() for k, v in trainer.state.model.state_dict().items()}


@pytest.mark.parametrize("workers", [0, 1])
def test_training_on_prepared_data_equals_training_on_the_file(tmp_path, workers):
    source = scored_jsonl(tmp_path / "train.jsonl")
    prepare(source, tmp_path / "prepared", fmt="jsonl")
    runs = {}
    for name, examples in [("file", read_jsonl(source)), ("prepared", load_training_data(tmp_path / "prepared"))]:
        pm = plugin_loading.make_plugin_manager(installed=False)
        config = tiny.config(tmp_path / name, max_steps=3, n_negatives=2, distillation="margin-mse",
                             dataloader_workers=workers)
        runs[name] = (final_weights(Trainer(config, examples, pm=pm, progress=False)),
                      tiny.metrics_rows(tmp_path / name))
    (file_weights, file_rows), (prepared_weights, prepared_rows) = runs["file"], runs["prepared"]
    assert all(torch.equal(file_weights[k], prepared_weights[k]) for k in file_weights)
    assert [r["loss"] for r in file_rows] == [r["loss"] for r in prepared_rows]
    assert "margin-mse" in prepared_rows[0]  # the teacher scores came through


def test_a_bad_row_names_its_line_and_nothing_is_written(tmp_path):
    source = tmp_path / "train.jsonl"
    good = json.dumps({"query": "q", "positive_document": "p", "negative_documents": ["n"]})
    source.write_text(good + "\n" + json.dumps({"query": "q2", "negative_documents": ["n"]}) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: missing field 'positive_document'"):
        prepare(source, tmp_path / "prepared", fmt="jsonl")
    assert not (tmp_path / "prepared").exists() and list(tmp_path.iterdir()) == [source]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(good + "\n" + json.dumps({"query": "q", "positive_document": "p", "positive_score": 1.0,
                                               "negative_documents": [{"document": "n", "score": 0.5}]}) + "\n")
    with pytest.raises(DataError, match="teacher scores on some rows only"):
        prepare(mixed, tmp_path / "prepared", fmt="jsonl")
    assert not (tmp_path / "prepared").exists()


def test_a_damaged_prepared_directory_is_refused(tmp_path):
    prepare(tiny.write_jsonl(tmp_path / "train.jsonl"), tmp_path / "prepared", fmt="jsonl")
    table = tmp_path / "prepared" / "part-00000.arrow"
    table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    with pytest.raises(DataError, match=r"part-00000\.arrow: unreadable"):
        load_training_data(tmp_path / "prepared")
    (tmp_path / "prepared" / MANIFEST).write_text("{}")
    with pytest.raises(DataError, match="not a prepared-examples manifest"):
        load_training_data(tmp_path / "prepared")


def test_cli_prepares_refuses_an_existing_output_and_trains_on_it(tmp_path, cli):
    source = tiny.write_jsonl(tmp_path / "train.jsonl")
    out = tmp_path / "prepared"
    result = cli("data", "prepare", str(source), str(out), "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rows"] == 8
    again = cli("data", "prepare", str(source), str(out), "--no-progress")
    assert again.exit_code == 2 and "exists" in again.output and "--overwrite" in again.output
    assert cli("data", "prepare", str(source), str(out), "--overwrite", "--no-progress").exit_code == 0
    trained = cli("train", "--data", str(out), "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
                  "--batch-size", "4", "--max-query-length", "16", "--max-doc-length", "32", "--precision",
                  "32-true", "--no-progress")
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("fmt", ["jsonl", "tsv"])
def test_an_interrupted_preparation_continues_after_its_last_whole_part(tmp_path, monkeypatch, fmt):
    from spladectl.data import prepared

    if fmt == "jsonl":
        source = scored_jsonl(tmp_path / "train.jsonl")
    else:  # grouped lines: a part must end between examples, never inside one
        source = tmp_path / "train.tsv"
        source.write_text("".join(f"q{i // 2}\tp{i // 2}\tn{i}\n" for i in range(16)))
    monkeypatch.setattr(prepared, "PART_ROWS", 3)
    whole = prepare(source, tmp_path / "whole", fmt=fmt)
    assert len(whole["parts"]) == 3 and whole["rows"] == 8

    write_part = prepared._write_part
    calls = []

    def killed_on_the_second_part(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill between two parts leaves it
        write_part(*args, **kwargs)

    monkeypatch.setattr(prepared, "_write_part", killed_on_the_second_part)
    with pytest.raises(KeyboardInterrupt):
        prepare(source, tmp_path / "out", fmt=fmt)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.preparing" / "part-00000.arrow").is_file()
    monkeypatch.setattr(prepared, "_write_part", write_part)
    starts = []
    stream = prepared.stream_examples
    monkeypatch.setattr(prepared, "stream_examples", lambda path, f, start=1: starts.append(start) or stream(path, f, start))
    said = []
    manifest = prepare(source, tmp_path / "out", fmt=fmt, log=said.append)
    assert starts[0] > 1 and "continuing: 3 rows in 1 part(s)" in said[0]  # it did not read the first part again
    assert list(PreparedExamples(tmp_path / "out")) == list(PreparedExamples(tmp_path / "whole"))
    assert manifest["rows"] == 8 and not (tmp_path / ".out.preparing").exists()
    # the source changed since: start over
    source.write_text(source.read_text() + source.read_text().splitlines(keepends=True)[0])
    monkeypatch.setattr(prepared, "_write_part", killed_on_the_second_part)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        prepare(source, tmp_path / "again", fmt=fmt)
    source.write_text(source.read_text() + "\n")
    monkeypatch.setattr(prepared, "_write_part", write_part)
    starts.clear()
    prepare(source, tmp_path / "again", fmt=fmt)
    assert starts == [1]
