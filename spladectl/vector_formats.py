"""Sparse vectors in the files each search engine ingests. docs/serving.md shows each one in use.

A shard is written by `write_shard(fmt, file, rows)`: `rows` are (id, text, term ids, weights) of documents or
queries. Weights are floats, or integers when a quantisation scale is set (`weight × scale`, rounded; terms that
round to 0 are dropped). Feature names are the tokenizer's tokens, except in OpenSearch / Elasticsearch, where a dot
in a field name means an object path: there `.` is written `%2E` and `%` is written `%25` (`feature_name`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

FORMATS = ("jsonl", "anserini", "parquet", "opensearch", "elasticsearch", "qdrant")
ANSERINI_SCALE = 100  # Anserini's impact indexes take integer weights; the scale when --quantize is not given
FIELD = "splade"  # the field (engines) or named vector (Qdrant) that holds the sparse vector
Row = tuple[str, str, np.ndarray, np.ndarray]  # id, text, term ids, weights


def suffix(fmt: str, kind: str) -> str:
    """The file extension of one shard."""
    if fmt == "parquet":
        return ".parquet"
    if fmt in ("opensearch", "elasticsearch") and kind == "documents":
        return ".ndjson"  # the _bulk API's body
    if fmt == "anserini" and kind == "queries":
        return ".tsv"  # a topics file
    return ".jsonl"


def quantize(weights: np.ndarray, scale: int | None) -> np.ndarray:
    return weights if scale is None else np.rint(weights * scale).astype(np.int64)


def feature_name(token: str) -> str:
    return token.replace("%", "%25").replace(".", "%2E")


def write_shard(fmt: str, handle: IO[bytes], rows: Sequence[Row], *, tokens: Sequence[str], kind: str,
                scale: int | None, first_position: int) -> None:
    """Write one shard to an open binary file. `first_position` is the position of rows[0] in the whole input (Qdrant
    point ids are positions, since Qdrant takes only integers or UUIDs as ids)."""
    if fmt == "parquet":
        _write_parquet(handle, rows, scale)
        return
    lines: list[str] = []
    for position, (text_id, text, terms, weights) in enumerate(rows, start=first_position):
        values = quantize(weights, scale)
        keep = values > 0
        terms, values = terms[keep], values[keep]
        lines.extend(_lines(fmt, kind, position, text_id, text, terms, values.tolist(), tokens))
    handle.write(("".join(line + "\n" for line in lines)).encode())


def _lines(fmt: str, kind: str, position: int, text_id: str, text: str, terms: np.ndarray, values: list,
           tokens: Sequence[str]) -> list[str]:
    dump = json.dumps
    if fmt == "qdrant":
        vector = {"indices": terms.tolist(), "values": values}
        if kind == "queries":
            return [dump({"id": text_id, "using": FIELD, "query": vector})]
        return [dump({"id": position, "vector": {FIELD: vector}, "payload": {"doc_id": text_id}})]
    if fmt == "anserini" and kind == "queries":
        # Anserini scores a pretokenized impact query by term frequency: each token repeated by its weight.
        words = " ".join(" ".join([tokens[t]] * int(v)) for t, v in zip(terms.tolist(), values))
        return [f"{text_id}\t{words}"]
    if fmt in ("opensearch", "elasticsearch"):
        features = {feature_name(tokens[t]): v for t, v in zip(terms.tolist(), values)}
        if kind == "queries":
            return [dump({"id": text_id, "body": search_body(fmt, features)}, ensure_ascii=False)]
        return [dump({"index": {"_id": text_id}}),
                dump({"text": text, FIELD: features}, ensure_ascii=False)]
    vector = {tokens[t]: v for t, v in zip(terms.tolist(), values)}
    if fmt == "anserini":
        return [dump({"id": text_id, "contents": text, "vector": vector}, ensure_ascii=False)]
    return [dump({"id": text_id, "vector": vector}, ensure_ascii=False)]  # jsonl


def _write_parquet(handle: IO[bytes], rows: Sequence[Row], scale: int | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    value_type = pa.int32() if scale is not None else pa.float32()
    weights = [quantize(w, scale) for _, _, _, w in rows]
    kept = [w > 0 for w in weights]
    table = pa.table({
        "id": pa.array([r[0] for r in rows], pa.string()),
        "term_ids": pa.array([r[2][k].astype(np.int32) for r, k in zip(rows, kept)], pa.list_(pa.int32())),
        "weights": pa.array([w[k] for w, k in zip(weights, kept)], pa.list_(value_type)),
    })
    pq.write_table(table, handle)


def search_body(fmt: str, features: dict[str, Any]) -> dict[str, Any]:
    """The search request that scores documents by the dot product with `features` (the query's vector)."""
    if fmt == "elasticsearch":  # Elasticsearch 8.15+: the sparse_vector query on a sparse_vector field
        return {"query": {"sparse_vector": {"field": FIELD, "query_vector": features}}}
    # OpenSearch: one linear rank_feature clause per query term, boosted by its weight, sums to the dot product
    return {"query": {"bool": {"should": [
        {"rank_feature": {"field": f"{FIELD}.{name}", "linear": {}, "boost": weight}} for name, weight in features.items()
    ]}}}


def write_companions(fmt: str, out: Path) -> list[str]:
    """The files an engine needs besides the vectors: index mappings and a query template, or a collection config."""
    files: dict[str, Any] = {}
    if fmt == "opensearch":
        files["mapping.json"] = {"mappings": {"properties": {"text": {"type": "text"}, FIELD: {"type": "rank_features"}}}}
        files["query-template.json"] = search_body(fmt, {"TERM": "WEIGHT"})
    elif fmt == "elasticsearch":
        files["mapping.json"] = {"mappings": {"properties": {"text": {"type": "text"}, FIELD: {"type": "sparse_vector"}}}}
        files["query-template.json"] = search_body(fmt, {"TERM": "WEIGHT"})
    elif fmt == "qdrant":
        # create_collection(..., sparse_vectors_config={"splade": SparseVectorParams()}); no IDF modifier: SPLADE
        # weights already are the impacts
        files["collection.json"] = {"vectors_config": {}, "sparse_vectors_config": {FIELD: {}}}
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    return sorted(files)


def read_shard(fmt: str, path: Path, *, token_ids: dict[str, int] | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(id, term ids, weights) of a documents shard in jsonl, anserini, parquet or qdrant: what `spladectl index`
    reads back. `token_ids` maps tokens to ids for the formats that name terms by token."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return [(i, np.asarray(t, np.int64), np.asarray(w, np.float32)) for i, t, w in
                zip(table["id"].to_pylist(), table["term_ids"].to_pylist(), table["weights"].to_pylist())]
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if fmt == "qdrant":
                vector = record["vector"][FIELD]
                rows.append((record["payload"]["doc_id"], np.asarray(vector["indices"], np.int64),
                             np.asarray(vector["values"], np.float32)))
            else:
                terms = np.asarray([token_ids[t] for t in record["vector"]], np.int64)
                rows.append((record["id"], terms, np.asarray(list(record["vector"].values()), np.float32)))
    return rows
