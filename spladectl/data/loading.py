"""`load_training_data`: one entry point for every training-data format, chosen from the path."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from spladectl.data.beir import BeirDataset, is_beir_dir, load_beir
from spladectl.data.examples import (
    Example,
    ExamplesOnDemand,
    read_jsonl,
    read_seed_json,
    read_tsv_triples,
    select_negatives,
)
from spladectl.data.mining import cached_hard_negatives
from spladectl.data.prepared import PreparedExamples, is_prepared
from spladectl.errors import DataError

FORMATS = ("beir", "json", "jsonl", "tsv", "prepared", "hub")
_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".tsv": "tsv"}
DEFAULT_MINE_K = 50


def detect_format(path: str | Path) -> str:
    """'hub' for `org/name` that is no path (a cached Hugging Face dataset), 'prepared' for a directory written by
    `spladectl data prepare`, 'beir' for one with corpus.jsonl, else from the suffix (.json/.jsonl/.tsv, optionally
    .gz), else from the first character: '[' seed JSON, '{' JSONL, a tab on the first line TSV."""
    from spladectl.data.hub import looks_like_hub_name

    if looks_like_hub_name(str(path)):
        return "hub"
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        if is_prepared(path):
            return "prepared"
        if is_beir_dir(path):
            return "beir"
        raise DataError(f"{path}: a directory, but neither a BEIR one (corpus.jsonl, queries.jsonl, qrels/ expected) "
                        "nor one written by `spladectl data prepare`")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    if suffixes and suffixes[-1] in _SUFFIXES:
        return _SUFFIXES[suffixes[-1]]
    return _sniff(path)


def load_training_data(
    path: str | Path,
    *,
    split: str = "train",
    n_negatives: int | None = None,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
    mine_k: int = DEFAULT_MINE_K,
    stem: bool | None = None,
) -> Sequence[Example]:
    """Training examples from seed JSON, JSONL, TSV triples, a BEIR directory or a prepared directory (a sequence
    read on demand; see spladectl.data.prepared). JSONL and TSV files over indexed.INDEX_BYTES are read a row at a
    time when used (spladectl.data.indexed).

    - n_negatives: negatives per example (see select_negatives: a query's pairs get different ones, short lists
      cycle); None keeps every negative the data gives.
    - BEIR only: `split` names qrels/<split>.tsv; every (query, positive) pair with score > 0 is one Example, its
      negatives are the query's BM25 hard negatives (mine_k of them, mined once and cached, see cached_hard_negatives;
      `cache_dir` overrides where), `stem` chooses BM25 stemming (None: when PyStemmer is installed).
    Any malformed row is a DataError naming its file and line.
    """
    fmt = detect_format(path)
    if fmt == "hub":
        from spladectl.data.hub import HubExamples

        examples = HubExamples(str(path), split)
    elif fmt == "prepared":
        examples = PreparedExamples(path)
    elif fmt == "beir":
        dataset = load_beir(path, split)
        negatives = cached_hard_negatives(path, split, mine_k, cache_dir=cache_dir, stem=stem,
                                          show_progress=show_progress, dataset=dataset)
        examples = beir_examples(dataset, negatives)
    elif fmt in ("jsonl", "tsv") and _read_by_offset(Path(path)):
        examples = _indexed(Path(path), fmt, show_progress)
    else:
        examples = {"json": read_seed_json, "jsonl": read_jsonl, "tsv": read_tsv_triples}[fmt](path)
    if isinstance(examples, ExamplesOnDemand) and n_negatives is None:
        return examples  # rows built when used: memory does not grow with the data
    return select_negatives(list(examples), n_negatives)


def _read_by_offset(path: Path) -> bool:
    """Large uncompressed JSONL and TSV files are read a row at a time (spladectl.data.indexed); others whole."""
    from spladectl.data import indexed

    return path.suffix.lower() != ".gz" and path.stat().st_size > indexed.INDEX_BYTES


def _indexed(path: Path, fmt: str, show_progress: bool):
    from tqdm.auto import tqdm

    from spladectl.data.indexed import IndexedExamples

    with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"indexing the rows of {path.name}",
              disable=not show_progress, leave=False) as bar:
        return IndexedExamples(path, fmt, progress=lambda done: bar.update(done - bar.n))


def beir_examples(dataset: BeirDataset, negatives: dict[str, list[str]]) -> list[Example]:
    """One Example per positive qrels row, in qrels order, with the query's mined negatives."""
    unknown = sorted({d for ids in negatives.values() for d in ids} - dataset.corpus.keys())
    if unknown:  # only a hand-edited cache can do this; the cache key follows the corpus file
        raise DataError(
            f"mined negatives name documents not in the corpus ({unknown[0]!r}); delete the negatives cache"
        )
    examples = []
    for qid, query in dataset.queries.items():
        for doc_id in dataset.positives(qid):
            examples.append(Example(
                query=query,
                positive=dataset.corpus[doc_id],
                negatives=[dataset.corpus[d] for d in negatives.get(qid, [])],
                source=f"{dataset.qrels_path}:{dataset.qrels_lines.get((qid, doc_id), '?')}",
            ))
    if not examples:
        raise DataError(f"{dataset.qrels_path}: no positive judgments (score > 0), so no training examples")
    return examples


def _sniff(path: Path) -> str:
    from spladectl.data._io import iter_lines

    for _, line in iter_lines(path):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("["):
            return "json"
        if stripped.startswith("{"):
            return "jsonl"
        if "\t" in line:
            return "tsv"
        break
    raise DataError(
        f"{path}: cannot tell the format; use a .json (list of examples), .jsonl or .tsv (triples) file, "
        "or a BEIR directory"
    )
