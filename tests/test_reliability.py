"""What a run promises when things go wrong around it: one training per run directory, a clear error (exit 2, no
traceback) for a run directory that cannot be one, a full disk at a checkpoint that loses nothing but the step
being written, and NaN steps handled as --on-nan says (the NaN injected by a loss-term plugin). (Kill -9 at many points: test_crash.py; malformed input: test_fuzz.py.)"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import re

import torch

from spladectl.engine import Trainer
from spladectl.errors import NonFiniteError, SpladectlError
from spladectl.hookspecs import hookimpl
from spladectl.runs.lock import RunLock, is_held
from test_cli_train import ROWS, SMALL
from tiny import config, examples, metrics_rows

HOLD = """
import sys, time
from spladectl.runs.lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "triples.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def _holder(run_dir: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_run_directory_has_one_owner_and_a_killed_owner_lets_go(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    owner = _holder(run_dir)
    try:
        assert is_held(run_dir) is True
        with pytest.raises(SpladectlError, match=rf"another spladectl train is using this run directory \(pid {owner.pid} on "):
            RunLock(run_dir).acquire()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert is_held(run_dir) is False  # the kernel dropped the lock with the process: stale, whatever the file says
    lock = RunLock(run_dir)
    assert lock.acquire()["pid"] == owner.pid  # taken over, and the killed owner is reported
    assert is_held(run_dir) is True
    lock.release()
    assert is_held(run_dir) is False


def test_a_second_train_on_a_busy_directory_is_refused_and_touches_nothing(cli, data, tmp_path):
    out = tmp_path / "out"
    assert cli("train", "--data", str(data), "-o", str(out), "--max-steps", "2", *SMALL).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    owner = _holder(out)  # stands for a training that is still running there
    try:
        result = cli("train", "--data", str(data), "-o", str(out), "--max-steps", "4", "--resume", "latest", *SMALL,
                     env={"COLUMNS": "2000"})
        assert result.exit_code == 2, result.output
        assert f"another spladectl train is using this run directory (pid {owner.pid} on" in result.output
        assert "Traceback" not in result.output
        after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
        assert after == before  # run.json still says finished; no metrics, checkpoints or config were touched
        # and `runs rm` will not delete a directory a process trains in
        removed = cli("runs", "rm", str(out), "--yes", "--runs-root", str(tmp_path), env={"COLUMNS": "2000"})
        assert removed.exit_code == 2 and f"still running (pid {owner.pid} on" in removed.output
        assert out.is_dir()
    finally:
        owner.kill()
        owner.wait()


def test_two_real_trainings_started_together_never_mix(data, tmp_path):
    # Two `spladectl train` processes on one directory, started a moment apart: exactly one trains, the other exits 2
    # before writing anything, and the metrics are one run's, one line per step.
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "2000"}
    command = [sys.executable, "-m", "spladectl", "train", "--data", str(data), "-o", str(out), "--max-steps", "6",
               "--precision", "fp32", *SMALL]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not is_held(out) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    first_out, first_err = first.communicate(timeout=300)
    codes = sorted([first.returncode, second.returncode])
    if codes == [0, 0]:
        pytest.fail("the first run ended before the second started: nothing was tested\n" + second.stderr)
    assert first.returncode == 0, first_err
    assert second.returncode == 2 and "another spladectl train is using this run directory" in second.stderr
    assert "Traceback" not in second.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_an_output_dir_that_is_a_file_is_a_clear_error(cli, data, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("my notes\n")
    result = cli("train", "--data", str(data), "-o", str(target), "--max-steps", "1", *SMALL, env={"COLUMNS": "2000"})
    assert result.exit_code == 2 and f"{target}: exists and is not a directory" in result.output
    assert "Traceback" not in result.output and target.read_text() == "my notes\n"


def test_a_read_only_output_dir_is_a_clear_error(cli, data, tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: a read-only filesystem is what stops it
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(parent)],
                          capture_output=True).returncode:
            pytest.skip("running as root without the right to mount a read-only tmpfs")
    else:
        parent.chmod(0o555)
    try:
        result = cli("train", "--data", str(data), "-o", str(parent / "run"), "--max-steps", "1", *SMALL,
                     env={"COLUMNS": "2000"})
        assert result.exit_code == 2, result.output
        assert f"{parent / 'run'}: cannot create the run directory (" in result.output
        assert "Traceback" not in result.output
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(parent)], check=True)
        else:
            parent.chmod(0o755)


def _fill_disk_at_second_checkpoint(monkeypatch):
    """Every checkpoint after the first meets a full disk (injected: the test may not mount a small filesystem)."""
    import torch

    from spladectl import checkpoint

    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)


def _assert_disk_full_handled(result, out: Path):
    assert result.exit_code == 2, result.output
    assert "step-2: the checkpoint could not be written (No space left on device)" in result.output
    assert "the previous checkpoint (step-1) is intact" in result.output
    assert re.search(r"a checkpoint takes about \d+ MiB and \d+ MiB are free there", result.output)
    assert "Traceback" not in result.output
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-1"]  # no .tmp-step-* left behind
    from spladectl.checkpoint import load_training_state

    assert load_training_state(checkpoints / "step-1")["step"] == 1
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and "No space left on device" in run["error"]


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(cli, data, tmp_path, monkeypatch):
    _fill_disk_at_second_checkpoint(monkeypatch)
    out = tmp_path / "out"
    result = cli("train", "--data", str(data), "-o", str(out), "--max-steps", "3", "--save-every", "1",
                 "--precision", "fp32", *SMALL, env={"COLUMNS": "2000"})
    _assert_disk_full_handled(result, out)


@pytest.mark.skipif(os.geteuid() != 0 if hasattr(os, "geteuid") else True, reason="mounting a tmpfs needs root")
def test_a_really_full_disk_at_a_checkpoint_keeps_the_previous_one(cli, data, tmp_path):
    # A real 80 MiB filesystem: the first checkpoint of splade-tiny (~52 MiB) fits, the second does not.
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mount / "out"
        result = cli("train", "--data", str(data), "-o", str(out), "--max-steps", "3", "--save-every", "1",
                     "--precision", "fp32", *SMALL, env={"COLUMNS": "2000"})
        _assert_disk_full_handled(result, out)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# ------------------------------------------------------------------------------------------------- --on-nan

class PoisonAt:
    """A loss term that is NaN at the given steps (counted from 1, each time the run reaches them) and 0 otherwise:
    how a broken plugin or an overflowing term looks to the engine."""

    def __init__(self, *steps: int):
        self.steps = set(steps)
        self.seen: list[int] = []

    @hookimpl
    def loss_terms(self, inputs, state):
        step = state.step + 1
        self.seen.append(step)
        zero = inputs.query.sum() * 0.0
        return {"poison": inputs.query.sum() * float("nan") if step in self.steps else zero}


def _weights(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.state.model.parameters()]


def test_on_nan_stop_names_the_step_and_term_and_updates_nothing(tmp_path, pm, registered):
    registered(PoisonAt(2))
    trainer = Trainer(config(tmp_path, max_steps=4), examples(), pm=pm, progress=False)
    with pytest.raises(NonFiniteError, match=r"step 2: loss, poison, gradient are not finite; no update was made"):
        trainer.fit()
    assert trainer.state.step == 1 and not (tmp_path / "out" / "final").exists()
    assert all(torch.isfinite(p).all() for p in trainer.state.model.parameters())


def test_on_nan_skip_drops_the_update_and_counts_it(tmp_path, pm, registered):
    registered(PoisonAt(2, 3))
    trainer = Trainer(config(tmp_path, max_steps=4, on_nan="skip"), examples(), pm=pm, progress=False)
    result = trainer.fit()
    rows = metrics_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r.get("non_finite") for r in rows] == [None, ["loss", "poison", "gradient"], ["loss", "poison", "gradient"], None]
    assert [r["skipped"] for r in rows] == [False, True, True, False] and result["skipped_steps"] == 2
    assert all(torch.isfinite(p).all() for p in trainer.state.model.parameters())


def test_a_skipped_step_leaves_the_weights_as_they_were(tmp_path, pm, registered):
    registered(PoisonAt(2))
    trainer = Trainer(config(tmp_path, max_steps=2, on_nan="skip"), examples(), pm=pm, progress=False)
    trainer.step()
    before = _weights(trainer)
    trainer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(trainer)))


def test_on_nan_rollback_goes_back_to_the_last_checkpoint_with_half_the_rate(tmp_path, pm, registered):
    poison = registered(PoisonAt(4))  # step 4 is poisoned every time the run reaches it
    said = []
    trainer = Trainer(config(tmp_path, max_steps=6, on_nan="rollback", save_every=2), examples(), pm=pm,
                      progress=False, log=said.append)
    with pytest.raises(NonFiniteError, match=r"step 4: loss, poison, gradient not finite again after 3 rollbacks"):
        trainer.fit()
    rollbacks = [line for line in said if "back to step" in line]
    assert len(rollbacks) == 3 and all("back to step 2 " in line for line in rollbacks)  # the step-2 checkpoint
    assert all(f"learning rate halved (peak {1e-4 / 2 ** k:.3g})" in line for k, line in zip((1, 2, 3), rollbacks))
    assert poison.seen.count(3) == 4 and poison.seen.count(4) == 4  # steps 3-4 redone after each rollback
    rows = metrics_rows(tmp_path)  # the abandoned steps' lines went with them: one line per step, none torn
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_on_nan_rollback_recovers_from_a_one_off_nan(tmp_path, pm, registered):
    class Once(PoisonAt):
        @hookimpl
        def loss_terms(self, inputs, state):
            out = super().loss_terms(inputs, state)
            self.steps.discard(state.step + 1)  # poisoned the first time only
            return out

    registered(Once(3))
    trainer = Trainer(config(tmp_path, max_steps=4, on_nan="rollback"), examples(), pm=pm, progress=False)
    result = trainer.fit()
    assert result["steps"] == 4 and len(result["collapse_events"]) == 1
    assert "back to step 0 with the learning rate halved" in result["collapse_events"][0]  # no checkpoint: the start
    assert [r["step"] for r in metrics_rows(tmp_path)] == [1, 2, 3, 4]
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_on_nan_is_checked(tmp_path, pm):
    with pytest.raises(SpladectlError, match=r"--on-nan 'ignore': expected one of stop, skip, rollback"):
        Trainer(config(tmp_path, on_nan="ignore"), examples(), pm=pm, progress=False)


def test_rollbacks_halve_the_rate_once_each_even_from_checkpoints_written_after_one(tmp_path, pm, registered):
    class Once(PoisonAt):
        @hookimpl
        def loss_terms(self, inputs, state):
            out = super().loss_terms(inputs, state)
            self.steps.discard(state.step + 1)
            return out

    plain = Trainer(config(tmp_path / "plain", max_steps=8), examples(), pm=pm, progress=False)
    plain.fit()
    registered(Once(4, 6))
    trainer = Trainer(config(tmp_path / "poisoned", max_steps=8, on_nan="rollback", save_every=1), examples(), pm=pm,
                      progress=False)
    result = trainer.fit()
    assert [e.split("; ")[1].split(" with")[0] for e in result["collapse_events"]] == ["back to step 3", "back to step 5"]
    lr = {r["step"]: r["lr"] for r in metrics_rows(tmp_path / "poisoned")}
    ref = {r["step"]: r["lr"] for r in metrics_rows(tmp_path / "plain")}
    # The step-5 checkpoint was written after the first rollback: going back to it halves its rate once, not twice.
    assert [round(lr[k] / ref[k], 6) for k in range(1, 9)] == [1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.25]


def test_16_mixed_leaves_a_nan_step_to_its_loss_scaler(tmp_path, pm, registered):
    # fp16 autocast and GradScaler("cpu") run on a CPU: the scaler skips the step and lowers the scale, as on a GPU,
    # and --on-nan stop does not interfere with what the scaler is for.
    registered(PoisonAt(2))
    trainer = Trainer(config(tmp_path, max_steps=3, precision="16-mixed", on_nan="stop"), examples(), pm=pm,
                      progress=False)
    result = trainer.fit()
    rows = metrics_rows(tmp_path)
    assert result["steps"] == 3 and rows[1]["skipped"]  # (the scaler may skip its first step too: 2^16 overflows)
    assert rows[2]["loss_scale"] < rows[1]["loss_scale"] and not any("non_finite" in r for r in rows)
