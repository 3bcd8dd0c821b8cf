"""`spladectl tune` with and without pruning, each study shared by several workers on one SQLite database.

    python benchmarks/tune.py                                   # 16 trials, 2 workers, seeds 1 and 2, the demo
    python benchmarks/tune.py --trials 24 --workers 3 --steps 40 --json

Each pair of studies searches the same space (learning rate, FLOPS weights, negatives) with TPE from one seed, on the
built-in demo (240 training triples, 60 held-out queries), evaluating every --eval-every steps. One prunes with the
median pruner, one does not. The script checks what a shared study must guarantee — every trial number once, one run
directory per trial, each run linked to its trial — and reports, per study, the optimizer steps all trials took,
the best nDCG@10 and the wall time. Pruning's saving is 1 - steps(pruned) / steps(unpruned).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "spladectl" / "demo"

SPACE = """
[search]
lr = { low = 1e-6, high = 3e-3, log = true }
lambda_q = { low = 1e-5, high = 1e-1, log = true }
lambda_d = { low = 1e-5, high = 1e-1, log = true }
n_negatives = { low = 1, high = 2 }
"""


def experiment(path: Path, name: str, steps: int, eval_every: int) -> Path:
    path.write_text(f"""name = "{name}"
metric = "nDCG@10"

[base]
data = "{DEMO / 'train.jsonl'}"
eval-data = "{DEMO / 'heldout'}"
eval-every = {eval_every}
max-steps = {steps}
batch-size = 16
grad-accum = 1
max-query-length = 32
max-doc-length = 128
precision = "32-true"
seed = 1
{SPACE}""")
    return path


def run_study(work: Path, name: str, args, pruner: str, seed: int) -> dict:
    path = experiment(work / f"{name}.toml", name, args.steps, args.eval_every)
    storage = f"sqlite:///{work / 'tune.db'}"
    command = [sys.executable, "-m", "spladectl", "tune", str(path), "--trials", str(args.trials), "--storage",
               storage, "--pruner", pruner, "--startup-trials", str(args.startup_trials), "--seed", str(seed),
               "--runs-root", str(work / "runs"), "--no-progress"]
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "COLUMNS": "200"}
    started = time.perf_counter()
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(args.workers)]
    logs = [w.communicate()[0] for w in workers]
    seconds = time.perf_counter() - started
    for i, (worker, log) in enumerate(zip(workers, logs)):
        (work / f"{name}-worker{i}.log").write_text(log)
        if worker.returncode != 0:
            raise SystemExit(f"{name}: worker {i} exited {worker.returncode}; see {work / f'{name}-worker{i}.log'}")
    return summarize(work, name, storage, seconds, logs)


def summarize(work: Path, name: str, storage: str, seconds: float, logs: list[str]) -> dict:
    import optuna

    from spladectl.runs.record import load_record

    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), f"{name}: a trial number twice: {numbers}"
    runs = sorted(p.name for p in (work / "runs" / name).iterdir() if p.name.startswith("trial-"))
    assert runs == [f"trial-{n:04d}" for n in sorted(numbers)], f"{name}: runs {runs} vs trials {numbers}"
    ran = sorted(int(line.split()[1].rstrip(":")) for log in logs for line in log.splitlines()
                 if line.startswith("trial ") and (": complete" in line or "pruned at" in line))
    assert ran == sorted(t.number for t in trials if t.state.name in ("COMPLETE", "PRUNED")), \
        f"{name}: the workers' logs say they ended trials {ran}"
    steps = 0
    for t in trials:
        record = load_record(work / "runs" / name / f"trial-{t.number:04d}")
        assert record.trial["number"] == t.number
        steps += record.steps
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = max(complete, key=lambda t: t.value)
    return {"study": name, "trials": len(trials), "complete": len(complete),
            "pruned": sum(t.state.name == "PRUNED" for t in trials),
            "failed": sum(t.state.name == "FAIL" for t in trials), "steps": steps,
            "best_nDCG@10": round(best.value, 4), "best_trial": best.number, "best_params": best.params,
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of a trial that is not pruned")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--startup-trials", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="one pair of studies per sampler seed")
    parser.add_argument("--work", type=Path, default=None, help="where studies and runs go (default: a new temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="spladectl-tune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        rows += [{"seed": seed, **run_study(work, f"unpruned-{seed}", args, "none", seed)},
                 {"seed": seed, **run_study(work, f"pruned-{seed}", args, "median", seed)}]
    unpruned, pruned = rows[0::2], rows[1::2]
    saving = 1 - sum(r["steps"] for r in pruned) / sum(r["steps"] for r in unpruned)
    differences = [p["best_nDCG@10"] - u["best_nDCG@10"] for u, p in zip(unpruned, pruned)]
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "work": str(work), "studies": rows,
              "steps_saved": round(saving, 3), "best_differences": [round(d, 4) for d in differences]}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.trials} trials, {args.workers} workers, {args.steps} steps each, evaluation every "
          f"{args.eval_every}, TPE seeds {args.seeds}; runs in {work}")
    print("| study | trials | complete | pruned | failed | optimizer steps | best nDCG@10 (trial) | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['study']} | {r['trials']} | {r['complete']} | {r['pruned']} | {r['failed']} | {r['steps']} | "
              f"{r['best_nDCG@10']:.4f} ({r['best_trial']}) | {r['seconds']} |")
    print(f"pruning saved {saving:.0%} of the steps; best nDCG@10, pruned minus unpruned, per seed: "
          + ", ".join(f"{d:+.4f}" for d in differences))


if __name__ == "__main__":
    main()
