"""`spladectl tune` on Optuna, for real: studies of splade-tiny trainings in SQLite databases.

What is checked: the [search] table and its mistakes; trials that are runs in the registry, linked both ways; a pruned
trial that stops at the evaluation where the pruner judged it; several worker processes sharing one SQLite study
with no trial lost or run twice; a worker killed with SIGKILL whose trial is marked failed and run again, with the
same parameters, by another worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spladectl.errors import SpladectlError
from spladectl.runs.record import load_record
from tiny import write_eval_beir, write_jsonl

optuna = pytest.importorskip("optuna")

WIDE = {"COLUMNS": "250", "MLFLOW_TRACKING_URI": None}
BASE = """
[base]
data = "{data}"
profile = "cpu"
precision = "32-true"
max-steps = {steps}
batch-size = 2
grad-accum = 1
max-query-length = 16
max-doc-length = 32
warmup-ratio = 0.0
seed = 7
{evaluation}
"""


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    return {"data": write_jsonl(tmp / "triples.jsonl"), "beir": write_eval_beir(tmp / "beir"), "tmp": tmp}


def experiment(path: Path, material, *, name: str, search: str, steps: int = 2, evaluate: bool = True,
               extra: str = "") -> Path:
    evaluation = f'eval-data = "{material["beir"]}"\neval-every = 1' if evaluate else ""
    path.write_text(f'name = "{name}"\n{extra}\n' + BASE.format(data=material["data"], steps=steps,
                                                                 evaluation=evaluation) + f"\n[search]\n{search}\n")
    return path


def spladectl(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "250"}
    return subprocess.Popen([sys.executable, "-m", "spladectl", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def trials(storage: str, study: str):
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


# ------------------------------------------------------------------------------------------------ the search table
@pytest.mark.parametrize("search, message", [
    ("lr = { low = 1e-3, high = 1e-5 }", "[search] lr: low 0.001 is above high 1e-05"),
    ("lr = { low = 0.0, high = 1e-3, log = true }", "[search] lr: a log scale needs low > 0"),
    ("lr = { low = 1e-5 }", "[search] lr: a range needs `high`"),
    ("lr = { low = 1e-5, high = 1e-3, lg = true }", "[search] lr: unknown key(s) lg"),
    ("lr = { low = 1e-5, high = 1e-3, log = true, step = 1e-5 }", "give either log or step"),
    ("lr = []", "[search] lr: an empty list of choices"),
    ("lr = 1e-4", "expected a list of choices or a range"),
    ("lamda_q = [1e-4, 1e-3]", "unknown train option 'lamda_q' (did you mean lambda_q?)"),
    ("max-steps = [1, 2]", "max_steps in both [base] and [search]"),
])
def test_a_mistake_in_the_search_table_names_the_file_and_key(tmp_path, material, cli, search, message):
    path = experiment(tmp_path / "bad.toml", material, name="bad", search=search)
    result = cli("tune", str(path), "--storage", f"sqlite:///{tmp_path / 'x.db'}", env=WIDE)
    assert result.exit_code == 2, result.output
    assert str(path) in result.output and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.db").exists()  # refused before the study was created


def test_tune_and_sweep_refuse_each_others_files(tmp_path, material, cli):
    searched = experiment(tmp_path / "s.toml", material, name="s", search="lr = { low = 1e-5, high = 1e-3 }")
    result = cli("sweep", str(searched), "--runs-root", str(tmp_path / "runs"), env=WIDE)
    assert result.exit_code == 2 and "[search] holds ranges for `spladectl tune`" in result.output, result.output
    gridded = tmp_path / "g.toml"
    gridded.write_text(searched.read_text().replace("[search]", "[grid]").replace(
        "lr = { low = 1e-5, high = 1e-3 }", "lr = [1e-5, 1e-3]"))
    result = cli("tune", str(gridded), "--storage", f"sqlite:///{tmp_path / 'g.db'}", env=WIDE)
    assert result.exit_code == 2 and "[grid] and [[points]] are what `spladectl sweep` runs" in result.output, result.output
    blind = experiment(tmp_path / "b.toml", material, name="b", search="lr = { low = 1e-5, high = 1e-3 }",
                       evaluate=False)
    result = cli("tune", str(blind), "--storage", f"sqlite:///{tmp_path / 'b.db'}", env=WIDE)
    assert result.exit_code == 2 and "set eval-data and eval-every in [base]" in result.output, result.output


# ------------------------------------------------------------------------------------------------ a study, its runs
def test_a_study_of_three_trials_is_three_linked_runs(tmp_path, material, cli):
    path = experiment(tmp_path / "small.toml", material, name="small",
                      search='lr = { low = 1e-5, high = 1e-3, log = true }\nlambda_q = [1e-4, 1e-2]')
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    root = tmp_path / "runs"
    result = cli("tune", str(path), "--trials", "3", "--storage", storage, "--runs-root", str(root),
                 "--startup-trials", "1", "--seed", "1", "--no-progress", "--json", env=WIDE)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{\n"):])
    assert summary["counts"]["complete"] + summary["counts"]["pruned"] == 3
    assert [t["number"] for t in summary["trials"]] == [0, 1, 2]
    for row in summary["trials"]:
        record = load_record(root / "small" / f"trial-{row['number']:04d}")
        # the run knows its trial, the trial its run, and both carry the sampled parameters
        assert record.trial["study"] == "small" and record.trial["number"] == row["number"]
        assert record.trial["state"] == row["state"] and row["run"] == record.id == f"small/trial-{row['number']:04d}"
        assert record.options["lr"] == pytest.approx(row["params"]["lr"])
        assert record.options["lambda_q"] == row["params"]["lambda_q"]
        assert record.status == ("finished" if row["state"] == "complete" else "pruned")
        if row["state"] == "complete":  # the value the study holds is the run's final nDCG@10
            assert row["value"] == pytest.approx(record.final_metrics["nDCG@10"])
    best = max((t for t in summary["trials"] if t["state"] == "complete"), key=lambda t: t["value"])
    assert summary["best"]["number"] == best["number"]
    # --status reads the same study back; runs list sees the trials as runs of the study
    status = cli("tune", str(path), "--status", "--storage", storage, "--json", env=WIDE)
    assert status.exit_code == 0 and json.loads(status.stdout)["trials"] == summary["trials"]
    listed = cli("runs", "list", "--runs-root", str(root), "--sweep", "small", "--json", env=WIDE)
    assert sorted(r["id"] for r in json.loads(listed.stdout)) == [f"small/trial-000{i}" for i in range(3)]
    # a second worker on the same storage joins the finished study and has nothing to do
    again = cli("tune", str(path), "--trials", "3", "--storage", storage, "--runs-root", str(root), "--no-progress",
                env=WIDE)
    assert again.exit_code == 0 and len(trials(storage, "small")) == 3, again.output
    # ... but a file changed since is not the same study
    path.write_text(path.read_text().replace("high = 1e-3", "high = 1e-2"))
    changed = cli("tune", str(path), "--storage", storage, "--runs-root", str(root), env=WIDE)
    assert changed.exit_code == 2 and "was started with other search" in changed.output, changed.output


def test_a_pruned_trial_stops_at_the_evaluation_that_judged_it(tmp_path, material):
    """Through run_study with a pruner that prunes whatever it is shown (the CLI's pruners need a history first)."""
    from spladectl.cli.sweep import train_as_typed
    from spladectl.cli.train import train_command
    from spladectl.runs.experiment import load_experiment
    from spladectl.runs.tuning import TuneSettings, _storage, run_study

    path = experiment(tmp_path / "p.toml", material, name="p", search="lr = [1e-4]", steps=4)
    command = train_command()
    exp = load_experiment(path, command)
    settings = TuneSettings(storage=f"sqlite:///{tmp_path / 'p.db'}", trials=1)
    study = optuna.create_study(study_name="p", storage=_storage(settings), direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=2.0))  # nDCG@10 is never 2
    root = tmp_path / "runs"
    lines: list[str] = []
    outcomes = run_study(exp, study, settings, "nDCG@10", root, log=lines.append,
                         train=lambda options, target: train_as_typed(command, options, target, runs_root=root,
                                                                      progress=False, log=lines.append))
    assert [o.state for o in outcomes] == ["pruned"]
    trial = study.get_trials()[0]
    assert list(trial.intermediate_values) == [1]  # reported once, at step 1, then stopped
    record = load_record(root / "p" / "trial-0000")
    assert record.status == "pruned" and record.steps == 1 and record.trial["state"] == "pruned"
    assert "pruned at step 1" in record.trial["pruned"]
    assert [json.loads(line)["step"] for line in (root / "p" / "trial-0000" / "metrics.jsonl").open()] == [1]
    assert (root / "p" / "trial-0000" / "final" / "model.safetensors").is_file()


def test_training_stops_after_an_evaluation_when_a_plugin_asks(tmp_path, pm, registered):
    """The engine's side of pruning: state.stop_requested set in on_evaluate ends training there."""
    from spladectl.engine import Trainer
    from spladectl.hookspecs import hookimpl
    from tiny import config, examples

    class StopAtTwo:
        @hookimpl
        def on_evaluate(self, state, metrics, final):
            if state.step == 2 and not final:
                state.stop_requested = "enough"

    registered(StopAtTwo())
    trainer = Trainer(config(tmp_path, max_steps=5, eval_every=1), examples(), pm=pm,
                      eval_fn=lambda model: {"nDCG@10": 0.5}, log=lambda _: None)
    result = trainer.fit()
    assert result["steps"] == 2 and result["stopped"] == "enough"
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ several workers
def test_three_workers_share_one_sqlite_study(tmp_path, material):
    path = experiment(tmp_path / "shared.toml", material, name="shared", steps=1, evaluate=False,
                      search="lr = { low = 1e-5, high = 1e-3, log = true }")
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    args = ("tune", str(path), "--trials", "6", "--storage", storage, "--pruner", "none", "--runs-root",
            str(tmp_path / "runs"), "--no-progress")
    workers = [spladectl(*args, cwd=tmp_path) for _ in range(3)]
    results = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], [err[-2000:] for _, err in results]
    done = trials(storage, "shared")
    numbers = [t.number for t in done]
    assert len(numbers) == len(set(numbers))
    # each worker checks the count before it starts a trial: at most one extra trial per other worker
    assert 6 <= len(done) <= 8 and all(t.state.name == "COMPLETE" for t in done), done
    run_dirs = sorted(p.name for p in (tmp_path / "runs" / "shared").iterdir() if p.name.startswith("trial-"))
    assert run_dirs == [f"trial-{n:04d}" for n in sorted(numbers)]  # one run per trial, none run twice
    for t in done:
        record = load_record(tmp_path / "runs" / "shared" / f"trial-{t.number:04d}")
        assert record.status == "finished" and record.trial["number"] == t.number
        assert record.final_metrics["loss"] == pytest.approx(t.value)
    # who ran what: every worker's output names the trials it ran, and no trial twice
    ran = [int(line.split()[1].rstrip(":")) for out, _ in results for line in out.splitlines()
           if line.startswith("trial ") and ": complete" in line]
    assert sorted(ran) == sorted(numbers)


def test_a_killed_workers_trial_is_marked_failed_and_run_again(tmp_path, material):
    path = experiment(tmp_path / "kill.toml", material, name="kill", steps=100, evaluate=False,
                      search="lr = { low = 1e-5, high = 1e-3, log = true }")
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    common = ("--storage", storage, "--pruner", "none", "--heartbeat", "1", "--runs-root", str(tmp_path / "runs"),
              "--no-progress")
    victim = spladectl("tune", str(path), "--trials", "1", *common, cwd=tmp_path)
    metrics = tmp_path / "runs" / "kill" / "trial-0000" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):  # mid-training
        assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    (killed,) = trials(storage, "kill")
    assert killed.state.name == "RUNNING"  # nobody knows yet
    time.sleep(3)  # past the grace period of two heartbeats
    rescuer = spladectl("tune", str(path), "--trials", "1", *common, cwd=tmp_path)
    out, err = rescuer.communicate(timeout=900)
    assert rescuer.returncode == 0, err
    first, again = trials(storage, "kill")
    assert first.state.name == "FAIL" and again.state.name == "COMPLETE"
    assert again.params == first.params and again.system_attrs["failed_trial"] == 0
    assert "trial 1: " in out and "(trial 0 again: its worker died)" in out
    # the killed run says so in the registry; the retry is a run of its own
    assert load_record(tmp_path / "runs" / "kill" / "trial-0000").effective_status() == "stale"
    assert load_record(tmp_path / "runs" / "kill" / "trial-0001").status == "finished"


def test_three_sweep_processes_on_one_runs_root_run_each_point_once(tmp_path, material):
    """The shared-runs-root claim of `spladectl sweep --resume`, kept beside the database because it needs nothing
    installed: three processes started together, six points, each trained once."""
    path = tmp_path / "grid.toml"
    path.write_text('name = "grid"\n' + BASE.format(data=material["data"], steps=1, evaluation="")
                    + "\n[grid]\nlr = [1e-5, 2e-5, 3e-5, 4e-5, 5e-5, 6e-5]\n")
    args = ("sweep", str(path), "--resume", "--runs-root", str(tmp_path / "runs"), "--no-plot", "--no-progress")
    workers = [spladectl(*args, cwd=tmp_path) for _ in range(3)]
    results = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], [err[-2000:] for _, err in results]
    started = [line.split("] ")[1].split(":")[0] for out, _ in results for line in out.splitlines()
               if line.startswith("[") and line.endswith(": starting")]
    assert sorted(started) == sorted(f"lr={v}" for v in ("1e-05", "2e-05", "3e-05", "4e-05", "5e-05", "6e-05"))
    for point in started:
        record = load_record(tmp_path / "runs" / "grid" / point)
        assert record.status == "finished" and record.steps == 1 and record.resumes == 0


# ------------------------------------------------------------------------------------------------ fuzzing the table
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

NUMBER = st.one_of(st.integers(-5, 50), st.floats(-1.0, 1.0), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0, 1e-6, 3e-3, True, "1e-4", None]))
SPEC = st.one_of(
    st.fixed_dictionaries({"low": NUMBER, "high": NUMBER},
                          optional={"log": st.sampled_from([True, False, 1, "yes"]), "step": NUMBER,
                                    "scale": st.just("log")}),
    st.lists(st.one_of(st.integers(0, 9), st.sampled_from(["32-true", "bf16-mixed", ""]), st.booleans()),
             max_size=4),
    NUMBER,
)


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items() if v is not None) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {float("inf"): "inf", float("-inf"): "-inf"}.get(value, "nan" if value != value else repr(value))
    return json.dumps(value) if value is not None else '"none"'


@settings(max_examples=int(os.environ.get("SPLADECTL_TUNE_FUZZ", 60)), deadline=None)
@given(spec=SPEC, option=st.sampled_from(["lr", "lambda_d", "n-negatives", "precision"]))
def test_any_search_table_loads_as_written_or_names_the_file_and_key(tmp_path_factory, spec, option):
    """Every [search] entry either becomes the dimension it describes or is refused naming the file and the key."""
    from spladectl.cli.train import train_command
    from spladectl.runs.experiment import load_experiment

    path = tmp_path_factory.mktemp("fuzz") / "search.toml"
    path.write_text(f"[base]\nmax-steps = 1\n[search]\n{option} = {_toml(spec)}\n")
    try:
        exp = load_experiment(path, train_command())
    except SpladectlError as exc:
        assert str(path) in exc.format_message() and f"[search] {option.replace('-', '_')}" in exc.format_message() \
            or "unknown train option" in exc.format_message(), exc.format_message()
        return
    (dim,) = exp.search
    assert dim.name == option.replace("-", "_")
    written = {k: v for k, v in spec.items() if v is not None} if isinstance(spec, dict) else spec
    if isinstance(written, list):
        assert list(dim.choices) == written
    else:
        assert (dim.low, dim.high, dim.log, dim.step) == (written["low"], written["high"], written.get("log", False),
                                                          written.get("step"))
        assert dim.low <= dim.high and (not dim.log or dim.low > 0)
