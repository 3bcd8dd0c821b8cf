"""`spladectl train` through the CLI: files on disk, resolved settings, user errors, the demo."""

from __future__ import annotations

import json
import re

import pytest

ROWS = [
    {"query": "how do bees make honey", "positive_document": "Bees evaporate nectar into honey in the hive.",
     "negative_documents": ["Wasps build paper nests.", {"document": "Ants farm aphids for honeydew."}]},
    {"query": "what makes bread rise", "positive_document": "Yeast releases carbon dioxide that leavens dough.",
     "negative_documents": ["Baking soda reacts with acid."]},
    {"query": "why is the sky blue", "positive_document": "Rayleigh scattering favours short blue wavelengths.",
     "negative_documents": ["Sunsets are red."]},
    {"query": "what causes tides", "positive_document": "The moon's gravity raises bulges of ocean water.",
     "negative_documents": ["Currents follow the wind."]},
]
SMALL = ["--max-query-length", "16", "--max-doc-length", "32", "--batch-size", "2", "--no-progress"]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "triples.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def test_train_writes_everything_it_promises(cli, data, tmp_path):
    out = tmp_path / "out"
    result = cli("train", "--data", str(data), "-o", str(out), "--max-steps", "2", "--precision", "fp32",
                 "--save-every", "1", *SMALL, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "finished" and summary["steps"] == 2
    assert (out / "config.toml").read_text().count("precision = \"32-true\"") == 1  # the alias, canonicalised
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "splade_config.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    # the settings and where they came from are printed before training (on stderr with --json)
    assert "precision" in result.stderr and "flag --precision" in result.stderr


def test_resume_latest_continues_from_the_last_checkpoint(cli, data, tmp_path):
    out = tmp_path / "out"
    assert cli("train", "--data", str(data), "-o", str(out), "--max-steps", "1", *SMALL).exit_code == 0
    result = cli("train", "--data", str(data), "-o", str(out), "--max-steps", "2", "--resume", "latest", *SMALL)
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "step 1" in result.output
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_malformed_row_names_file_and_line(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"query": "no positive here"}) + "\n")
    result = cli("train", "--data", str(bad), "-o", str(tmp_path / "out"), *SMALL, env={"COLUMNS": "2000"})
    assert result.exit_code == 2
    assert f"{bad}:2" in result.output and "Traceback" not in result.output
    # The run records why it failed, and nothing of a training is half-written.
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["status"] == "failed" and f"{bad}:2" in run["error"] and run["traceback"] is None
    written = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != ".lock")  # the lock stays, empty
    assert written == ["config.toml", "env.json", "run.json"]


@pytest.mark.parametrize("args, message", [
    (["--force-device", "cuda"], "cuda"),
    (["--precision", "fp8"], "fp8"),
    (["--resume", "latest"], "no checkpoint"),
    (["--plugin", "no_such_module:thing"], "no_such_module"),
    (["--on-collapse", "halt"], "--on-collapse 'halt'"),
])
def test_user_errors_exit_2_without_a_traceback(cli, data, tmp_path, args, message):
    result = cli("train", "--data", str(data), "-o", str(tmp_path / "out"), "--max-steps", "1", *SMALL, *args,
                 env={"COLUMNS": "2000"})
    assert result.exit_code in (1, 2) and message in result.output, result.output
    assert "Traceback" not in result.output


def test_demo_prints_held_out_quality_before_and_after(cli, tmp_path):
    result = cli("train", "-o", str(tmp_path / "demo"), "--max-steps", "2", "--no-progress", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    before, after = summary["heldout_before"], summary["heldout_after"]
    assert 0.3 < before["nDCG@10"] <= 1.0 and 0.3 < after["nDCG@10"] <= 1.0
    assert "held-out quality before training" in result.stderr
    # The demo's own settings are labelled as such, not as flags the user typed.
    assert re.search(r"batch_size\s+16\s+demo default", result.stderr), result.stderr
