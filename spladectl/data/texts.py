"""Documents or queries read one at a time, whatever the file's size: for encoding corpora that do not fit in memory.

Accepted: a BEIR directory (its corpus.jsonl or queries.jsonl), a JSONL file (BEIR's `_id`/`title`/`text`, or
`id` and `text`/`contents`), or a TSV file of `id<TAB>text` lines (MS MARCO's collection.tsv, queries.tsv), any of
them gzipped. Every problem is a DataError naming the file and line; nothing is skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from spladectl.data._io import iter_jsonl, iter_lines, require_id, require_unicode, where
from spladectl.data.beir import corpus_entry
from spladectl.errors import DataError

KINDS = ("documents", "queries")


def text_file(path: str | Path, kind: str) -> Path:
    """The file to read: the path itself, or in a BEIR directory its corpus.jsonl (documents) or queries.jsonl."""
    path = Path(path)
    if path.is_dir():
        name = "corpus.jsonl" if kind == "documents" else "queries.jsonl"
        for candidate in (path / name, path / (name + ".gz")):
            if candidate.is_file():
                return candidate
        raise DataError(f"{path}: a directory without {name}")
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    return path


def iter_texts(path: str | Path, kind: str = "documents") -> Iterator[tuple[str, str, str]]:
    """(id, text, file:line) of every document or query, in file order."""
    path = text_file(path, kind)
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    if suffixes and suffixes[-1] in (".tsv", ".txt", ".tab"):
        yield from _iter_tsv(path)
        return
    for number, record in iter_jsonl(path):
        at = where(path, number)
        id_key = "_id" if "_id" in record else "id"
        text_key = "text" if "text" in record or "contents" not in record else "contents"
        if kind == "documents":
            doc_id, _, text = corpus_entry(record, at, id_key=id_key, text_key=text_key)
            yield doc_id, text, at
        else:
            query_id = require_id(record, id_key, at)
            text = record.get(text_key)
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{at}: query '{query_id}' has no text (field '{text_key}')")
            yield query_id, require_unicode(text, f"{at}: field '{text_key}'").strip(), at


def _iter_tsv(path: Path) -> Iterator[tuple[str, str, str]]:
    for number, line in iter_lines(path):
        if not line.strip():
            continue
        at = where(path, number)
        parts = line.split("\t")
        if len(parts) < 2:
            raise DataError(f"{at}: expected 'id<TAB>text', found no tab")
        text_id, text = parts[0].strip(), " ".join(p.strip() for p in parts[1:] if p.strip())
        if not text_id:
            raise DataError(f"{at}: empty id")
        if not text:
            raise DataError(f"{at}: '{text_id}' has an empty text")
        yield text_id, text, at


def check_texts(path: str | Path, kind: str = "documents") -> int:
    """Read every line once, before any encoding, and count them: a malformed line or a repeated id fails now, not
    hours into an encode. Ids are kept as 8-byte hashes (70 MB for MS MARCO's 8.8M passages), not as strings."""
    hashes = []
    for text_id, _, _ in iter_texts(path, kind):
        hashes.append(_id_hash(text_id))
    if not hashes:
        raise DataError(f"{text_file(path, kind)}: no {kind}")
    ordered = np.sort(np.asarray(hashes, dtype=np.uint64))
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if len(repeated):
        _name_duplicate(path, kind, set(int(h) for h in repeated))
    return len(hashes)


def _id_hash(text_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(text_id.encode(), digest_size=8).digest(), "little")


def _name_duplicate(path: str | Path, kind: str, suspects: set[int]) -> None:
    """Find the first id seen twice among the (rare) hash collisions and raise naming both lines."""
    first: dict[str, str] = {}
    for text_id, _, at in iter_texts(path, kind):
        if _id_hash(text_id) in suspects:
            if text_id in first:
                raise DataError(f"{at}: duplicate id '{text_id}' (first at {first[text_id]})")
            first[text_id] = at
