"""`--data org/name`: a Hugging Face dataset read from the user's `datasets` cache, offline.

The Hub cannot be reached here, so the fixture leaves in a private HF_HOME what `datasets.load_dataset(NAME)` leaves
after a download: the split's Arrow file and dataset_info.json under datasets/<org>___<name>/<config>/<version>/<hash>/
(written by datasets itself from a JSONL file, then placed under the Hub name)."""

from __future__ import annotations

import json
import shutil

import pytest

from spladectl.data import load_training_data
from spladectl.data.hub import HubExamples
from spladectl.errors import DataError
import tiny

datasets = pytest.importorskip("datasets")
NAME = "spladectl-test/tiny-triples"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    # datasets read the variable when it was imported (at collection): point its setting there too
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"anchor": q, "positive": p, "negative_1": n, "negative_2": f"{n} too"}) + "\n"
                              for q, p, n in tiny.TOPICS))
    built = datasets.load_dataset("json", data_files=str(source), split="train", cache_dir=str(tmp_path / "build"))
    folder = shutil.os.path.dirname(built.cache_files[0]["filename"])
    target = home / "datasets" / "spladectl-test___tiny-triples" / "default" / "0.0.0" / "0123abcd"
    target.mkdir(parents=True)
    with open(f"{folder}/dataset_info.json") as fh:
        info = json.load(fh)
    info.update(builder_name="tiny-triples", dataset_name="tiny-triples", config_name="default")
    (target / "dataset_info.json").write_text(json.dumps(info))
    shutil.copy(f"{folder}/json-train.arrow", target / "tiny-triples-train.arrow")
    return home


def test_a_cached_hub_dataset_is_training_data(hub_cache, tmp_path, cli):
    examples = load_training_data(NAME)
    assert isinstance(examples, HubExamples) and len(examples) == len(tiny.TOPICS)
    assert [(e.query, e.positive, e.negatives) for e in examples] == \
        [(q, p, [n, f"{n} too"]) for q, p, n in tiny.TOPICS]
    assert examples[2].source == f"{NAME} [train] row 3" and examples.min_negatives == 2
    result = cli("train", "--data", NAME, "--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--batch-size",
                 "4", "--max-query-length", "16", "--max-doc-length", "32", "--precision", "32-true", "--no-progress")
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_name_that_is_not_cached_is_a_clear_error(hub_cache, tmp_path, cli):
    with pytest.raises(DataError, match="not found in the Hugging Face datasets cache"):
        load_training_data("spladectl-test/absent")
    with pytest.raises(DataError, match="not found in the Hugging Face datasets cache"):
        load_training_data(NAME, split="validation")
    result = cli("train", "--data", "spladectl-test/absent", "--output-dir", str(tmp_path / "run"), "--no-progress")
    assert result.exit_code == 2 and "datasets.load_dataset('spladectl-test/absent')" in result.output, result.output
    assert "Traceback" not in result.output
