"""Training-data readers (seed JSON, JSONL, TSV triples, BEIR) and their validation errors.

`toy_beir` (a 12-document BEIR directory with CRLF qrels under a header) is imported by the other data/eval tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spladectl.data import (
    Example,
    detect_format,
    load_beir,
    load_training_data,
    select_negatives,
)
from spladectl.errors import DataError

TOY_CORPUS = {
    "d1": {"title": "Solar panels", "text": "Photovoltaic cells convert sunlight into electricity for homes."},
    "d2": {"title": "Wind turbines", "text": "Wind turbines generate electricity from moving air."},
    "d3": {"title": "Coffee brewing", "text": "Espresso is brewed by forcing hot water through finely ground coffee."},
    "d4": {"title": "Tea", "text": "Green tea leaves are steamed to preserve their color and flavor."},
    "d5": {"title": "Volcanoes", "text": "Magma rises through the crust and erupts as lava from volcanoes."},
    "d6": {"title": "Earthquakes", "text": "Tectonic plates slip along faults and cause earthquakes."},
    "d7": {"title": "Python", "text": "Python is a programming language with dynamic typing."},
    "d8": {"title": "Rust", "text": "Rust is a programming language focused on memory safety."},
    "d9": {"title": "Bread", "text": "Yeast ferments sugars and makes bread dough rise."},
    "d10": {"title": "Cheese", "text": "Bacteria and rennet turn milk into cheese."},
    # the same text as d1 under another id: a duplicate of a positive must never be mined as a negative
    "d11": {"title": "Solar panels", "text": "Photovoltaic cells convert sunlight into electricity for homes."},
    "d12": {"title": "Batteries", "text": "Lithium batteries store electricity from solar panels and wind turbines."},
}
TOY_QUERIES = {
    "q1": "how do solar panels make electricity",
    "q2": "how is espresso coffee brewed",
    "q3": "what causes earthquakes and volcanoes",
    "q4": "programming language with memory safety",
    "q5": "how does yeast make bread rise",
    "q6": "how is cheese made from milk",
    "q7": "electricity from wind",
}
TOY_QRELS = {
    "train": {"q1": {"d1": 1, "d12": 0}, "q2": {"d3": 1}, "q3": {"d6": 1, "d5": 1}, "q4": {"d8": 1}},
    "test": {"q5": {"d9": 1}, "q6": {"d10": 1}, "q7": {"d2": 1, "d12": 1}},
}


def write_toy_beir(root: Path) -> Path:
    """The toy dataset as BEIR publishes it: JSONL corpus and queries, qrels with a header and CRLF endings."""
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for doc_id, doc in TOY_CORPUS.items():
            handle.write(json.dumps({"_id": doc_id, **doc, "metadata": {}}) + "\n")
    with open(root / "queries.jsonl", "w", encoding="utf-8") as handle:
        for query_id, text in TOY_QUERIES.items():
            handle.write(json.dumps({"_id": query_id, "text": text, "metadata": {}}) + "\n")
    for split, judgments in TOY_QRELS.items():
        rows = ["query-id\tcorpus-id\tscore"]
        rows += [f"{q}\t{d}\t{s}" for q, docs in judgments.items() for d, s in docs.items()]
        (root / "qrels" / f"{split}.tsv").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    return root


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def assert_data_error(path_or_call, where: str, *words: str) -> DataError:
    """The call raises a DataError whose message starts with file:line and mentions `words`."""
    with pytest.raises(DataError) as info:
        path_or_call() if callable(path_or_call) else load_training_data(path_or_call, show_progress=False)
    message = str(info.value)
    assert message.startswith(where + ":"), message
    for word in words:
        assert word in message, message
    return info.value


# ---- seed JSON -----------------------------------------------------------------------------------------------------


def test_seed_json_strings_objects_and_sources(tmp_path: Path) -> None:
    path = write(tmp_path / "train.json", (
        '[\n'
        '  {"query": "q a", "positive_document": "pos a",\n'
        '   "negative_documents": ["neg 1", {"document": "neg 2"}]},\n'
        '\n'
        '  {"query": "q b", "positive_document": "pos b", "negative_documents": [], "id": 7}\n'
        ']\n'
    ))
    examples = load_training_data(path, show_progress=False)
    assert examples == [
        Example("q a", "pos a", ["neg 1", "neg 2"], None, f"{path}:2"),
        Example("q b", "pos b", [], None, f"{path}:5"),
    ]


def test_seed_json_teacher_scores(tmp_path: Path) -> None:
    path = write(tmp_path / "distill.json", json.dumps([
        {"query": "q", "positive_document": "p", "positive_score": 9.5,
         "negative_documents": [{"document": "n1", "score": 3}, {"document": "n2", "score": -1.25}]},
    ]))
    (example,) = load_training_data(path, show_progress=False)
    assert example.negatives == ["n1", "n2"]
    assert example.teacher_scores == [9.5, 3.0, -1.25]


def test_jsonl_with_crlf_and_blank_lines(tmp_path: Path) -> None:
    rows = [
        json.dumps({"query": "q1", "positive_document": "p1", "negative_documents": ["n1"]}),
        "",
        json.dumps({"query": "q2", "positive_document": "p2", "negative_documents": ["n2", "n3"]}),
    ]
    path = tmp_path / "train.jsonl"
    path.write_bytes("\r\n".join(rows).encode())
    examples = load_training_data(path, show_progress=False)
    assert [(e.query, e.negatives, e.source) for e in examples] == [
        ("q1", ["n1"], f"{path}:1"), ("q2", ["n2", "n3"], f"{path}:3"),
    ]


def test_jsonl_teacher_scores_round_trip(tmp_path: Path) -> None:
    from spladectl.data.examples import iter_records

    row = {"query": "q", "positive_document": "p", "positive_score": 1.0,
           "negative_documents": [{"document": "n", "score": 0.5}]}
    path = write(tmp_path / "a.jsonl", json.dumps(row) + "\n")
    examples = load_training_data(path, show_progress=False)
    assert list(iter_records(examples)) == [row]


def test_tsv_triples_group_negatives_of_a_pair(tmp_path: Path) -> None:
    path = tmp_path / "triples.tsv"
    path.write_bytes(b"q1\tp1\tn1\r\nq1\tp1\tn2\r\nq1\tp2\tn3\r\nq2\tp3\tn4\tn5\r\n")
    examples = load_training_data(path, show_progress=False)
    assert [(e.query, e.positive, e.negatives, e.source) for e in examples] == [
        ("q1", "p1", ["n1", "n2"], f"{path}:1"),
        ("q1", "p2", ["n3"], f"{path}:3"),
        ("q2", "p3", ["n4", "n5"], f"{path}:4"),
    ]


def test_format_detection(tmp_path: Path, toy_beir: Path) -> None:
    assert detect_format(toy_beir) == "beir"
    assert detect_format(write(tmp_path / "x.json", "[]")) == "json"
    assert detect_format(write(tmp_path / "x.txt", '{"query": 1}\n')) == "jsonl"
    assert detect_format(write(tmp_path / "triples", "a\tb\tc\n")) == "tsv"
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format(write(tmp_path / "notes", "hello\n"))
    with pytest.raises(DataError, match="no such file"):
        detect_format(tmp_path / "missing.jsonl")


# ---- negatives per example -------------------------------------------------------------------------------------------


def test_select_negatives_rotates_per_query_and_cycles() -> None:
    negatives = ["n0", "n1", "n2"]
    examples = [
        Example("q", "p1", negatives, [10.0, 0.0, 1.0, 2.0]),
        Example("q", "p2", negatives, [10.0, 0.0, 1.0, 2.0]),
        Example("other", "p", ["m0"]),
    ]
    picked = select_negatives(examples, 2)
    assert [e.negatives for e in picked] == [["n0", "n1"], ["n2", "n0"], ["m0", "m0"]]
    assert picked[1].teacher_scores == [10.0, 2.0, 0.0]
    assert select_negatives(examples, None) is examples
    assert select_negatives(examples, 2) == picked  # deterministic


def test_n_negatives_with_an_example_without_negatives(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", json.dumps({"query": "q", "positive_document": "p", "negative_documents": []}))
    assert load_training_data(path, show_progress=False)[0].negatives == []
    assert_data_error(lambda: load_training_data(path, n_negatives=1), f"{path}:1", "no negative documents")


# ---- malformed files: DataError at file:line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ('[\n  {"query": "q", "positive_document": "p", "negative_documents": []},\n  {"query": "q",,}\n]', 3,
         ["invalid JSON"]),
        ('[\n  {"query": "q", "negative_documents": ["n"]}\n]', 2, ["missing field 'positive_document'"]),
        ('[{"query": "q", "positive_document": "p"}]', 1, ["missing field 'negative_documents'"]),
        ('[\n{"query": "  ", "positive_document": "p", "negative_documents": []}]', 2, ["'query' is empty"]),
        ('[{"query": "q", "positive_document": "p", "negative_documents": ["n", ""]}]', 1,
         ["negative_documents[1] is empty"]),
        ('[{"query": "q", "positive_document": "p", "negative_documents": [{"text": "n"}]}]', 1,
         ["negative_documents[0]", "missing field 'document'"]),
        ('[{"query": "q", "positive_document": "p", "negative_documents": "n"}]', 1, ["must be a list"]),
        ('[{"query": 3, "positive_document": "p", "negative_documents": []}]', 1, ["must be a string"]),
        ('[\n"just text"\n]', 2, ["expected an object"]),
        ('{"query": "q"}', 1, ["expected a JSON list"]),
        ('[{"query": "q", "positive_document": "p", "negative_documents": []}] extra', 1, ["extra data"]),
        ('[{"query": "q", "positive_document": "p", "positive_score": 1,\n "negative_documents": ["n"]}]', 1,
         ["score", "negative_documents[0]"]),
        ('[{"query": "q", "positive_document": "p", "negative_documents": [{"document": "n", "score": 1}]}]', 1,
         ["positive_score"]),
        ('[{"query": "q", "positive_document": "p", "positive_score": "high", "negative_documents": []}]', 1,
         ["finite number"]),
        ('[{"query": "q", "positive_document": "p", "positive_score": 1, "negative_documents": []},\n'
         ' {"query": "q", "positive_document": "p", "negative_documents": []}]', 2, ["teacher scores on some rows"]),
        ("[]", None, ["no examples"]),
    ],
)
def test_malformed_seed_json(tmp_path: Path, text: str, line: int | None, words: list[str]) -> None:
    path = write(tmp_path / "bad.json", text)
    assert_data_error(path, f"{path}:{line}" if line else str(path), *words)


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    good = json.dumps({"query": "q", "positive_document": "p", "negative_documents": ["n"]})
    path = write(tmp_path / "bad.jsonl", f"{good}\n{good}\n{{not json\n")
    assert_data_error(path, f"{path}:3", "invalid JSON")
    path = write(tmp_path / "bad2.jsonl", f"{good}\n[1, 2]\n")
    assert_data_error(path, f"{path}:2", "expected a JSON object")
    empty = json.dumps({"query": "q", "positive_document": "", "negative_documents": []})
    path = write(tmp_path / "bad3.jsonl", f"{good}\n{empty}\n")
    assert_data_error(path, f"{path}:2", "'positive_document' is empty")


def test_malformed_tsv(tmp_path: Path) -> None:
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"q\tp\tn\r\nq\tp\r\n")
    assert_data_error(path, f"{path}:2", "expected 3 tab-separated columns", "found 2")
    path.write_bytes(b"q\tp\tn\r\nq\t \tn\r\n")
    assert_data_error(path, f"{path}:2", "column 2 (positive) is empty")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"query": "caf\xe9"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        load_training_data(path)


# ---- BEIR ----------------------------------------------------------------------------------------------------------


def test_load_beir_crlf_header_and_title_join(toy_beir: Path) -> None:
    dataset = load_beir(toy_beir, "train")
    assert dataset.corpus["d1"] == "Solar panels Photovoltaic cells convert sunlight into electricity for homes."
    assert list(dataset.queries) == ["q1", "q2", "q3", "q4"]  # only the split's queries, in qrels order
    assert dataset.qrels["q1"] == {"d1": 1, "d12": 0}
    assert dataset.positives("q3") == ["d6", "d5"]
    assert dataset.qrels_lines[("q1", "d1")] == 2  # the header is line 1
    assert load_beir(toy_beir, "test").queries.keys() == {"q5", "q6", "q7"}


def test_beir_training_examples_one_per_positive(toy_beir: Path) -> None:
    examples = load_training_data(toy_beir, split="train", mine_k=3, show_progress=False)
    assert [(e.query, e.positive.split()[0]) for e in examples] == [
        ("how do solar panels make electricity", "Solar"),
        ("how is espresso coffee brewed", "Coffee"),
        ("what causes earthquakes and volcanoes", "Earthquakes"),
        ("what causes earthquakes and volcanoes", "Volcanoes"),
        ("programming language with memory safety", "Rust"),
    ]
    assert all(len(e.negatives) == 3 for e in examples)
    assert examples[0].source == f"{toy_beir / 'qrels' / 'train.tsv'}:2"
    # the cache sits beside the data and is used the second time
    cached = list((toy_beir / ".spladectl-cache").glob("negatives-*-train-k3-*.json"))
    assert len(cached) == 1
    assert load_training_data(toy_beir, split="train", mine_k=3, show_progress=False) == examples


def test_beir_examples_with_n_negatives_rotate(toy_beir: Path) -> None:
    examples = load_training_data(toy_beir, split="train", n_negatives=2, mine_k=4, show_progress=False)
    earthquakes, volcanoes = examples[2], examples[3]
    assert len(earthquakes.negatives) == len(volcanoes.negatives) == 2
    assert not set(earthquakes.negatives) & set(volcanoes.negatives)  # the second pair starts 2 further on


def beir_variant(root: Path, *, corpus=None, queries=None, qrels: bytes | None = None, split="train") -> Path:
    write_toy_beir(root)
    if corpus is not None:
        (root / "corpus.jsonl").write_text(corpus, encoding="utf-8")
    if queries is not None:
        (root / "queries.jsonl").write_text(queries, encoding="utf-8")
    if qrels is not None:
        (root / "qrels" / f"{split}.tsv").write_bytes(qrels)
    return root


@pytest.mark.parametrize(
    ("qrels", "line", "words"),
    [
        (b"query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\nq99\td1\t1\r\n", 3,
         ["query id 'q99' is not in", "queries.jsonl"]),
        (b"query-id\tcorpus-id\tscore\r\nq1\td404\t1\r\n", 2, ["corpus id 'd404' is not in", "corpus.jsonl"]),
        (b"query-id\tcorpus-id\tscore\r\nq1\td1\tyes\r\n", 2, ["not an integer"]),
        (b"query-id\tcorpus-id\tscore\r\nq1\td1\r\n", 2, ["expected 3 tab-separated columns"]),
        (b"query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\nq1\td1\t0\r\n", 3, ["judged again", "line 2"]),
    ],
)
def test_beir_bad_qrels(tmp_path: Path, qrels: bytes, line: int, words: list[str]) -> None:
    root = beir_variant(tmp_path / "b", qrels=qrels)
    assert_data_error(lambda: load_beir(root, "train"), f"{root / 'qrels' / 'train.tsv'}:{line}", *words)
    assert_data_error(lambda: load_training_data(root, show_progress=False), f"{root / 'qrels' / 'train.tsv'}:{line}")


def test_beir_trec_style_qrels_without_header(tmp_path: Path) -> None:
    root = beir_variant(tmp_path / "b", qrels=b"q1 0 d1 1\nq2 0 d3 2\n")
    assert load_beir(root, "train").qrels == {"q1": {"d1": 1}, "q2": {"d3": 2}}


@pytest.mark.parametrize(
    ("corpus", "line", "words"),
    [
        ('{"_id": "d1", "title": "t", "text": "x"}\n{"_id": "d2", "title": "", "text": "  "}\n', 2,
         ["empty title and text"]),
        ('{"_id": "d1", "title": "t", "text": "x"}\n{"_id": "d1", "title": "t", "text": "y"}\n', 2,
         ["duplicate document id 'd1'", "line 1"]),
        ('{"_id": "d1", "title": "t"}\n', 1, ["missing field 'text'"]),
        ('{"title": "t", "text": "x"}\n', 1, ["missing field '_id'"]),
        ('{"_id": "d1", "text": "x"\n', 1, ["invalid JSON"]),
    ],
)
def test_beir_bad_corpus(tmp_path: Path, corpus: str, line: int, words: list[str]) -> None:
    root = beir_variant(tmp_path / "b", corpus=corpus)
    assert_data_error(lambda: load_beir(root, "train"), f"{root / 'corpus.jsonl'}:{line}", *words)


def test_beir_bad_queries(tmp_path: Path) -> None:
    root = beir_variant(tmp_path / "b", queries='{"_id": "q1", "text": "ok"}\n{"_id": "q2", "text": ""}\n')
    assert_data_error(lambda: load_beir(root, "train"), f"{root / 'queries.jsonl'}:2", "'text' is empty")


def test_beir_missing_pieces(tmp_path: Path, toy_beir: Path) -> None:
    with pytest.raises(DataError, match=r"no qrels for split 'dev'.*splits found: test, train"):
        load_beir(toy_beir, "dev")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a BEIR directory"):
        load_beir(tmp_path / "empty", "test")
    with pytest.raises(DataError, match="no such directory"):
        load_beir(tmp_path / "nowhere", "test")


def test_write_beir_round_trip(tmp_path: Path) -> None:
    from spladectl.data import write_beir

    root = write_beir(tmp_path / "w", {"a": {"title": "T", "text": "x"}, "b": "y"}, {"q": "query"},
                      {"dev": {"q": {"a": 1, "b": 0}}})
    dataset = load_beir(root, "dev")
    assert dataset.corpus == {"a": "T x", "b": "y"} and dataset.qrels == {"q": {"a": 1, "b": 0}}


# ---- CLI: data validate / data stats -------------------------------------------------------------------------------


def test_cli_validate_and_stats(cli, toy_beir: Path, tmp_path: Path) -> None:
    result = cli("data", "validate", str(toy_beir))
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and "12 documents" in result.output

    result = cli("data", "stats", str(toy_beir), "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["documents"] == 12 and stats["splits"]["train"]["positives"] == 5

    path = write(tmp_path / "t.jsonl", json.dumps({"query": "a b", "positive_document": "c d e",
                                                   "negative_documents": ["f", "g h"]}) + "\n")
    stats = json.loads(cli("data", "stats", str(path), "--json").stdout)
    assert stats["examples"] == 1 and stats["avg_positive_words"] == 3 and stats["avg_negative_words"] == 1.5
    result = cli("data", "stats", str(path))
    assert result.exit_code == 0 and "examples" in result.output


def user_error(cli, *args: str) -> str:
    """Run a command that must fail on the user's input: exit 2, an Error message, no traceback; returns the output.

    A wide terminal keeps rich from wrapping long paths inside its error panel, so messages can be matched whole.
    """
    result = cli(*args, env={"COLUMNS": "2000"})
    assert result.exit_code == 2, result.output
    assert "Error" in result.output and "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    return result.output


def test_cli_validate_reports_file_and_line_without_traceback(cli, tmp_path: Path) -> None:
    root = beir_variant(tmp_path / "b", qrels=b"query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\nq1\tnope\t1\r\n")
    assert f"{root / 'qrels' / 'train.tsv'}:3: corpus id 'nope'" in user_error(cli, "data", "validate", str(root))

    path = write(tmp_path / "bad.json", '[\n{"query": "q", "positive_document": "p"}\n]')
    assert f"{path}:2: missing field 'negative_documents'" in user_error(cli, "data", "validate", str(path))
    path = write(tmp_path / "bad.jsonl", '{"query": "q", "positive_document": "p", "negative_documents": []}\n{oops\n')
    assert f"{path}:2: invalid JSON" in user_error(cli, "data", "stats", str(path))
    assert "no such file or directory" in user_error(cli, "data", "validate", str(tmp_path / "missing.tsv"))
