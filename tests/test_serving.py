"""`spladectl encode` and `spladectl index`: each file format read back by its consumer's own library, resumable
shards, the same files from any number of processes, and an index that answers like exact search."""

from __future__ import annotations

import json
import shutil
import os
from pathlib import Path

import numpy as np
import pytest

from spladectl.data.beir import read_corpus, read_queries, read_qrels
from spladectl.encoding import encode_sparse
from spladectl.model import SpladeEncoder

SCIFACT = Path(os.environ.get("SPLADECTL_SCIFACT", Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"))
pytestmark = pytest.mark.skipif(not (SCIFACT / "corpus.jsonl").is_file(), reason=f"SciFact is not at {SCIFACT}")
WIDE = {"COLUMNS": "2000"}
LENGTH = ["--max-length", "96", "--precision", "32-true", "--no-progress"]


@pytest.fixture(scope="module")
def small_scifact(tmp_path_factory):
    """SciFact's first 300 documents and the train queries whose relevant documents are all among them: a real BEIR
    directory small enough to encode in seconds."""
    root = tmp_path_factory.mktemp("scifact-small")
    (root / "qrels").mkdir()
    lines = (SCIFACT / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:300]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    kept = {json.loads(line)["_id"] for line in lines}
    qrels = (SCIFACT / "qrels" / "train.tsv").read_text().splitlines()
    rows = [r for r in qrels[1:] if r.split("\t")[1] in kept]
    (root / "qrels" / "train.tsv").write_text("\n".join([qrels[0], *rows]) + "\n")
    wanted = {r.split("\t")[0] for r in rows}
    queries = [q for q in (SCIFACT / "queries.jsonl").read_text().splitlines() if json.loads(q)["_id"] in wanted]
    (root / "queries.jsonl").write_text("\n".join(queries) + "\n")
    return root


@pytest.fixture(scope="module")
def reference(small_scifact):
    """spladectl's own in-memory vectors of the small set: what every format must carry."""
    encoder = SpladeEncoder.from_pretrained("splade-tiny")
    corpus, _ = read_corpus(small_scifact / "corpus.jsonl")
    queries = read_queries(small_scifact / "queries.jsonl")
    docs = encode_sparse(encoder, list(corpus.values()), max_length=96)
    query_vectors = encode_sparse(encoder, list(queries.values()), max_length=64)
    tokens = encoder.tokenizer.convert_ids_to_tokens(list(range(encoder.vocab_size)))
    return {"doc_ids": list(corpus), "docs": docs, "query_ids": list(queries), "queries": query_vectors,
            "tokens": tokens, "texts": corpus}


def encode(cli, data, out, *args):
    result = cli("encode", "-d", str(data), "-o", str(out), *LENGTH, "--shard-size", "128", *args, env=WIDE)
    assert result.exit_code == 0, result.output
    return result


def row(matrix, i):
    start, end = matrix.indptr[i], matrix.indptr[i + 1]
    return dict(zip(matrix.indices[start:end].tolist(), matrix.data[start:end].tolist()))


def test_jsonl_and_parquet_carry_spladectls_vectors(cli, small_scifact, reference, tmp_path):
    import pyarrow.parquet as pq

    encode(cli, small_scifact, tmp_path / "jsonl", "-f", "jsonl")
    encode(cli, small_scifact, tmp_path / "parquet", "-f", "parquet")
    manifest = json.loads((tmp_path / "jsonl" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["count"] == 300 and len(manifest["shards"]) == 3  # 128 + 128 + 44
    records = [json.loads(line) for name in ("shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl")
               for line in (tmp_path / "jsonl" / "shards" / name).read_text().splitlines()]
    table = pq.read_table([tmp_path / "parquet" / "shards" / f"shard-0000{i}.parquet" for i in range(3)])
    assert [r["id"] for r in records] == table["id"].to_pylist() == reference["doc_ids"]  # input order
    tokens = reference["tokens"]
    for i in (0, 150, 299):
        want = row(reference["docs"], i)
        assert {tokens.index(t): w for t, w in records[i]["vector"].items()} == pytest.approx(want, abs=1e-6)
        got = dict(zip(table["term_ids"][i].as_py(), table["weights"][i].as_py()))
        assert got == pytest.approx(want, abs=1e-6)


def test_anserini_writes_integer_impacts_and_pretokenized_queries(cli, small_scifact, reference, tmp_path):
    encode(cli, small_scifact, tmp_path / "docs", "-f", "anserini")
    encode(cli, small_scifact, tmp_path / "queries", "-f", "anserini", "--queries", "--quantize", "50")
    first = json.loads((tmp_path / "docs" / "shards" / "shard-00000.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "contents", "vector"} and first["contents"] == reference["texts"][first["id"]]
    tokens = reference["tokens"]
    want = {tokens[t]: round(w * 100) for t, w in row(reference["docs"], 0).items() if round(w * 100) > 0}
    assert first["vector"] == want and all(isinstance(v, int) for v in want.values())
    qid, words = (tmp_path / "queries" / "shards" / "shard-00000.tsv").read_text().splitlines()[0].split("\t")
    assert qid == reference["query_ids"][0]
    counts = {tokens[t]: round(w * 50) for t, w in row(reference["queries"], 0).items() if round(w * 50) > 0}
    assert {w: words.split().count(w) for w in set(words.split())} == counts  # each token repeated by its impact


def test_opensearch_and_elasticsearch_bulk_files_mappings_and_queries(cli, small_scifact, reference, tmp_path):
    for engine in ("opensearch", "elasticsearch"):
        encode(cli, small_scifact, tmp_path / engine, "-f", engine)
        encode(cli, small_scifact, tmp_path / f"{engine}-q", "-f", engine, "--queries")
        lines = (tmp_path / engine / "shards" / "shard-00000.ndjson").read_text().splitlines()
        assert len(lines) == 2 * 128
        action, source = json.loads(lines[0]), json.loads(lines[1])
        assert action == {"index": {"_id": reference["doc_ids"][0]}}
        assert all("." not in name for name in source["splade"])  # a dot would be an object path to the engine
        mapping = json.loads((tmp_path / engine / "mapping.json").read_text())
        field_type = mapping["mappings"]["properties"]["splade"]["type"]
        assert field_type == {"opensearch": "rank_features", "elasticsearch": "sparse_vector"}[engine]
        query = json.loads((tmp_path / f"{engine}-q" / "shards" / "shard-00000.jsonl").read_text().splitlines()[0])
        assert query["id"] == reference["query_ids"][0] and "query" in query["body"]
    dotted = [t for t in reference["tokens"] if "." in t][:1]
    assert dotted and json.dumps(dotted[0].replace(".", "%2E"))  # the escape docs/serving.md documents


def test_qdrant_export_in_qdrant_client_gives_exact_searchs_top10(cli, small_scifact, reference, tmp_path):
    from qdrant_client import QdrantClient, models

    from spladectl.evaluate import retrieve

    encode(cli, small_scifact, tmp_path / "docs", "-f", "qdrant")
    encode(cli, small_scifact, tmp_path / "queries", "-f", "qdrant", "--queries", "--max-length", "64")
    config = json.loads((tmp_path / "docs" / "collection.json").read_text())
    client = QdrantClient(path=str(tmp_path / "qdrant"))  # embedded local mode: the real client, no server
    client.create_collection("scifact", vectors_config={}, sparse_vectors_config={
        name: models.SparseVectorParams(**params) for name, params in config["sparse_vectors_config"].items()})
    points = [json.loads(line) for shard in sorted((tmp_path / "docs" / "shards").glob("shard-*.jsonl"))
              for line in shard.read_text().splitlines()]
    client.upsert("scifact", [models.PointStruct(id=p["id"], vector={name: models.SparseVector(**v)
                                                                     for name, v in p["vector"].items()},
                                                 payload=p["payload"]) for p in points])
    queries = [json.loads(line) for line in (tmp_path / "queries" / "shards" / "shard-00000.jsonl").read_text().splitlines()]
    indices, scores = retrieve(reference["queries"], reference["docs"], 10)
    for q, (row_indices, row_scores) in zip(queries, zip(indices, scores)):
        hits = client.query_points("scifact", query=models.SparseVector(**q["query"]), using=q["using"],
                                   limit=10, with_payload=True).points
        ours = [reference["doc_ids"][i] for i, s in zip(row_indices, row_scores) if s > 0]
        assert [h.payload["doc_id"] for h in hits] == ours, q["id"]
        assert [h.score for h in hits] == pytest.approx([float(s) for s in row_scores[:len(ours)]], rel=1e-5)
    client.close()


def test_an_interrupted_encode_continues_and_ends_with_the_same_files(cli, small_scifact, tmp_path, monkeypatch):
    from spladectl import vector_files

    encode(cli, small_scifact, tmp_path / "whole", "-f", "jsonl")
    real = vector_files._Worker.write
    calls = []

    def dies_on_the_third_shard(self, out, index, rows):
        calls.append(index)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C (or a kill between two renames) would stop it
        return real(self, out, index, rows)

    monkeypatch.setattr(vector_files._Worker, "write", dies_on_the_third_shard)
    cli("encode", "-d", str(small_scifact), "-o", str(tmp_path / "cut"), *LENGTH, "--shard-size", "128")
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert not manifest["complete"] and sorted(manifest["shards"]) == ["0", "1"]
    assert not list((tmp_path / "cut" / "shards").glob(".shard-*"))  # no partial shard left behind
    monkeypatch.undo()
    (tmp_path / "cut" / "shards" / ".shard-00002.jsonl.x1.partial").write_text('{"id": "half a')  # as kill -9 leaves
    summary = json.loads(encode(cli, small_scifact, tmp_path / "cut", "-f", "jsonl", "--json").stdout)
    assert summary["encoded_now"] == 300 - 256  # only the missing shard
    for name in ("shards/shard-00000.jsonl", "shards/shard-00001.jsonl", "shards/shard-00002.jsonl"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "cut" / "shards").iterdir()) == [
        "shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"]  # the stale temporary file is gone


def test_two_processes_write_the_same_files_as_one(cli, small_scifact, tmp_path):
    encode(cli, small_scifact, tmp_path / "one", "-f", "parquet", "--shard-size", "100")
    encode(cli, small_scifact, tmp_path / "two", "-f", "parquet", "--shard-size", "100", "--nproc", "2")
    one = sorted(p.name for p in (tmp_path / "one" / "shards").glob("shard-*"))
    assert one == sorted(p.name for p in (tmp_path / "two" / "shards").glob("shard-*")) and len(one) == 3
    import pyarrow.parquet as pq

    for name in one:
        a, b = pq.read_table(tmp_path / "one" / "shards" / name), pq.read_table(tmp_path / "two" / "shards" / name)
        assert a["id"].equals(b["id"]) and a["term_ids"].equals(b["term_ids"])
        assert np.allclose(np.concatenate(a["weights"].to_numpy()), np.concatenate(b["weights"].to_numpy()),
                           atol=1e-5)  # other thread counts may round the last float bit differently


@pytest.mark.parametrize("kind", ["seismic", "exact"])
def test_eval_on_an_index_matches_eval_on_the_corpus(cli, small_scifact, tmp_path, kind):
    encode(cli, small_scifact, tmp_path / "vectors", "-f", "parquet")
    built = cli("index", str(tmp_path / "vectors"), str(tmp_path / "index"), "--kind", kind, "--json",
                "--no-progress")
    assert built.exit_code == 0, built.output
    assert json.loads(built.stdout)["count"] == 300
    common = ["-d", str(small_scifact), "--split", "train", "--precision", "32-true", "--no-progress", "--json",
              "--max-doc-length", "96"]
    exact = json.loads(cli("eval", *common).stdout)[0]
    indexed_result = cli("eval", *common, "--index", str(tmp_path / "index"))
    assert indexed_result.exit_code == 0, indexed_result.output
    indexed = json.loads(indexed_result.stdout)[0]
    assert indexed["nDCG@10"] == pytest.approx(exact["nDCG@10"], abs=0.005)
    if kind == "exact":
        assert indexed["nDCG@10"] == pytest.approx(exact["nDCG@10"], abs=1e-9)
    assert indexed["avg_doc_dims"] == pytest.approx(exact["avg_doc_dims"], rel=1e-6)
    assert indexed["latency_ms_p50"] > 0
    # The index knows the documents: a directory with only queries and qrels evaluates the same, no corpus read.
    judged_only = tmp_path / "judged-only"
    (judged_only / "qrels").mkdir(parents=True)
    shutil.copy(small_scifact / "queries.jsonl", judged_only)
    shutil.copy(small_scifact / "qrels" / "train.tsv", judged_only / "qrels")
    common_judged = [str(judged_only) if arg == str(small_scifact) else arg for arg in common]
    without_corpus = cli("eval", *common_judged, "--index", str(tmp_path / "index"))
    assert without_corpus.exit_code == 0, without_corpus.output
    assert json.loads(without_corpus.stdout)[0]["nDCG@10"] == indexed["nDCG@10"]
    searched = cli("search", "protein folding", "--index", str(tmp_path / "index"), "-d", str(small_scifact),
                   "--json", "--no-progress")
    assert searched.exit_code == 0 and len(json.loads(searched.stdout)["results"]) == 10


def test_bad_input_is_one_clear_error_and_nothing_is_left_half_written(cli, small_scifact, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "a", "text": "fine"}\n{"_id": "b", "text": \n')
    result = cli("encode", "-d", str(bad), "-o", str(tmp_path / "o1"), *LENGTH, env=WIDE)
    assert result.exit_code == 2 and f"{bad}:2: invalid JSON" in result.output
    assert not (tmp_path / "o1" / "shards").exists()
    dup = tmp_path / "dup.tsv"
    dup.write_text("a\tfirst text\nb\tsecond\na\tagain\n")
    result = cli("encode", "-d", str(dup), "-o", str(tmp_path / "o2"), *LENGTH, env=WIDE)
    assert result.exit_code == 2 and f"{dup}:3: duplicate id 'a' (first at {dup}:1)" in result.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"_id": "x", "title": "", "text": "  "}\n')
    result = cli("encode", "-d", str(empty), "-o", str(tmp_path / "o3"), *LENGTH, env=WIDE)
    assert result.exit_code == 2 and f"{empty}:1: document 'x' has an empty title and text" in result.output

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    result = cli("encode", "-d", str(small_scifact), "-o", str(taken), *LENGTH, env=WIDE)
    assert result.exit_code == 2 and "not an encode directory" in result.output and (taken / "mine.txt").exists()
    encode(cli, small_scifact, tmp_path / "v", "-f", "jsonl")
    result = cli("encode", "-d", str(small_scifact), "-o", str(tmp_path / "v"), *LENGTH, "-f", "parquet",
                 "--shard-size", "128", env=WIDE)
    assert result.exit_code == 2 and "other settings (format differ)" in result.output

    result = cli("index", str(tmp_path / "v"), str(tmp_path / "idx"), "--kind", "exact", "--no-progress")
    assert result.exit_code == 0
    assert cli("export", "splade-tiny", str(tmp_path / "other-model"), "-f", "hf").exit_code == 0
    result = cli("eval", "-d", str(small_scifact), "--split", "train", "--index", str(tmp_path / "idx"), "-m",
                 str(tmp_path / "other-model"), "--no-progress", env=WIDE)
    assert result.exit_code == 2 and "was built from model 'splade-tiny'" in result.output
    result = cli("index", str(tmp_path / "o1"), str(tmp_path / "idx2"), env=WIDE)
    assert result.exit_code == 2 and "not finished" in result.output
