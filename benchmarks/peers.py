"""spladectl, sentence-transformers and a plain PyTorch loop, side by side on the same SPLADE training job.

    python benchmarks/peers.py                      # SciFact, splade-tiny, 16 triples, 64/256 tokens, 20 steps, 3 repeats
    python benchmarks/peers.py --json > peers.json
    python benchmarks/peers.py --steps 4 --repeats 1 --trainers spladectl,plain --batch-size 4   # a quick look

Every trainer gets the same job:
- model: splade-tiny (the offline checkpoint), its dropout on, fp32 master weights;
- data: SciFact's train split, each (query, positive) qrel with its first BM25-mined hard negative (spladectl.data),
  the SAME examples in the SAME order for all three (spladectl's own epoch order, handed to the others in sequence);
  queries longer than --max-query-length tokens are shortened once, for everyone, so the one length limit a
  sentence-transformers model has (its max_seq_length, set to --max-doc-length) never has to cut a query;
- batch: 16 triples (query, positive, hard negative); the loss: cross-entropy of each query against all 32 documents
  of the batch (in-batch + hard negatives; sentence-transformers' SparseMultipleNegativesRankingLoss is the same
  thing) + FLOPS regularisation with λq = 5e-4, λd = 3e-4, ramped up quadratically over the first third of the steps;
- AdamW (lr 2e-5, weight decay 0.01), precision 32-true or bf16-mixed (CPU autocast), 2 torch threads.

(a) spladectl: its engine.Trainer, stepped exactly as `spladectl train` steps it.
(b) sentence-transformers: SparseEncoder(splade-tiny) → SparseEncoderTrainer with SpladeLoss wrapping
    SparseMultipleNegativesRankingLoss (its default FLOPS regularizers and quadratic weight schedule).
(c) plain: the loop of the seed articles: AutoModelForMaskedLM → full logits → log1p(relu) → × mask → max over
    tokens; AdamW; torch.autocast.

Each run is its own Python process, so its peak RSS (ru_maxrss, the kernel's high-water mark) is its own; the order
of the trainers rotates between repeats (a b c, c a b, b c a, ...). Examples/s counts the steps after --warmup:
batch × (steps − warmup) / (time from the end of the last warm-up step to the end of the last step), so data
loading, tokenization, forward, backward and the optimizer are all in it. The table shows medians over repeats.

Needs the bench extra for (b): pip install 'spladectl[bench]'.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TRAINERS = ("spladectl", "sentence-transformers", "plain")
SHORT = {"spladectl": "spladectl", "sentence-transformers": "ST", "plain": "plain"}
ALIASES = {"st": "sentence-transformers", "sentence_transformers": "sentence-transformers", "a": "spladectl",
           "b": "sentence-transformers", "c": "plain"}
DEFAULT_DATA = "/work/shared/data/scifact"
RESULT_MARKER = "PEERS-RESULT "
LAMBDA_Q, LAMBDA_D, LR, WEIGHT_DECAY, SEED = 5e-4, 3e-4, 2e-5, 0.01, 42


# ------------------------------------------------------------------------------------------------ shared job

def rotation(trainers: list[str], repeat: int) -> list[str]:
    """The order of the trainers in repeat `repeat`: a b c, then c a b, then b c a, ..."""
    k = repeat % len(trainers)
    return trainers[len(trainers) - k:] + trainers[:len(trainers) - k]


def spladectl_order(n: int, batch_size: int, seed: int) -> list[int]:
    """The order in which spladectl's Trainer visits n examples in its first epoch (indices, flattened)."""
    from spladectl.batches import epoch_order

    return [i for batch in epoch_order(n, batch_size, seed, 0) for i in batch]


def arrange_for_spladectl(ordered: list, batch_size: int, seed: int) -> list:
    """A list that spladectl's Trainer, which shuffles, will visit in exactly the order of `ordered`."""
    order = spladectl_order(len(ordered), batch_size, seed)
    arranged = [None] * len(ordered)
    for position, index in enumerate(order):
        arranged[index] = ordered[position]
    return arranged


def flops_weight(target: float, step: int, total_steps: int) -> float:
    """The quadratic λ ramp over the first third of the run (spladectl's and sentence-transformers' default)."""
    warmup = max(1, total_steps // 3)
    return target * min(1.0, step / warmup) ** 2


def prepare_examples(args, tokenizer) -> list[dict]:
    """steps × batch triples in the order every trainer will see them."""
    from spladectl.data import load_training_data

    examples = load_training_data(args.data, split="train", n_negatives=1, show_progress=False)
    needed = args.steps * args.batch_size
    if len(examples) < needed:
        raise SystemExit(f"{args.data}: {len(examples)} examples, the run needs {needed}")
    order = spladectl_order(len(examples), args.batch_size, SEED)[:needed]
    triples = []
    for i in order:
        e = examples[i]
        triples.append({"query": shorten(tokenizer, e.query, args.max_query_length), "positive": e.positive,
                        "negative": e.negatives[0]})
    return triples


def shorten(tokenizer, text: str, max_length: int) -> str:
    """`text` cut at a word boundary so that it tokenizes to at most `max_length` tokens (special tokens included)."""
    if len(tokenizer(text)["input_ids"]) <= max_length:
        return text
    words = text.split()
    while words and len(tokenizer(" ".join(words))["input_ids"]) > max_length:
        words.pop()
    return " ".join(words)


# ------------------------------------------------------------------------------------------------ children

def _child_setup(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)


def _rss() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss)


def _peak_sampler():
    from spladectl.memory import RssProbe, StepSampler

    sampler = StepSampler([RssProbe()], interval=0.005)
    return sampler


def run_spladectl(args, triples: list[dict]) -> dict:
    from spladectl.config import TrainConfig
    from spladectl.data import Example
    from spladectl.engine import Trainer
    from spladectl.plugin_loading import load_plugins

    examples = [Example(query=t["query"], positive=t["positive"], negatives=[t["negative"]]) for t in triples]
    examples = arrange_for_spladectl(examples, args.batch_size, SEED)
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            model=args.model, output_dir=tmp, precision=args.precision, batch_size=args.batch_size, grad_accum=1,
            max_steps=args.steps, lr=LR, weight_decay=WEIGHT_DECAY, lambda_q=LAMBDA_Q, lambda_d=LAMBDA_D,
            max_query_length=args.max_query_length, max_doc_length=args.max_doc_length, seed=SEED,
            dataloader_workers=0, n_negatives=1,
        )
        pm = load_plugins()
        trainer = Trainer(config, examples, pm=pm, log=lambda m: print(m, file=sys.stderr), progress=False)
        state = trainer.state
        state.model.train()
        before = _rss()
        sampler = _peak_sampler()
        sampler.start()
        ends, losses = [time.perf_counter()], []
        while state.step < state.total_steps:
            metrics = trainer.step()
            ends.append(time.perf_counter())
            losses.append(metrics["loss"])
        peak = sampler.stop().get("mem_rss_peak", 0.0)
    return {"ends": ends, "losses": losses, "rss_before_training": before, "rss_training_peak": peak}


def run_sentence_transformers(args, triples: list[dict]) -> dict:
    import torch
    from datasets import Dataset
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from sentence_transformers.sparse_encoder import (
        SparseEncoder,
        SparseEncoderTrainer,
        SparseEncoderTrainingArguments,
        losses,
    )
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    from spladectl.model import resolve_model_path

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model = SparseEncoder(resolve_model_path(args.model), device="cpu")
    model.max_seq_length = args.max_doc_length
    dataset = Dataset.from_dict({"query": [t["query"] for t in triples],
                                 "positive": [t["positive"] for t in triples],
                                 "negative": [t["negative"] for t in triples]})
    loss = losses.SpladeLoss(
        model, loss=losses.SparseMultipleNegativesRankingLoss(model),
        query_regularizer_weight=LAMBDA_Q, document_regularizer_weight=LAMBDA_D,
    )

    def in_order(dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
        # The examples are already in the shared order: no shuffling.
        return DefaultBatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=drop_last,
                                   valid_label_columns=valid_label_columns, generator=generator, seed=seed)

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends, self.losses = [], []

        def on_train_begin(self, *a, **k):
            self.ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

        def on_log(self, args_, state, control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp:
        training_args = SparseEncoderTrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=LR,
            weight_decay=WEIGHT_DECAY, warmup_steps=0.1, lr_scheduler_type="linear", max_grad_norm=1.0,
            bf16=args.precision == "bf16-mixed", use_cpu=True, optim="adamw_torch_fused", seed=SEED,
            dataloader_num_workers=0, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
            batch_sampler=in_order,
        )
        trainer = SparseEncoderTrainer(model=model, args=training_args, train_dataset=dataset, loss=loss,
                                       callbacks=[timer])
        before = _rss()
        sampler = _peak_sampler()
        sampler.start()
        trainer.train()
        peak = sampler.stop().get("mem_rss_peak", 0.0)
    if len(timer.ends) != args.steps + 1:
        raise RuntimeError(f"sentence-transformers ran {len(timer.ends) - 1} steps, expected {args.steps}")
    return {"ends": timer.ends, "losses": timer.losses, "rss_before_training": before, "rss_training_peak": peak,
            "torch_dtype_autocast": str(torch.get_autocast_dtype("cpu"))}


def naive_splade(logits, attention_mask):
    """The seed articles' pooling: activate every logit, zero the padding, max over tokens (B, T, V) → (B, V)."""
    import torch

    values, _ = torch.max(torch.log1p(torch.relu(logits)) * attention_mask.unsqueeze(-1), dim=1)
    return values


def run_plain(args, triples: list[dict]) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from spladectl.model import resolve_model_path

    hf_logging.disable_progress_bar()
    path = resolve_model_path(args.model)
    model = AutoModelForMaskedLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    dtype = torch.bfloat16 if args.precision == "bf16-mixed" else None
    before = _rss()
    sampler = _peak_sampler()
    sampler.start()
    ends, losses = [time.perf_counter()], []
    for step in range(args.steps):
        batch = triples[step * args.batch_size:(step + 1) * args.batch_size]
        q = tokenizer([t["query"] for t in batch], max_length=args.max_query_length, truncation=True, padding=True,
                      return_tensors="pt")
        d = tokenizer([x for t in batch for x in (t["positive"], t["negative"])], max_length=args.max_doc_length,
                      truncation=True, padding=True, return_tensors="pt")
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            q_reps = naive_splade(model(**q).logits, q["attention_mask"])
            d_reps = naive_splade(model(**d).logits, d["attention_mask"])
        q_reps, d_reps = q_reps.float(), d_reps.float()
        scores = q_reps @ d_reps.T
        targets = torch.arange(len(batch)) * 2
        loss = F.cross_entropy(scores, targets)
        loss = loss + flops_weight(LAMBDA_Q, step, args.steps) * torch.sum(q_reps.mean(0) ** 2)
        loss = loss + flops_weight(LAMBDA_D, step, args.steps) * torch.sum(d_reps.mean(0) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        ends.append(time.perf_counter())
    peak = sampler.stop().get("mem_rss_peak", 0.0)
    return {"ends": ends, "losses": losses, "rss_before_training": before, "rss_training_peak": peak}


RUN_SETTINGS = ("data", "model", "steps", "warmup", "batch_size", "max_query_length", "max_doc_length", "threads",
                "omp_wait_policy")
RUNNERS = {"spladectl": run_spladectl, "sentence-transformers": run_sentence_transformers, "plain": run_plain}


def child_main(args) -> int:
    _child_setup(args)
    triples = [json.loads(line) for line in Path(args.examples).read_text().splitlines() if line]
    result = RUNNERS[args.child](args, triples)
    ends = result.pop("ends")
    steps = [b - a for a, b in zip(ends, ends[1:])]
    timed = ends[-1] - ends[args.warmup]
    result.update({
        "trainer": args.child, "precision": args.precision, "step_seconds": steps,
        "examples_per_s": args.batch_size * (args.steps - args.warmup) / timed,
        "peak_rss": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
        "cpu_seconds": time.process_time(),
    })
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ parent

def run_child(args, trainer: str, precision: str, examples_file: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", trainer, "--precision", precision,
               "--examples", examples_file, "--model", args.model, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
               "--max-query-length", str(args.max_query_length), "--max-doc-length", str(args.max_doc_length),
               "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore")
    if args.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        return _collect(child, trainer, precision)
    finally:
        if child.poll() is None:  # interrupted: do not leave a trainer running
            child.kill()
            child.wait()


def _collect(child, trainer: str, precision: str) -> dict:
    tail: list[str] = []

    def keep_stderr():
        for line in child.stderr:
            tail[:] = (tail + [line.rstrip()])[-30:]

    reader = threading.Thread(target=keep_stderr, daemon=True)
    reader.start()
    out = child.stdout.read()
    child.wait()
    reader.join(timeout=5)
    results = [line[len(RESULT_MARKER):] for line in out.splitlines() if line.startswith(RESULT_MARKER)]
    if child.returncode != 0 or not results:
        raise SystemExit(f"{trainer} {precision} failed (exit {child.returncode}):\n" + "\n".join(tail[-15:]))
    return json.loads(results[-1])


def summarize(runs: list[dict], trainers: list[str], precisions: list[str]) -> list[dict]:
    """One row per (trainer, precision): medians over repeats, and the ratios of spladectl to the others."""
    rows = []
    for precision in precisions:
        for trainer in trainers:
            mine = [r for r in runs if r["trainer"] == trainer and r["precision"] == precision]
            if not mine:
                continue
            rows.append({
                "trainer": trainer, "precision": precision, "repeats": len(mine),
                "examples_per_s": statistics.median(r["examples_per_s"] for r in mine),
                "examples_per_s_all": [round(r["examples_per_s"], 3) for r in mine],
                "peak_rss_gb": statistics.median(r["peak_rss"] for r in mine) / 2**30,
                "training_rss_gb": statistics.median(r["rss_training_peak"] for r in mine) / 2**30,
                "rss_before_training_gb": statistics.median(r["rss_before_training"] for r in mine) / 2**30,
                "median_step_s": statistics.median(s for r in mine for s in r["step_seconds"][r.get("warmup", 0):]),
                "final_loss": statistics.median(r["losses"][-1] for r in mine) if all(r["losses"] for r in mine)
                else None,
            })
    by = {(r["trainer"], r["precision"]): r for r in rows}
    for row in rows:
        ours = by.get(("spladectl", row["precision"]))
        ref32 = by.get((row["trainer"], "32-true"))
        row["speedup_over_32_true"] = row["examples_per_s"] / ref32["examples_per_s"] if ref32 else None
        if ours is not None and row["trainer"] != "spladectl":
            row["spladectl_throughput_ratio"] = ours["examples_per_s"] / row["examples_per_s"]
            row["spladectl_memory_ratio"] = ours["peak_rss_gb"] / row["peak_rss_gb"]
    return rows


# Issue 18's targets (performance round 2): bf16 at 2× float32, and against sentence-transformers' trainer.
SPEEDUP_BF16 = 2.0
VS_ST = {"32-true": 6.5, "bf16-mixed": 8.0}
MEMORY_VS_ST = 0.25


def targets(rows: list[dict]) -> list[tuple[str, float | None, str, bool | None]]:
    """The issue's targets: (what, measured, goal, met)."""
    by = {(r["trainer"], r["precision"]): r for r in rows}
    out = []
    ours_bf16 = by.get(("spladectl", "bf16-mixed"))
    if ours_bf16 and ours_bf16.get("speedup_over_32_true") is not None:
        v = ours_bf16["speedup_over_32_true"]
        out.append(("spladectl bf16-mixed / 32-true examples/s", v, f">= {SPEEDUP_BF16}", v >= SPEEDUP_BF16))
    for precision, goal in VS_ST.items():
        st = by.get(("sentence-transformers", precision))
        if st and ("spladectl", precision) in by:
            v = st["spladectl_throughput_ratio"]
            out.append((f"spladectl / ST examples/s, {precision}", v, f">= {goal}", v >= goal))
    for precision in ("32-true", "bf16-mixed"):
        st = by.get(("sentence-transformers", precision))
        if st and ("spladectl", precision) in by:
            v = st["spladectl_memory_ratio"]
            out.append((f"spladectl / ST peak RSS, {precision}", v, f"<= {MEMORY_VS_ST}", v <= MEMORY_VS_ST))
    return out


def markdown(rows: list[dict], args) -> str:
    lines = [
        f"splade-tiny on {Path(args.data).name}, batch {args.batch_size} triples, query/doc ≤ "
        f"{args.max_query_length}/{args.max_doc_length} tokens, {args.steps} steps ({args.warmup} warm-up not "
        f"timed), {args.threads} threads, median of {args.repeats} repeat(s)"
        + (f", OMP_WAIT_POLICY={args.omp_wait_policy.upper()}" if args.omp_wait_policy != "inherit" else "")
        + (f"; load average during the runs {args.load_average:.1f} on {os.cpu_count()} CPUs"
           if getattr(args, "load_average", None) is not None else ""),
        "",
        "| trainer | precision | examples/s | vs 32-true | peak RSS (GiB) | RSS before training (GiB) | "
        "spladectl ÷ it, examples/s | spladectl ÷ it, peak RSS |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = "-" if r["speedup_over_32_true"] is None else f"{r['speedup_over_32_true']:.2f}×"
        thr = f"{r['spladectl_throughput_ratio']:.2f}" if "spladectl_throughput_ratio" in r else "-"
        mem = f"{r['spladectl_memory_ratio']:.2f}" if "spladectl_memory_ratio" in r else "-"
        lines.append(f"| {r['trainer']} | {r['precision']} | {r['examples_per_s']:.2f} | {speed} | "
                     f"{r['peak_rss_gb']:.2f} | {r['rss_before_training_gb']:.2f} | {thr} | {mem} |")
    goals = targets(rows)
    if goals:
        lines += ["", "| target | measured | goal | met |", "|---|---:|---|---|"]
        for what, value, goal, met in goals:
            lines.append(f"| {what} | {value:.2f} | {goal} | {'yes' if met else 'NO'} |")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainers", default=",".join(TRAINERS),
                   help="comma-separated: spladectl, sentence-transformers (st), plain")
    p.add_argument("--precisions", default="32-true,bf16-mixed")
    p.add_argument("--data", default=DEFAULT_DATA, help="a BEIR directory with a train split (default: SciFact)")
    p.add_argument("--model", default="splade-tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of examples/s")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-query-length", type=int, default=64)
    p.add_argument("--max-doc-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--omp-wait-policy", choices=("inherit", "passive", "active"), default="inherit",
                   help="OMP_WAIT_POLICY for every trainer; passive keeps a busy machine from stalling each "
                        "parallel region on a descheduled thread (default: the environment's)")
    p.add_argument("--json", action="store_true", help="print the rows (and every run) as JSON; the table goes to stderr")
    p.add_argument("--runs-file", help="append each finished run to this JSONL file as it completes (a run that is "
                                       "interrupted keeps what it measured)")
    p.add_argument("--from-runs", help="do not train: summarize the runs recorded in this JSONL file")
    p.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--examples", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is None:
        from spladectl.precision import canonical_precision

        args.trainers = [ALIASES.get(t.strip().lower(), t.strip().lower()) for t in args.trainers.split(",")
                         if t.strip()]
        unknown = [t for t in args.trainers if t not in TRAINERS]
        if unknown:
            p.error(f"--trainers: unknown {', '.join(unknown)}; expected {', '.join(TRAINERS)}")
        args.precisions = [canonical_precision(x) for x in args.precisions.split(",") if x.strip()]
        if not 0 <= args.warmup < args.steps:
            p.error("--warmup must be at least 0 and less than --steps")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    # SIGTERM as an exception, so that a terminated parent still stops the trainer it is waiting for.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.child:
        return child_main(args)
    if args.from_runs:
        runs = [json.loads(line) for line in Path(args.from_runs).read_text().splitlines() if line.strip()]
        for key, value in (runs[0].get("settings", {}) if runs else {}).items():
            setattr(args, key, value)  # the table's header describes the recorded runs, not this command line
        args.trainers = [t for t in args.trainers if any(r["trainer"] == t for r in runs)]
        args.precisions = [p for p in args.precisions if any(r["precision"] == p for r in runs)]
        args.repeats = max((r["repeat"] + 1 for r in runs), default=0)
        return report(args, runs)
    from transformers import AutoTokenizer

    from spladectl.model import resolve_model_path

    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    log(f"preparing {args.steps} × {args.batch_size} triples from {args.data} (BM25 negatives, cached) …")
    triples = prepare_examples(args, tokenizer)
    runs = []
    with tempfile.TemporaryDirectory(prefix="spladectl-peers-") as tmp:
        examples_file = os.path.join(tmp, "triples.jsonl")
        Path(examples_file).write_text("".join(json.dumps(t) + "\n" for t in triples))
        for repeat in range(args.repeats):
            for precision in args.precisions:
                for trainer in rotation(args.trainers, repeat):
                    started = time.perf_counter()
                    load_before = os.getloadavg()[0]
                    result = run_child(args, trainer, precision, examples_file)
                    result["repeat"], result["warmup"] = repeat, args.warmup
                    result["load_average"] = (load_before + os.getloadavg()[0]) / 2
                    result["settings"] = {k: getattr(args, k) for k in RUN_SETTINGS}
                    runs.append(result)
                    if args.runs_file:
                        with open(args.runs_file, "a") as handle:
                            handle.write(json.dumps(result) + "\n")
                    log(f"repeat {repeat + 1}/{args.repeats} {precision:<10} {trainer:<21} "
                        f"{result['examples_per_s']:6.2f} examples/s, peak RSS {result['peak_rss'] / 2**30:.2f} GiB "
                        f"({time.perf_counter() - started:.0f} s with start-up, load average "
                        f"{result['load_average']:.1f})")
    return report(args, runs)


def report(args, runs: list[dict]) -> int:
    rows = summarize(runs, args.trainers, args.precisions)
    args.load_average = statistics.mean(r["load_average"] for r in runs) if runs else None
    table = markdown(rows, args)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps({"settings": {k: v for k, v in vars(args).items() if k not in ("child", "precision",
                                                                                         "examples", "json")},
                          "rows": rows, "targets": [dict(zip(("target", "measured", "goal", "met"), t))
                                                    for t in targets(rows)],
                          "runs": runs}, indent=2))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
