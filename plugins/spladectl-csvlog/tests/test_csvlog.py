"""spladectl-csvlog on its own: the CSV writer, the `csvlog show` command, and a real two-step training with the
plugin registered on a fresh plugin manager (no installation needed; the entry-point path is tested by the
repository's tests/test_third_party_plugin.py)."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner

import spladectl_csvlog
from spladectl_csvlog import CsvLog

PAIRS = [
    ("how do bees make honey", "Bees turn nectar into honey by evaporating water in the hive.",
     "Wasps build paper nests from chewed wood fibre."),
    ("why is the sky blue", "Rayleigh scattering sends short blue wavelengths across the sky.",
     "Sunsets look red because light crosses more atmosphere."),
    ("what makes bread rise", "Yeast ferments sugars and releases carbon dioxide that leavens dough.",
     "Baking soda reacts with acid to produce gas in quick breads."),
    ("how do volcanoes erupt", "Magma pressure from dissolved gases forces molten rock to the surface.",
     "Earthquakes happen when tectonic plates slip along faults."),
]


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def fake_state(tmp_path, step=0, main=True):
    """The plugin only reads output_dir, step, is_main_process and extras; a real run is tested below."""
    return SimpleNamespace(output_dir=tmp_path, step=step, is_main_process=main, extras={})


def test_header_grows_when_a_step_brings_new_keys(tmp_path):
    log = CsvLog(tmp_path / "metrics.csv")
    log.write({"step": 1, "loss": 2.5})
    log.write({"step": 2, "loss": 2.0, "lambda_q": 0.1, "hist": [1, 2]})
    log.close()
    got = rows(tmp_path / "metrics.csv")
    assert list(got[0]) == ["step", "loss", "lambda_q", "hist"]
    assert got[0] == {"step": "1", "loss": "2.5", "lambda_q": "", "hist": ""}
    assert got[1] == {"step": "2", "loss": "2.0", "lambda_q": "0.1", "hist": "[1, 2]"}


def train(state, steps: list[dict]) -> None:
    """Run the plugin's wrappers as the engine does: `train` around the whole training, `train_step` around each
    step (whose own result is the step's metrics)."""
    from spladectl.plugins import PluginManager, register

    manager = PluginManager()  # this plugin alone: the built-ins would want a whole TrainState
    register(manager, spladectl_csvlog, "csvlog", source="test")

    def training(state):
        for metrics in steps:
            manager.hook.train_step.call_extra([lambda state, m=metrics: dict(m)], {"state": state})
        return {}

    manager.hook.train.call_extra([training], {"state": state})


def test_resume_drops_the_rows_after_the_checkpoint(tmp_path):
    state = fake_state(tmp_path)
    train(state, [{"step": step, "loss": 1.0 / step} for step in (1, 2, 3, 4)])
    assert "csvlog" not in state.extras

    resumed = fake_state(tmp_path, step=2)
    train(resumed, [{"step": 3, "loss": 0.3}])
    assert [(r["step"], r["loss"]) for r in rows(tmp_path / "metrics.csv")] == [("1", "1.0"), ("2", "0.5"),
                                                                                ("3", "0.3")]


def test_only_the_main_process_writes(tmp_path):
    state = fake_state(tmp_path, main=False)
    train(state, [{"step": 1}])
    assert not (tmp_path / "metrics.csv").exists()


@pytest.fixture
def app():
    app = typer.Typer()

    @app.callback()
    def root():
        """A stand-in for the spladectl root app."""

    spladectl_csvlog.register_commands(cli=app)
    return app


def test_show_prints_the_last_steps(tmp_path, app):
    log = CsvLog(tmp_path / "metrics.csv")
    for step in range(1, 6):
        log.write({"step": step, "loss": 1 / step, "lr": 2e-5, "query_dims": 10.0, "doc_dims": 20.0,
                   "examples_per_s": 3.0})
    log.close()
    result = CliRunner().invoke(app, ["csvlog", "show", str(tmp_path), "--tail", "2", "--columns", "step,loss"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split() == ["step", "loss"]
    assert [line.split() for line in lines[1:3]] == [["4", "0.25"], ["5", "0.2"]]
    assert lines[-1] == "(2 of 5 steps)"


def flat(text: str) -> str:
    """Output without rich's panel borders and line wrapping."""
    return " ".join(text.replace("│", " ").split())


def test_show_names_what_is_missing(tmp_path, app):
    wide = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}  # keep the long tmp path on one line
    result = CliRunner().invoke(app, ["csvlog", "show", str(tmp_path)], env=wide)
    assert result.exit_code == 2 and f"{tmp_path / 'metrics.csv'}: no such file" in flat(result.output)
    CsvLog(tmp_path / "metrics.csv").write({"step": 1, "loss": 1.0})
    result = CliRunner().invoke(app, ["csvlog", "show", str(tmp_path), "--columns", "step,nope"], env=wide)
    assert result.exit_code == 2
    assert "column(s) nope not in" in flat(result.output) and "available: step, loss" in flat(result.output)


def test_a_real_training_writes_the_same_values_as_metrics_jsonl(tmp_path):
    from spladectl.config import TrainConfig
    from spladectl.data import Example
    from spladectl.engine import Trainer
    from spladectl.plugins import register
    from spladectl.plugin_loading import make_plugin_manager

    config = TrainConfig(output_dir=str(tmp_path / "out"), batch_size=4, max_steps=2, precision="32-true",
                         max_query_length=16, max_doc_length=32, seed=3)
    examples = [Example(query=q, positive=p, negatives=[n]) for q, p, n in PAIRS * 2]
    manager = make_plugin_manager(installed=False)  # the built-ins only
    register(manager, spladectl_csvlog, "csvlog", source="test")
    Trainer(config, examples, pm=manager, progress=False).fit()

    jsonl = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    table = rows(tmp_path / "out" / "metrics.csv")
    assert [r["step"] for r in table] == ["1", "2"]
    # tryfirst: the rows hold the keys the built-ins' wrappers add (lambda_q, memory_gb); the header
    # grew at step 2, when λ became non-zero and the flops_q/flops_d terms appeared
    assert set(table[0]) == set(jsonl[0]) | set(jsonl[1]) and {"lambda_q", "memory_gb", "flops_q"} <= set(table[0])
    assert table[0]["flops_q"] == "" and "flops_q" not in jsonl[0]
    for got, want in zip(table, jsonl):
        assert {k: float(got[k]) for k in want if k != "skipped"} == {k: float(v) for k, v in want.items()
                                                                      if k != "skipped"}
