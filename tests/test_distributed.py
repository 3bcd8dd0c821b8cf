"""Distributed training: real runs of two CPU processes over gloo, started by torchrun and by spladectl's own
--nproc-per-node, against one process running the same global batch; and the pieces around them.

Each run starts real processes (python -m spladectl train) that import torch and load splade-tiny, so the runs are
shared by module-scoped fixtures. Nothing here pretends to be a GPU except where a CUDA device count is injected,
which the test says.
"""

from __future__ import annotations

import dataclasses

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer

from spladectl import distributed, plugin_loading, plugins
from spladectl.cli.train import LAUNCH_OPTIONS
from spladectl.distributed import World
from spladectl.engine import Trainer
from spladectl.errors import SpladectlError
from spladectl.launch import LaunchOptions, command_line, failure_error
from spladectl.model import resolve_model_path

import dist_plugins
from tiny import config, examples, write_jsonl

TESTS = Path(__file__).resolve().parent
DOCS = TESTS.parent / "docs" / "plugins.md"
SMALL = ["--max-query-length", "16", "--max-doc-length", "32", "--precision", "fp32", "--lr", "1e-4",
         "--warmup-ratio", "0", "--flops-schedule", "constant", "--seed", "7", "--no-progress"]
# 2 processes × 2 examples × 2 micro-batches: 8 examples per optimizer step, the 8 examples of tiny.py.
PER_PROCESS = ["--batch-size", "2", "--grad-accum", "2"]
COMPARED = ("loss", "ranking", "flops_q", "flops_d", "grad_norm", "query_dims", "doc_dims", "chance_loss", "candidates")


# ------------------------------------------------------------------------------------------------ running processes

def process_env(probe_dir: Path | None = None) -> dict[str, str]:
    """The environment of the processes: tests/ (and `probe_dir`) importable for --plugin, one thread each, and
    Python's fault handler on, so that a process killed by a signal (an abort in C++) leaves its Python stacks in the
    failure message."""
    path = [str(TESTS), str(probe_dir or ""), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "2000", "PYTHONPATH": os.pathsep.join(filter(None, path)),
           "PYTHONFAULTHANDLER": "1"}
    if probe_dir is not None:
        env[dist_plugins.PROBE_DIR] = str(probe_dir)
    return env


def spladectl(*args: str, torchrun: bool = False, probe_dir: Path | None = None) -> subprocess.CompletedProcess:
    """Run `spladectl train ...` in new processes: through `torchrun -m spladectl` or `spladectl --nproc-per-node`."""
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "spladectl", *args]
    else:
        command = [sys.executable, "-m", "spladectl", *args, "--nproc-per-node", "2"]
    return subprocess.run(command, capture_output=True, text=True, env=process_env(probe_dir), timeout=600)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def single_process(tmp: Path, data: Path, *extra_plugins, **overrides) -> list[dict]:
    """The same run in this process (dropout off, as in the distributed runs it is compared with)."""
    manager = plugin_loading.make_plugin_manager(installed=False)
    plugins.register(manager, dist_plugins.NoDropout(), "no-dropout", source="test")
    for plugin in extra_plugins:
        plugins.register(manager, plugin, type(plugin).__name__, source="test")
    values = dict(data=str(data), lr=1e-4, warmup_ratio=0.0, flops_schedule="constant", seed=7)
    values.update(overrides)
    Trainer(config(tmp, **values), examples(), pm=manager, progress=False).fit()
    return metrics(tmp / "out")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "triples.jsonl")


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory, data):
    """4 steps under `torchrun -m spladectl train`, dropout on, a checkpoint at step 2, memory tracking, and the
    plugin example of docs/plugins.md's "Distributed runs"."""
    root = tmp_path_factory.mktemp("torchrun")
    out, probes = root / "out", root / "probes"
    probes.mkdir()
    section = DOCS.read_text().split("## Distributed runs", 1)[1].split("\n## ", 1)[0]
    (example,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    (probes / "docs_distributed_example.py").write_text(example)
    result = spladectl("train", "--data", str(data), "-o", str(out), *PER_PROCESS, *SMALL, "--max-steps", "4",
                       "--save-every", "2", "--memory-tracking", "--plugin", "dist_plugins:RankProbe",
                       "--plugin", "docs_distributed_example", "--json", torchrun=True, probe_dir=probes)
    assert result.returncode == 0, " ".join(result.stderr.split())[-8000:]
    return out, probes, result


@pytest.fixture(scope="module")
def global_batch_run(tmp_path_factory, data):
    """3 steps of `spladectl train --nproc-per-node 2`, dropout off, beside the same run in one process."""
    root = tmp_path_factory.mktemp("global-batch")
    result = spladectl("train", "--data", str(data), "-o", str(root / "out"), *PER_PROCESS, *SMALL,
                       "--max-steps", "3", "--plugin", "dist_plugins:NoDropout")
    assert result.returncode == 0, " ".join(result.stderr.split())[-8000:]
    single = single_process(root / "single", data, batch_size=4, grad_accum=2, max_steps=3)
    return root, metrics(root / "out"), single


@pytest.fixture(scope="module")
def grad_cache_run(tmp_path_factory, data):
    """3 steps of `--nproc-per-node 2` encoding each micro-batch one text at a time (--grad-cache-chunk 1), dropout
    off and plain SGD, beside the same run in one process without gradient caching."""
    root = tmp_path_factory.mktemp("grad-cache")
    result = spladectl("train", "--data", str(data), "-o", str(root / "out"), *PER_PROCESS, *SMALL,
                       "--max-steps", "3", "--grad-cache-chunk", "1", "--plugin", "dist_plugins:NoDropout",
                       "--plugin", "dist_plugins:PlainSGD")
    assert result.returncode == 0, " ".join(result.stderr.split())[-8000:]
    single = single_process(root / "single", data, dist_plugins.PlainSGD(), batch_size=4, grad_accum=2, max_steps=3)
    return root, metrics(root / "out"), single


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory, data):
    """Per-device negatives, dropout off; rank 1 raises a user error in the middle of step 2."""
    root = tmp_path_factory.mktemp("failing")
    started = time.monotonic()
    result = spladectl("train", "--data", str(data), "-o", str(root / "out"), *PER_PROCESS, *SMALL,
                       "--max-steps", "4", "--no-cross-device-negatives", "--plugin", "dist_plugins:NoDropout",
                       "--plugin", "dist_plugins:FailOnRankOne")
    return root, result, time.monotonic() - started


@pytest.fixture(scope="module")
def early_stopping_run(tmp_path_factory, data):
    """Rank 0 evaluates every step while rank 1 waits; a pinned metric makes --patience 1 stop after step 2 of 6."""
    from test_data import write_toy_beir

    root = tmp_path_factory.mktemp("early-stopping")
    beir = write_toy_beir(root / "toy")
    result = spladectl("train", "--data", str(data), "-o", str(root / "out"), *PER_PROCESS, *SMALL,
                       "--max-steps", "6", "--eval-data", str(beir), "--eval-every", "1", "--patience", "1",
                       "--plugin", "dist_plugins:SameScoreEveryTime")
    return root / "out", result


# ------------------------------------------------------------------------------------------------ the runs

def test_two_processes_train_like_one_process_with_the_global_batch(global_batch_run):
    # Cross-device negatives and the FLOPS term over the gathered batch: the loss, every term, the sparsity and the
    # gradient norm of each step are those of one process with batch 4 x 2 (up to float rounding), and so are the
    # weights after three AdamW steps.
    root, distributed_rows, single_rows = global_batch_run
    assert [r["step"] for r in distributed_rows] == [1, 2, 3]
    for mine, reference in zip(distributed_rows, single_rows):
        for key in COMPARED:
            assert mine[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-7), (mine["step"], key)
        assert mine["examples"] == reference["examples"] == 8
        assert mine["micro_batch"] == 2  # per process
    assert distributed_rows[1]["flops_q"] > 0  # the FLOPS term was on, and matched
    many, one = weights(root / "out" / "final"), weights(root / "single" / "out" / "final")
    for name, tensor in one.items():
        if name.endswith("attention.self.key.bias"):
            # Softmax ignores a shift shared by a query's scores, so these gradients are 0 up to round-off, and Adam
            # divides round-off by its own size into lr-sized steps: the two runs' summation orders decide them.
            continue
        torch.testing.assert_close(many[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_caching_across_processes_trains_like_one_plain_process(grad_cache_run):
    # The gathered representations of both processes feed the loss, each process re-encodes its own texts with the
    # gradients of its rows, and DDP all-reduces once, after the last re-encoding of the step's last micro-batch.
    root, cached_rows, single_rows = grad_cache_run
    assert [r["step"] for r in cached_rows] == [1, 2, 3]
    for mine, reference in zip(cached_rows, single_rows):
        for key in COMPARED:
            assert mine[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-7), (mine["step"], key)
    many, one = weights(root / "out" / "final"), weights(root / "single" / "out" / "final")
    initial = weights(Path(resolve_model_path("splade-tiny")))
    # three real updates (the checkpoint spells some names the legacy way, the rest are enough)
    assert max(float((one[k] - initial[k]).abs().max()) for k in one.keys() & initial.keys()) > 1e-3
    for name, tensor in one.items():
        torch.testing.assert_close(many[name], tensor, rtol=1e-5, atol=1e-7, msg=name)


def test_per_device_negatives_when_cross_device_negatives_are_off(failing_run, data, tmp_path):
    # Step 1 completed before the failure. With --no-cross-device-negatives each query competes with its own
    # process's documents: the ranking loss of one process stepping through micro-batches of 2. The FLOPS term
    # stays on the global batch (4 examples a micro-batch), so sparsity does not depend on the number of processes.
    root, _, _ = failing_run
    first = metrics(root / "out")[0]
    per_device = single_process(tmp_path / "per-device", data, batch_size=2, grad_accum=4, max_steps=1)[0]
    global_batch = single_process(tmp_path / "global", data, batch_size=4, grad_accum=2, max_steps=1)[0]
    assert first["ranking"] == pytest.approx(per_device["ranking"], rel=1e-5)
    assert first["ranking"] != pytest.approx(global_batch["ranking"], rel=1e-3)
    for key in ("flops_q", "flops_d"):
        assert first[key] == pytest.approx(global_batch[key], rel=1e-5)
        assert first[key] != pytest.approx(per_device[key], rel=1e-3)


def test_an_error_on_one_rank_stops_every_rank_with_its_message(failing_run):
    root, result, seconds = failing_run
    assert result.returncode == 1, result.stderr[-3000:]  # a plugin's error, as in a single process
    assert "rank 1: plugin 'dist_plugins:FailOnRankOne': the quota of /scratch is exhausted" in \
        " ".join(result.stderr.split())
    assert result.stderr.count("quota of /scratch") == 1  # once, from the launcher, not once per process
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert seconds < 300  # rank 0 did not wait in its collective for a timeout
    assert [r["step"] for r in metrics(root / "out")] == [1]
    assert not (root / "out" / "final").exists()
    # rank 0, stopped by rank 1's failure, records that failure in the run, not its own broken connection
    record = json.loads((root / "out" / "run.json").read_text())
    assert (record["status"], record["world_size"], record["traceback"]) == ("failed", 2, None)
    assert record["error"] == ("rank 1: plugin 'dist_plugins:FailOnRankOne': the quota of /scratch is exhausted "
                               "(raised on purpose by the test)")


def test_only_rank_0_writes_and_every_plugin_sees_its_rank(torchrun_run):
    out, probes, result = torchrun_run
    summary = json.loads(result.stdout)  # rank 0 alone printed: one JSON document
    assert summary["status"] == "finished" and summary["steps"] == 4
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert "world_size = 2" in (out / "config.toml").read_text()
    assert "effective batch 8 (2 per device x 2 accumulation x 2 processes)" in result.stderr
    seen = [json.loads((probes / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    for rank, view in enumerate(seen):
        assert (view["rank"], view["world_size"], view["main"], view["status"]) == (rank, 2, rank == 0, "finished")
        # every loss term sees the global micro-batch; only this process's rows carry gradients
        assert all(step == {"batch": 4, "local": [2 * rank, 2 * rank + 2], "local_grad": True, "other_grad": False}
                   for step in view["steps"])
        assert len(view["steps"]) == 4 * 2


def test_memory_is_tracked_per_rank(torchrun_run):
    out, _, result = torchrun_run
    for row in metrics(out):
        by_rank = row["mem_rss_peak_gb_by_rank"]
        assert len(by_rank) == 2 and all(v > 0.1 for v in by_rank)
        assert row["mem_rss_peak_gb"] == max(by_rank)
    rows = dict(json.loads(result.stdout)["summary"])
    assert "rank" in rows["peak RSS in a step"] and "by rank" in rows["peak RSS in a step"]


def test_the_documented_distributed_plugin_example_gathers_from_every_rank(torchrun_run):
    out, _, _ = torchrun_run
    for row in metrics(out):
        by_rank = row["step_seconds_by_rank"]
        assert len(by_rank) == 2 and all(seconds > 0 for seconds in by_rank)
        assert row["step_seconds"] == by_rank[0]  # rank 0 wrote the row


def test_every_rank_stops_early_when_rank_0_decides_to(early_stopping_run):
    # Had rank 1 gone on to step 3, it would have waited there for rank 0, which saved and left: a failed run.
    out, result = early_stopping_run
    assert result.returncode == 0, " ".join(result.stderr.split())[-8000:]
    assert result.stdout.count("early stopping at step 2") == 1
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert [json.loads(line)["step"] for line in (out / "eval.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "best" / "model.safetensors").is_file() and (out / "final" / "model.safetensors").is_file()


def test_every_rank_resumes_from_the_checkpoint_rank_0_wrote(torchrun_run, data, tmp_path):
    # Dropout is on: each process restores its own RNG stream, so the resumed steps repeat the uninterrupted ones.
    reference, _, _ = torchrun_run
    out = tmp_path / "out"
    shutil.copytree(reference / "checkpoints" / "step-2", out / "checkpoints" / "step-2")
    shutil.copy(reference / "metrics.jsonl", out / "metrics.jsonl")
    result = spladectl("train", "--data", str(data), "-o", str(out), *PER_PROCESS, *SMALL, "--max-steps", "4",
                       "--resume", "latest")
    assert result.returncode == 0, " ".join(result.stderr.split())[-8000:]
    assert "resumed from" in result.stdout and result.stdout.count("resumed from") == 1
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(reference)]
    resumed, straight = weights(out / "final"), weights(reference / "final")
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)


def test_a_distributed_training_is_one_run_written_by_rank_0(data, tmp_path, cli):
    # No --output-dir: rank 0 picks the run id and tells rank 1, which writes nothing, not even its metrics or its
    # TensorBoard events (each rank would otherwise have made a run directory of its own under the root).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tmp_path / "runs"
    result = spladectl("train", "--data", str(data), "--runs-root", str(root), "--name", "two", *PER_PROCESS, *SMALL,
                       "--max-steps", "2", "--track", "tensorboard", "--json")
    assert result.returncode == 0, " ".join(result.stderr.split())[-8000:]
    (run_dir,) = [path for path in root.iterdir() if path.is_dir()]
    record = json.loads((run_dir / "run.json").read_text())
    assert (record["status"], record["world_size"], record["error"]) == ("finished", 2, None)
    assert record["command"].endswith("--nproc-per-node 2")  # `runs show` prints a command that starts it again
    assert json.loads(result.stdout)["run_dir"] == record["dir"] == str(run_dir.resolve())
    assert [r["step"] for r in metrics(run_dir)] == [1, 2] and record["steps"] == 2
    assert record["examples_seen"] == 16  # 8 per step: both processes' examples, counted once
    assert "world_size = 2" in (run_dir / "config.toml").read_text()
    assert json.loads((run_dir / "env.json").read_text())["torch"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2"]
    assert (run_dir / "final" / "model.safetensors").is_file()
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2]
    shown = cli("runs", "show", record["id"], "--runs-root", str(root), "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["world_size"] == 2, shown.output


def test_a_failure_before_the_processes_meet_ends_the_run_as_failed(data, tmp_path):
    # Rank 1 fails while loading its plugins; rank 0, done preparing, waits for it to join the process group. Were
    # it waiting inside torch's rendezvous, only torchrun's SIGKILL would end it, and run.json would say "running".
    (tmp_path / "rank_one_cannot_load.py").write_text(
        "import os\n\nif os.environ.get('RANK') == '1':\n    raise OSError('no such mount: /data (on purpose)')\n")
    root = tmp_path / "runs"
    result = spladectl("train", "--data", str(data), "--runs-root", str(root), *PER_PROCESS, *SMALL,
                       "--max-steps", "1", "--plugin", "rank_one_cannot_load", probe_dir=tmp_path)
    assert result.returncode != 0 and "rank 1: --plugin rank_one_cannot_load" in " ".join(result.stderr.split())
    (run_dir,) = list(root.iterdir())
    record = json.loads((run_dir / "run.json").read_text())
    assert (record["status"], record["world_size"]) == ("failed", 2)
    assert record["error"].startswith("rank 1: --plugin rank_one_cannot_load: loading it raised OSError: no such mount")
    assert not (run_dir / "metrics.jsonl").exists()


def test_ctrl_c_stops_every_process_with_one_line(data, tmp_path):
    # What a terminal does on Ctrl-C: SIGINT to the whole foreground process group, the launcher and its processes.
    out = tmp_path / "out"
    command = [sys.executable, "-m", "spladectl", "train", "--data", str(data), "-o", str(out), *PER_PROCESS, *SMALL,
               "--max-steps", "100000", "--nproc-per-node", "2"]
    launcher = subprocess.Popen(command, env=process_env(), start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert launcher.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    os.killpg(launcher.pid, signal.SIGINT)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "Aborted: SIGINT stopped all 2 training processes on this machine" in stderr
    assert "Traceback" not in stderr and "Aborted!" not in stderr  # no process speaks for itself
    assert not (out / "final").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"


# ------------------------------------------------------------------------------------------------ the pieces

def test_world_from_torchrun_environment():
    assert World.from_env({}) == World() and not World().distributed
    env = {"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node0",
           "MASTER_PORT": "29500"}
    world = World.from_env(env)
    assert (world.rank, world.world_size, world.local_rank, world.local_world_size) == (5, 8, 1, 4)
    assert world.distributed and not world.is_main
    with pytest.raises(SpladectlError, match="RANK, LOCAL_RANK"):
        World.from_env({"WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"})
    with pytest.raises(SpladectlError, match="RANK: expected an integer"):
        World.from_env({**env, "RANK": "five"})
    with pytest.raises(SpladectlError, match="not below WORLD_SIZE"):
        World.from_env({**env, "RANK": "8"})


def test_backend_and_device_per_process():
    assert distributed.backend_for("cuda") == "nccl" and distributed.backend_for("cpu") == "gloo"
    with pytest.raises(SpladectlError, match="mps has no torch.distributed backend"):
        distributed.backend_for("mps")
    # No GPU here: the CUDA device count is injected. Each process takes the GPU of its LOCAL_RANK.
    second = World(rank=3, world_size=4, local_rank=1, local_world_size=2)
    assert distributed.device_for(second, "cuda", cuda_count=2) == torch.device("cuda", 1)
    assert distributed.device_for(second, "cpu", cuda_count=2) == torch.device("cpu")
    third = World(rank=2, world_size=4, local_rank=2, local_world_size=3)
    with pytest.raises(SpladectlError, match="torch sees 2 CUDA device") as error:
        distributed.device_for(third, "cuda", cuda_count=2)
    assert "--nproc-per-node 2" in error.value.hint


def test_launch_options_become_torchrun_arguments():
    one = LaunchOptions(nproc_per_node=4)
    assert one.torchrun_args(["train", "--data", "x"]) == [
        "--nnodes", "1", "--nproc-per-node", "4", "--node-rank", "0", "-m", "spladectl", "train", "--data", "x"]
    two = LaunchOptions(nproc_per_node=8, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29400)
    assert two.world_size == 16
    assert two.torchrun_args(["train"])[:10] == ["--nnodes", "2", "--nproc-per-node", "8", "--node-rank", "1",
                                                 "--master-addr", "10.0.0.1", "--master-port", "29400"]
    assert two.train_args() == ["--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1",
                                "--master-addr", "10.0.0.1", "--master-port", "29400"]
    # the train options that start processes are exactly the launcher's
    assert LAUNCH_OPTIONS == {field.name for field in dataclasses.fields(LaunchOptions)}


@pytest.mark.parametrize("args, env, message", [
    (["--nproc-per-node", "2", "--nnodes", "2"], {}, "--master-addr"),
    (["--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "2", "--master-addr", "x"], {}, "below --nnodes 2"),
    (["--master-addr", "10.0.0.1"], {}, "go with --nproc-per-node"),
    (["--nproc-per-node", "2"], {"TORCHELASTIC_RUN_ID": "abc"}, "already started by torchrun"),
    ([], {"WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "RANK"),
])
def test_launcher_mistakes_are_user_errors(cli, tmp_path, args, env, message):
    result = cli("train", "--data", str(tmp_path / "none.jsonl"), *args, env={"COLUMNS": "2000", **env})
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_every_option_the_user_gave_is_passed_on():
    from spladectl.cli.train import train as train_command

    app = typer.Typer()
    app.command("train")(train_command)
    train = typer.main.get_command(app)  # the train command alone, as click parses it
    given = ["--data", "x.jsonl", "-o", "out", "-b", "4", "--no-in-batch-negatives", "--plugin", "a:b", "--plugin",
             "c", "--lr", "1e-4", "--memory-tracking", "--no-cross-device-negatives", "--nproc-per-node", "2",
             "--nnodes", "1", "--seed", "3"]
    ctx = train.make_context("train", list(given))
    forwarded = command_line(ctx, skip=LAUNCH_OPTIONS)
    assert forwarded[0] == "train" and "--nproc-per-node" not in forwarded and "--nnodes" not in forwarded
    again = train.make_context("train", forwarded[1:])
    launch_free = {k: v for k, v in ctx.params.items() if k not in LAUNCH_OPTIONS}
    assert {k: v for k, v in again.params.items() if k not in LAUNCH_OPTIONS} == launch_free
    assert "--epochs" not in forwarded  # defaults stay defaults: each process resolves them itself


def test_the_failure_reported_is_the_cause_not_its_consequences(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    def failure(rank: int, exitcode: int, **recorded) -> ProcessFailure:
        path = tmp_path / f"error-{rank}.json"
        if recorded:
            monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
            distributed.record_error_file(**recorded)
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file=str(path))

    stopped = failure(0, 1, message="stopped because rank 1 failed: disk full", kind="stopped")
    # torchrun stopped this one (SIGTERM) after it recorded its error: the recorded exit code still counts
    cause = failure(1, -15, message="data.jsonl:3: no query", kind="user", hint="fix line 3", exit_code=2)
    killed = failure(2, -15)  # SIGTERM from torchrun after the failure: no error file
    error = failure_error({0: stopped, 1: cause, 2: killed})
    assert (error.message, error.hint, error.exit_code) == ("rank 1: data.jsonl:3: no query", "fix line 3", 2)
    bug = failure(3, 1, message="RuntimeError: boom", kind="bug", details="Traceback ...")
    error = failure_error({0: stopped, 2: killed, 3: bug})
    assert (error.message, error.exit_code) == ("rank 3 failed: RuntimeError: boom", 1)
    # on a machine that only saw the consequences, the stopped process names the rank elsewhere that failed
    assert failure_error({0: stopped, 2: killed}).message == "rank 0 stopped because rank 1 failed: disk full"


def test_a_checkpoint_resumes_only_with_the_number_of_processes_that_wrote_it(tmp_path):
    # The data position counts global micro-batches, so another number of processes would resume elsewhere.
    from spladectl.checkpoint import STATE_FILE, find_checkpoint

    manager = plugin_loading.make_plugin_manager(installed=False)
    Trainer(config(tmp_path, max_steps=1), examples(), pm=manager, progress=False).fit()
    path = find_checkpoint("latest", tmp_path / "out")
    state = torch.load(path / STATE_FILE, weights_only=True)
    state["config"]["world_size"] = 2  # as a run of two processes writes it
    torch.save(state, path / STATE_FILE)
    with pytest.raises(SpladectlError, match="world_size=2, this run has 1"):
        Trainer(config(tmp_path, max_steps=2), examples(), pm=manager, progress=False).resume(path)
    del state["config"]["world_size"]  # written before distributed training existed: a single process
    torch.save(state, path / STATE_FILE)
    Trainer(config(tmp_path, max_steps=2), examples(), pm=manager, progress=False).resume(path)


def test_two_processes_on_prepared_data_train_as_on_the_file(global_batch_run, data, tmp_path):
    """Each rank reads its own share of every global micro-batch from the prepared directory: the same run as on the
    file the directory came from."""
    from spladectl.data.prepared import prepare

    prepare(data, tmp_path / "prepared", fmt="jsonl")
    result = spladectl("train", "--data", str(tmp_path / "prepared"), "-o", str(tmp_path / "out"), *PER_PROCESS,
                       *SMALL, "--max-steps", "3", "--plugin", "dist_plugins:NoDropout")
    assert result.returncode == 0, " ".join(result.stderr.split())[-8000:]
    root, on_the_file, _ = global_batch_run
    assert [(r["loss"], r["grad_norm"]) for r in metrics(tmp_path / "out")] == \
        [(r["loss"], r["grad_norm"]) for r in on_the_file]
    prepared, file = weights(tmp_path / "out" / "final"), weights(root / "out" / "final")
    assert all(torch.equal(prepared[k], file[k]) for k in file)
