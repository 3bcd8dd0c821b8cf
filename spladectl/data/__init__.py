"""Training and evaluation data: seed JSON/JSONL, TSV triples and BEIR directories, and BM25 hard-negative mining.

See docs/data.md for the formats, the mining cache and the validation errors.
"""

from spladectl.data.beir import BeirDataset, available_splits, is_beir_dir, load_beir, load_corpus, write_beir
from spladectl.data.examples import Example, read_jsonl, read_seed_json, read_tsv_triples, select_negatives
from spladectl.data.loading import FORMATS, beir_examples, detect_format, load_training_data
from spladectl.data.mining import cached_hard_negatives, mine_hard_negatives

__all__ = [
    "BeirDataset",
    "Example",
    "FORMATS",
    "available_splits",
    "beir_examples",
    "cached_hard_negatives",
    "detect_format",
    "is_beir_dir",
    "load_beir",
    "load_corpus",
    "load_training_data",
    "mine_hard_negatives",
    "read_jsonl",
    "read_seed_json",
    "read_tsv_triples",
    "select_negatives",
    "write_beir",
]
