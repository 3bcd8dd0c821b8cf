"""Training examples and the file formats they come from: seed JSON, JSONL and MS MARCO-style TSV triples.

Seed JSON is a list of objects, JSONL one object a line, each with

    query               the query text
    positive_document   a relevant document's text
    negative_documents  a list of texts, or of {"document": text, "score": number} objects (may be mixed)
    positive_score      optional teacher score of the positive (for distillation, e.g. MarginMSE)

Teacher scores are all or nothing: a row gives `positive_score` and a `score` on every negative, or none of them, and
either every row of a file has them or none has. They come out as Example.teacher_scores = [positive, *negatives].
Other keys (ids, metadata) are ignored, so `spladectl data mine` output, which carries ids, reads back as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from spladectl.data._io import (
    iter_json_array,
    iter_jsonl,
    iter_lines,
    optional_score,
    require_text,
    require_unicode,
    where,
)
from spladectl.errors import DataError


@dataclass
class Example:
    """One (query, positive) pair with its hard negatives.

    teacher_scores, when present, has 1 + len(negatives) entries: the positive's score, then each negative's, in order.
    source is "file:line" of the row it came from, for error messages further down the pipeline.
    """

    query: str
    positive: str
    negatives: list[str]
    teacher_scores: list[float] | None = None
    source: str = ""


def read_seed_json(path: str | Path) -> list[Example]:
    """A JSON list of example objects (the seed trainer's format)."""
    return _check_scores_consistent(
        (_example(record, where(path, line)) for line, record in iter_json_array(path)), path
    )


def read_jsonl(path: str | Path) -> list[Example]:
    """One example object per line."""
    return _check_scores_consistent((_example(record, where(path, line)) for line, record in iter_jsonl(path)), path)


def read_tsv_triples(path: str | Path) -> list[Example]:
    """MS MARCO-style `query<TAB>positive<TAB>negative` lines (more negative columns allowed; CRLF tolerated).

    Lines with the same query and positive become one Example whose negatives are all of theirs, in file order.
    """
    grouped: dict[tuple[str, str], Example] = {}
    for number, line in iter_lines(path):
        if not line.strip():
            continue
        row = _tsv_example(line, where(path, number))
        example = grouped.setdefault((row.query, row.positive), Example(row.query, row.positive, [], None, row.source))
        example.negatives.extend(row.negatives)
    if not grouped:  # as for JSON and JSONL: an empty file is a mistake, not a run with nothing to train on
        raise DataError(f"{path}: no examples")
    return list(grouped.values())


def _tsv_example(line: str, at: str) -> Example:
    """One `query<TAB>positive<TAB>negative...` line, checked."""
    fields = line.split("\t")
    if len(fields) < 3:
        raise DataError(f"{at}: expected 3 tab-separated columns (query, positive, negative), found {len(fields)}")
    for column, (name, value) in enumerate(zip(_tsv_column_names(len(fields)), fields), start=1):
        if not value.strip():
            raise DataError(f"{at}: column {column} ({name}) is empty")
    query, positive, *negatives = (f.strip() for f in fields)
    return Example(query, positive, list(negatives), None, at)


def _tsv_column_names(n: int) -> list[str]:
    return ["query", "positive"] + ["negative"] * (n - 2)


def _example(record: Any, at: str) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{at}: expected an object with query, positive_document and negative_documents")
    query = require_text(record, "query", at)
    positive = require_text(record, "positive_document", at)
    if "negative_documents" not in record:
        raise DataError(f"{at}: missing field 'negative_documents'")
    raw_negatives = record["negative_documents"]
    if not isinstance(raw_negatives, list):
        raise DataError(f"{at}: field 'negative_documents' must be a list")
    negatives: list[str] = []
    scores: list[float | None] = []
    for i, item in enumerate(raw_negatives):
        field = f"negative_documents[{i}]"
        if isinstance(item, str):
            if not item.strip():
                raise DataError(f"{at}: {field} is empty")
            negatives.append(require_unicode(item, f"{at}: {field}").strip())
            scores.append(None)
        elif isinstance(item, dict):
            negatives.append(require_text(item, "document", f"{at}: {field}").strip())
            scores.append(optional_score(item, "score", f"{at}: {field}"))
        else:
            raise DataError(f"{at}: {field} must be a string or an object with a 'document' field")
    positive_score = optional_score(record, "positive_score", at)
    teacher: list[float] | None = None
    if positive_score is not None or any(s is not None for s in scores):
        if positive_score is None:
            raise DataError(f"{at}: negatives carry teacher scores but 'positive_score' is missing")
        missing = [i for i, s in enumerate(scores) if s is None]
        if missing:
            raise DataError(
                f"{at}: teacher scores need a 'score' on every negative (missing on negative_documents[{missing[0]}])"
            )
        teacher = [positive_score, *scores]  # type: ignore[list-item]
    return Example(query.strip(), positive.strip(), negatives, teacher, at)


def _check_scores_consistent(examples: Iterable[Example], path: str | Path) -> list[Example]:
    """Teacher scores on some rows but not others would make distillation silently skip rows: refuse it."""
    out: list[Example] = []
    for example in examples:
        if out:
            require_same_scoring(example, out[0])
        out.append(example)
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def require_same_scoring(example: Example, first: Example) -> None:
    """A DataError unless `example` has teacher scores exactly when the file's first row has them."""
    if (example.teacher_scores is None) != (first.teacher_scores is None):
        has, lacks = (example, first) if example.teacher_scores is not None else (first, example)
        raise DataError(
            f"{example.source}: teacher scores on some rows only ({has.source} has them, {lacks.source} does not);"
            " give them on every row or on none"
        )


def select_negatives(examples: list[Example], n_negatives: int | None) -> list[Example]:
    """Give every example exactly n_negatives negatives (None: keep them all), deterministically.

    The i-th example of a query starts i*n into its negative list and wraps around, so a query's pairs see different
    negatives, and a list shorter than n is cycled. An example with no negatives cannot supply any: that is an error.
    """
    if n_negatives is None:
        return examples
    if n_negatives < 0:
        raise ValueError(f"n_negatives must be >= 0, got {n_negatives}")
    seen: dict[str, int] = {}
    out: list[Example] = []
    for example in examples:
        index = seen.get(example.query, 0)
        seen[example.query] = index + 1
        if n_negatives == 0:
            picks: list[int] = []
        elif not example.negatives:
            raise DataError(f"{example.source}: no negative documents, but {n_negatives} per example were asked for")
        else:
            start = index * n_negatives
            picks = [(start + j) % len(example.negatives) for j in range(n_negatives)]
        scores = None
        if example.teacher_scores is not None:
            scores = [example.teacher_scores[0]] + [example.teacher_scores[1 + p] for p in picks]
        out.append(Example(example.query, example.positive, [example.negatives[p] for p in picks], scores,
                           example.source))
    return out


def iter_records(examples: Iterable[Example]) -> Iterator[dict[str, Any]]:
    """Examples as seed-format objects (what read_jsonl reads back)."""
    for example in examples:
        record: dict[str, Any] = {"query": example.query, "positive_document": example.positive}
        if example.teacher_scores is None:
            record["negative_documents"] = list(example.negatives)
        else:
            record["positive_score"] = example.teacher_scores[0]
            record["negative_documents"] = [
                {"document": d, "score": s} for d, s in zip(example.negatives, example.teacher_scores[1:])
            ]
        yield record


# Rows read when used (a large file, a Hub dataset) are not all seen before training: the fewest negatives and the
# presence of teacher scores are judged from this many first rows, and later rows are held to them.
SAMPLE_ROWS = 1000


class ExamplesOnDemand(Sequence[Example]):
    """Examples built one at a time when asked for (prepared data, large files, Hub datasets): `len()`, indexing
    (negative indices and slices too) and iteration; a subclass gives `__len__` and `_row(index)`, and sets
    `min_negatives` and `has_teacher_scores` (from a manifest, or by `_judge_from_sample`)."""

    min_negatives: int
    has_teacher_scores: bool
    _first: Example | None = None  # set by _judge_from_sample: rows past the sample are checked against it
    _check_hint: str | None = None

    def _row(self, index: int) -> Example:
        raise NotImplementedError

    def _judge_from_sample(self, hint: str | None = None) -> None:
        sample = [self._row(i) for i in range(min(SAMPLE_ROWS, len(self)))]
        self._first, self._check_hint = sample[0], hint
        self.min_negatives = min(len(e.negatives) for e in sample)
        self.has_teacher_scores = self._first.teacher_scores is not None

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        example = self._row(index)
        if self._first is not None and index >= SAMPLE_ROWS:
            if len(example.negatives) < self.min_negatives:
                raise DataError(f"{example.source}: {len(example.negatives)} negative(s), but each of the first "
                                f"{SAMPLE_ROWS} rows has {self.min_negatives} or more, which training counts on",
                                hint=self._check_hint)
            require_same_scoring(example, self._first)
        return example


def min_negatives(examples: Sequence[Example]) -> int:
    """The fewest negatives any example has: what examples built on demand know (a manifest, a sample), else a scan."""
    if isinstance(examples, ExamplesOnDemand):
        return int(examples.min_negatives)
    return min(len(e.negatives) for e in examples)


def all_have_teacher_scores(examples: Sequence[Example]) -> bool:
    if isinstance(examples, ExamplesOnDemand):
        return bool(examples.has_teacher_scores)
    return all(e.teacher_scores is not None for e in examples)
