"""Training data named like a Hugging Face Hub dataset (`--data sentence-transformers/msmarco-bm25`), read from the
user's `datasets` cache: memory-mapped Arrow, an Example built per row when a micro-batch asks for it.

Only what is cached is read (datasets' offline mode): spladectl never downloads data behind the user's back. Download
once with `datasets.load_dataset(NAME)` (or `huggingface-cli download --repo-type dataset NAME`) where the network is.

Columns, by the names the field's triplet datasets use:
- the query: `query`, `anchor` or `question`;
- the positive: `positive`, `positive_document` or `pos`;
- negatives: `negative_documents`, `negatives` or `neg` (a list of strings), or `negative`, or `negative_1` ...
  `negative_N` (one string each); none at all is allowed (in-batch negatives only).
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from typing import Any, Iterator

from spladectl.data.examples import Example, ExamplesOnDemand
from spladectl.errors import DataError

QUERY_COLUMNS = ("query", "anchor", "question")
POSITIVE_COLUMNS = ("positive", "positive_document", "pos")
LIST_NEGATIVE_COLUMNS = ("negative_documents", "negatives", "neg")
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")


def looks_like_hub_name(text: str) -> bool:
    """`org/name` or `org/name:subset`, for a path that does not exist."""
    return bool(_NAME.match(text)) and not os.path.exists(text)


@contextmanager
def _offline() -> Iterator[None]:
    """datasets' and huggingface_hub's offline switches, on for the block. They are read from the environment when
    those packages are imported (transformers imports huggingface_hub long before), so the flags are set too."""
    import datasets.config
    import huggingface_hub.constants

    flags = [(datasets.config, "HF_DATASETS_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
             (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    saved = [(module, key, getattr(module, key)) for module, key in flags]
    for module, key in flags:
        setattr(module, key, True)
    try:
        yield
    finally:
        for module, key, value in saved:
            setattr(module, key, value)


class HubExamples(ExamplesOnDemand):
    """The rows of a cached Hub dataset's split as Examples (see the module's docstring)."""

    def __init__(self, name: str, split: str = "train"):
        try:
            import datasets
        except ImportError:
            raise DataError(f"{name}: a Hugging Face dataset name needs the `datasets` package",
                            hint="pip install 'spladectl[large-data]'") from None
        self.name, self.split = name, split
        repo, _, subset = name.partition(":")
        try:
            with _offline():
                dataset = datasets.load_dataset(repo, subset or None, split=split)
        except Exception as exc:  # noqa: BLE001 - not cached, no such split or subset: datasets raises many types
            raise DataError(f"{name}: not found in the Hugging Face datasets cache (split {split!r}): "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                            hint=f"download it once where the network is: python -c \"import datasets; "
                                 f"datasets.load_dataset('{repo}'{', ' + repr(subset) if subset else ''})\"") from None
        self._dataset = dataset
        self._columns = self._choose_columns(dataset.column_names)
        if len(self) == 0:
            raise DataError(f"{name} [{split}]: no rows")
        self._judge_from_sample()

    def _choose_columns(self, names: list[str]) -> dict[str, Any]:
        def first(options):
            return next((c for c in options if c in names), None)

        query, positive = first(QUERY_COLUMNS), first(POSITIVE_COLUMNS)
        if query is None or positive is None:
            raise DataError(f"{self.name} [{self.split}]: columns {', '.join(names)}: no "
                            + ("query (query, anchor, question)" if query is None else
                               "positive (positive, positive_document, pos)") + " column")
        listed = first(LIST_NEGATIVE_COLUMNS)
        numbered = sorted((c for c in names if re.fullmatch(r"negative_\d+", c)), key=lambda c: int(c[9:]))
        single = ["negative"] if "negative" in names else []
        return {"query": query, "positive": positive, "listed": listed, "single": numbered or single}

    def __len__(self) -> int:
        return self._dataset.num_rows

    def _row(self, index: int) -> Example:
        row = self._dataset[index]
        at = f"{self.name} [{self.split}] row {index + 1}"
        c = self._columns
        query, positive = row[c["query"]], row[c["positive"]]
        negatives = list(row[c["listed"]] or []) if c["listed"] else [row[k] for k in c["single"]]
        for field, value in [(c["query"], query), (c["positive"], positive),
                             *((f"negative {i + 1}", n) for i, n in enumerate(negatives))]:
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{at}: {field} is {'empty' if isinstance(value, str) else type(value).__name__}")
        return Example(query.strip(), positive.strip(), [n.strip() for n in negatives], None, at)

    def __reduce__(self):
        return (HubExamples, (self.name, self.split))

    def __repr__(self) -> str:
        return f"HubExamples({self.name!r}, split={self.split!r}, {len(self)} rows)"
