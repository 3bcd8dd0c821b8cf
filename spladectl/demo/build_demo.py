"""Rebuild the demo's training file and held-out BEIR directory from its hand-written sources.

Sources (edit these, then re-run):
  documents.jsonl     one passage per line: {"_id": "d001", "title": ..., "text": ...}
  queries.jsonl       one query per document: {"_id": "q001", "text": ..., "doc": "d001"}
  hard_negatives.tsv  "<query id>\\t<doc id>,<doc id>": two hand-picked passages from the same theme that do not
                      answer the query

Outputs (generated, deterministic):
  train.jsonl                 seed JSONL: {"query", "positive_document", "negative_documents"}, where every document
                              is written as title + " " + text (as BEIR evaluation joins them)
  heldout/corpus.jsonl        all documents, {"_id", "title", "text", "metadata": {}}
  heldout/queries.jsonl       the held-out queries only, {"_id", "text", "metadata": {}}
  heldout/qrels/test.tsv      "query-id\\tcorpus-id\\tscore", one relevant document per held-out query

Split: queries are taken in file order and every 5th one (the 5th, 10th, 15th, ...) is held out; the rest train.
Nothing is random, so the same sources always give the same files. The script then validates what it wrote and
exits non-zero on any problem.

Usage: python spladectl/demo/build_demo.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOLDOUT_EVERY = 5
MIN_WORDS, MAX_WORDS = 40, 90


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def passage(doc: dict) -> str:
    return doc["title"] + " " + doc["text"]


def build() -> dict:
    docs = read_jsonl(HERE / "documents.jsonl")
    queries = read_jsonl(HERE / "queries.jsonl")
    negatives = {}
    for line in (HERE / "hard_negatives.tsv").read_text(encoding="utf-8").splitlines():
        if line.strip():
            qid, ids = line.split("\t")
            negatives[qid] = ids.split(",")
    by_id = {d["_id"]: d for d in docs}

    heldout = [q for i, q in enumerate(queries) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    train = [q for i, q in enumerate(queries) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]

    write_jsonl(HERE / "train.jsonl", [
        {"query": q["text"], "positive_document": passage(by_id[q["doc"]]),
         "negative_documents": [passage(by_id[n]) for n in negatives[q["_id"]]]}
        for q in train])
    write_jsonl(HERE / "heldout" / "corpus.jsonl",
                [{"_id": d["_id"], "title": d["title"], "text": d["text"], "metadata": {}} for d in docs])
    write_jsonl(HERE / "heldout" / "queries.jsonl",
                [{"_id": q["_id"], "text": q["text"], "metadata": {}} for q in heldout])
    qrels = HERE / "heldout" / "qrels" / "test.tsv"
    qrels.parent.mkdir(parents=True, exist_ok=True)
    with qrels.open("w", encoding="utf-8", newline="\n") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in heldout:
            f.write(f"{q['_id']}\t{q['doc']}\t1\n")
    return {"docs": docs, "queries": queries, "negatives": negatives, "train": train, "heldout": heldout}


def validate(b: dict) -> list[str]:
    errors: list[str] = []
    docs, queries, negatives = b["docs"], b["queries"], b["negatives"]
    doc_ids = [d["_id"] for d in docs]
    query_ids = [q["_id"] for q in queries]
    by_id = {d["_id"]: d for d in docs}

    # sources
    for name, ids in (("document", doc_ids), ("query", query_ids)):
        if len(ids) != len(set(ids)):
            errors.append(f"duplicate {name} ids")
    for d in docs:
        if set(d) != {"_id", "title", "text"}:
            errors.append(f"{d['_id']}: unexpected keys {sorted(d)}")
        if not d["title"].strip() or not d["text"].strip():
            errors.append(f"{d['_id']}: empty title or text")
        words = len(d["text"].split())
        if not MIN_WORDS <= words <= MAX_WORDS:
            errors.append(f"{d['_id']}: {words} words (want {MIN_WORDS}-{MAX_WORDS})")
    if len({d["text"] for d in docs}) != len(docs):
        errors.append("duplicate document texts")
    if len({q["text"].strip().lower() for q in queries}) != len(queries):
        errors.append("duplicate query texts")
    if sorted(q["doc"] for q in queries) != sorted(doc_ids):
        errors.append("queries do not map one-to-one onto documents")
    for q in queries:
        if not q["text"].strip():
            errors.append(f"{q['_id']}: empty query")
        if q["doc"] not in by_id:
            errors.append(f"{q['_id']}: unknown document {q['doc']}")
        negs = negatives.get(q["_id"])
        if q in b["train"]:
            if not negs or len(negs) != 2 or len(set(negs)) != 2:
                errors.append(f"{q['_id']}: needs exactly two distinct hard negatives, has {negs}")
            elif q["doc"] in negs or any(n not in by_id for n in negs):
                errors.append(f"{q['_id']}: bad hard negatives {negs}")

    # generated files, read back from disk
    train_rows = read_jsonl(HERE / "train.jsonl")
    corpus = read_jsonl(HERE / "heldout" / "corpus.jsonl")
    hq = read_jsonl(HERE / "heldout" / "queries.jsonl")
    raw = (HERE / "heldout" / "qrels" / "test.tsv").read_bytes()
    if b"\r" in raw:
        errors.append("qrels/test.tsv has CR characters")
    lines = raw.decode("utf-8").split("\n")
    if lines[0] != "query-id\tcorpus-id\tscore" or lines[-1] != "":
        errors.append("qrels/test.tsv: bad header or missing final newline")
    qrels = [tuple(line.split("\t")) for line in lines[1:-1]]

    corpus_ids = {d["_id"] for d in corpus}
    hq_ids = {q["_id"] for q in hq}
    if corpus_ids != set(doc_ids) or any(not (d["title"].strip() and d["text"].strip()) for d in corpus):
        errors.append("corpus.jsonl does not hold every document with non-empty text")
    if len(hq_ids) != len(hq) or any(not q["text"].strip() for q in hq):
        errors.append("heldout queries: duplicate ids or empty text")
    for row in qrels:
        if len(row) != 3 or row[2] != "1":
            errors.append(f"qrels row {row}: want three columns with score 1")
        elif row[0] not in hq_ids or row[1] not in corpus_ids:
            errors.append(f"qrels row {row}: unknown query or document")
    if {r[0] for r in qrels} != hq_ids or len(qrels) != len(hq):
        errors.append("qrels and held-out queries do not match one line per query")

    heldout_texts = {q["text"] for q in b["heldout"]}
    passages = {passage(d) for d in docs}
    for i, row in enumerate(train_rows, 1):
        q = b["train"][i - 1]
        if set(row) != {"query", "positive_document", "negative_documents"}:
            errors.append(f"train.jsonl:{i}: unexpected keys")
        if row["query"] in heldout_texts:
            errors.append(f"train.jsonl:{i}: held-out query in training data")
        if row["positive_document"] != passage(by_id[q["doc"]]):
            errors.append(f"train.jsonl:{i}: positive is not the exact text of {q['doc']}")
        if row["positive_document"] in row["negative_documents"]:
            errors.append(f"train.jsonl:{i}: positive repeated as a negative")
        if any(n not in passages for n in row["negative_documents"]):
            errors.append(f"train.jsonl:{i}: a negative is not a corpus passage")
    if {q["_id"] for q in b["heldout"]} & {q["_id"] for q in b["train"]}:
        errors.append("a query is in both splits")
    return errors


def main() -> int:
    b = build()
    errors = validate(b)
    print(f"documents: {len(b['docs'])}  queries: {len(b['queries'])}  "
          f"train examples: {len(b['train'])}  held-out queries: {len(b['heldout'])}")
    words = [len(d["text"].split()) for d in b["docs"]]
    print(f"passage length: {min(words)}-{max(words)} words, mean {sum(words) / len(words):.1f}")
    for e in errors:
        print("ERROR:", e)
    print("validation: " + ("OK" if not errors else f"{len(errors)} problem(s)"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
