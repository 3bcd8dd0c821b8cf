"""The third-party package plugins/spladectl-csvlog, installed (scripts/setup.sh does `pip install -e` it), through
the real entry-point path in fresh `spladectl` processes: listed by `plugins list`, switched off by SPLADECTL_PLUGINS,
called by a short `spladectl train`, and its `csvlog show` command added to the CLI.

Its own unit tests are in plugins/spladectl-csvlog/tests (also collected by the repository's `python -m pytest`).
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spladectl import plugin_loading
from spladectl import plugin_errors
from tiny import TOPICS

DIST = "spladectl-csvlog"
SPLADECTL = Path(sys.executable).with_name("spladectl")
@pytest.fixture(scope="module", autouse=True)
def installed():
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{DIST} is not installed: run scripts/setup.sh (pip install -e plugins/{DIST})")
    return dist


def spladectl(*args: str, plugins_env: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != plugin_loading.ENV_VAR}
    if plugins_env is not None:
        env[plugin_loading.ENV_VAR] = plugins_env
    env["COLUMNS"] = "200"
    command = [str(SPLADECTL)] if SPLADECTL.exists() else [sys.executable, "-m", "spladectl"]
    return subprocess.run(command + list(args), env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_listed_through_its_entry_point(installed):
    result = spladectl("plugins", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["csvlog"] == {"name": "csvlog", "builtin": False, "source": "entry point", "distribution": DIST,
                              "version": installed.version,
                              "hooks": ["register_commands", "train", "train_step"]}
    off = spladectl("plugins", "list", "--json", plugins_env="")
    assert off.returncode == 0 and "csvlog" not in {row["name"] for row in json.loads(off.stdout)}


def test_selection_by_name_in_process():
    import typer

    assert "csvlog" in plugin_loading.make_plugin_manager(env={}).sources
    assert "csvlog" in plugin_loading.make_plugin_manager(env={plugin_loading.ENV_VAR: "csvlog"}).sources
    assert "csvlog" in plugin_loading.make_plugin_manager(env={plugin_loading.ENV_VAR: "spladectl_CSVLOG"}).sources  # dist name
    off = plugin_loading.make_plugin_manager(env={plugin_loading.ENV_VAR: "something-else"})
    assert "csvlog" not in off.sources
    app = typer.Typer()
    plugin_errors.call_register_commands(app, off)
    assert not app.registered_groups  # switched off: no `csvlog` command either


def test_a_short_training_calls_it_and_its_command_reads_the_result(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"query": q, "positive_document": p, "negative_documents": [n]}) + "\n"
                            for q, p, n in TOPICS))
    train = ["train", "--data", str(data), "--max-steps", "2", "--profile", "cpu", "--precision", "32-true",
             "--batch-size", "4", "--grad-accum", "1", "--max-query-length", "16", "--max-doc-length", "32",
             "--no-progress"]
    result = spladectl(*train, "--output-dir", str(tmp_path / "on"))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "on" / "metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    jsonl = [json.loads(line) for line in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in table] == ["1", "2"]
    assert [float(row["loss"]) for row in table] == [row["loss"] for row in jsonl]

    shown = spladectl("csvlog", "show", str(tmp_path / "on"), "--columns", "step,loss")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["step", "loss"] and lines[1].split()[0] == "1" and lines[-1] == "(2 of 2 steps)"
    assert float(lines[2].split()[1]) == pytest.approx(jsonl[1]["loss"], rel=1e-3)
