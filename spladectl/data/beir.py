"""BEIR directories: `corpus.jsonl`, `queries.jsonl` and `qrels/<split>.tsv`, checked row by row.

Every id a qrels row names must exist, every text must be non-empty; a problem is a DataError at its file:line, never a
silently dropped row. A document's text is its title and text joined with one space, as BEIR's own evaluation does.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from spladectl.data._io import iter_jsonl, iter_lines, require_id, require_text, require_unicode, where
from spladectl.errors import DataError


@dataclass
class BeirDataset:
    """One split of a BEIR dataset: the whole corpus, the queries that have judgments in the split, and the qrels."""

    corpus: dict[str, str]  # doc id -> title + " " + text
    queries: dict[str, str]  # query id -> text, only the queries of this split, in qrels order
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> relevance (> 0 means relevant)
    titles: dict[str, str] = field(default_factory=dict, repr=False)  # doc id -> title, for display
    path: Path | None = None
    split: str = ""
    qrels_lines: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)  # (qid, docid) -> qrels line

    def positives(self, query_id: str) -> list[str]:
        """The relevant documents of a query, in qrels order."""
        return [doc_id for doc_id, rel in self.qrels.get(query_id, {}).items() if rel > 0]

    @property
    def qrels_path(self) -> Path | None:
        return None if self.path is None else qrels_path(self.path, self.split)


def is_beir_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "corpus.jsonl").exists()


def qrels_path(root: str | Path, split: str) -> Path:
    return Path(root) / "qrels" / f"{split}.tsv"


def available_splits(root: str | Path) -> list[str]:
    qrels_dir = Path(root) / "qrels"
    return sorted(p.stem for p in qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []


def load_beir(path: str | Path, split: str = "test", *, indexed: tuple[Collection[str], str] | None = None) -> BeirDataset:
    """Read and validate one split of a BEIR directory.

    `indexed` = (document ids, where they are) for a caller that searches an index built from the corpus: the
    corpus is then not read (on MS MARCO it is gigabytes of text nobody needs), qrels are checked against those ids,
    and the dataset's corpus is empty.
    """
    root = _check_dir(path, needs=("queries.jsonl",) if indexed else ("corpus.jsonl", "queries.jsonl"))
    qpath = qrels_path(root, split)
    if not qpath.exists():
        splits = ", ".join(available_splits(root)) or "none"
        raise DataError(f"{root}: no qrels for split '{split}' ({qpath} does not exist; splits found: {splits})")
    if indexed is None:
        corpus, titles = read_corpus(root / "corpus.jsonl")
        documents, documents_from = corpus, root / "corpus.jsonl"
    else:
        corpus, titles = {}, {}
        documents, documents_from = indexed
    all_queries = read_queries(root / "queries.jsonl")
    qrels, lines = read_qrels(qpath, queries=all_queries, corpus=documents, corpus_from=documents_from)
    queries = {qid: all_queries[qid] for qid in qrels}
    return BeirDataset(corpus, queries, qrels, titles, root, split, lines)


def load_corpus(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """Only the corpus of a BEIR directory (search needs no queries or qrels): (doc id -> text, doc id -> title)."""
    return read_corpus(_check_dir(path, needs=("corpus.jsonl",)) / "corpus.jsonl")


def read_corpus(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """corpus.jsonl -> (doc id -> "title text", doc id -> title). A missing title is fine; an empty document is not."""
    texts: dict[str, str] = {}
    titles: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, record in iter_jsonl(path):
        at = where(path, number)
        doc_id, title, joined = corpus_entry(record, at)
        if doc_id in texts:
            raise DataError(f"{at}: duplicate document id '{doc_id}' (first on line {first_line[doc_id]})")
        texts[doc_id], titles[doc_id], first_line[doc_id] = joined, title.strip(), number
    if not texts:
        raise DataError(f"{path}: no documents")
    return texts, titles


def corpus_entry(record: dict, at: str, *, id_key: str = "_id", text_key: str = "text") -> tuple[str, str, str]:
    """(id, title, "title text") of one corpus.jsonl record; a missing title is fine, an empty document is not."""
    doc_id = require_id(record, id_key, at)
    title = record.get("title")
    title = "" if title is None else title  # 0, false or [] are not a missing title
    if not isinstance(title, str):
        raise DataError(f"{at}: field 'title' must be a string")
    require_unicode(title, f"{at}: field 'title'")
    text = require_text(record, text_key, at, allow_empty=True)
    joined = f"{title.strip()} {text.strip()}".strip()
    if not joined:
        raise DataError(f"{at}: document '{doc_id}' has an empty title and text")
    return doc_id, title.strip(), joined


def read_queries(path: Path) -> dict[str, str]:
    """queries.jsonl -> query id -> text."""
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, record in iter_jsonl(path):
        at = where(path, number)
        query_id = require_id(record, "_id", at)
        text = require_text(record, "text", at)
        if query_id in queries:
            raise DataError(f"{at}: duplicate query id '{query_id}' (first on line {first_line[query_id]})")
        queries[query_id], first_line[query_id] = text.strip(), number
    if not queries:
        raise DataError(f"{path}: no queries")
    return queries


def read_qrels(
    path: Path, *, queries: dict[str, str], corpus: Collection[str], corpus_from: str | Path | None = None,
) -> tuple[dict[str, dict[str, int]], dict[tuple[str, str], int]]:
    """qrels/<split>.tsv -> (qid -> docid -> score, (qid, docid) -> line).

    BEIR writes `query-id<TAB>corpus-id<TAB>score` under a header; TREC qrels (`qid 0 docid score`, space-separated)
    are accepted too. CRLF endings are handled by the reader.
    """
    qrels: dict[str, dict[str, int]] = {}
    lines: dict[tuple[str, str], int] = {}
    first_row = True
    for number, line in iter_lines(path):
        if not line.strip():
            continue
        is_first_row, first_row = first_row, False
        at = where(path, number)
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) == 4:  # TREC: qid, iteration (unused), docid, relevance
            fields = [fields[0], fields[2], fields[3]]
        if len(fields) != 3:
            raise DataError(f"{at}: expected 3 tab-separated columns (query-id, corpus-id, score), found {len(fields)}")
        query_id, doc_id, raw_score = (f.strip() for f in fields)
        score = _parse_score(raw_score)
        if score is None:
            if is_first_row and query_id not in queries:  # the header: `query-id  corpus-id  score`, not a judgment
                continue
            raise DataError(f"{at}: score {raw_score!r} is not an integer")
        if query_id not in queries:
            raise DataError(f"{at}: query id '{query_id}' is not in {path.parent.parent / 'queries.jsonl'}")
        if doc_id not in corpus:
            raise DataError(f"{at}: corpus id '{doc_id}' is not in {corpus_from or path.parent.parent / 'corpus.jsonl'}")
        judged = qrels.setdefault(query_id, {})
        if doc_id in judged and judged[doc_id] != score:
            raise DataError(
                f"{at}: ('{query_id}', '{doc_id}') is judged again with score {score}, "
                f"but line {lines[(query_id, doc_id)]} gave {judged[doc_id]}"
            )
        if doc_id not in judged:
            judged[doc_id], lines[(query_id, doc_id)] = score, number
    if not qrels:
        raise DataError(f"{path}: no judgments")
    return qrels, lines


def _parse_score(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            return None
        return int(value) if value.is_integer() else None


def _check_dir(path: str | Path, needs: tuple[str, ...] = ("corpus.jsonl", "queries.jsonl")) -> Path:
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: no such directory")
    if not root.is_dir():
        raise DataError(f"{root}: expected a BEIR directory (corpus.jsonl, queries.jsonl, qrels/), found a file")
    for name in needs:
        if not (root / name).is_file():
            raise DataError(f"{root}: not a BEIR directory ({name} is missing)")
    return root


def write_beir(
    root: str | Path,
    corpus: dict[str, str | dict[str, str]],
    queries: dict[str, str],
    qrels: dict[str, dict[str, dict[str, int]]],
) -> Path:
    """Write a BEIR directory: corpus values are a text or {"title", "text"}; qrels maps split -> qid -> docid -> score.

    For carving a dev split out of train queries, small fixtures, and exports. Qrels get BEIR's header, LF endings.
    """
    import json

    root = Path(root)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for doc_id, doc in corpus.items():
            doc = {"title": "", "text": doc} if isinstance(doc, str) else doc
            handle.write(json.dumps({"_id": doc_id, "title": doc.get("title", ""), "text": doc["text"]}) + "\n")
    with open(root / "queries.jsonl", "w", encoding="utf-8") as handle:
        for query_id, text in queries.items():
            handle.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    for split, judgments in qrels.items():
        with open(qrels_path(root, split), "w", encoding="utf-8") as handle:
            handle.write("query-id\tcorpus-id\tscore\n")
            for query_id, docs in judgments.items():
                for doc_id, score in docs.items():
                    handle.write(f"{query_id}\t{doc_id}\t{score}\n")
    return root
