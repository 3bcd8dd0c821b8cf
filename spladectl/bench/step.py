"""One precision: a fresh Trainer stepped and timed, its FLOPs counted, its top operators profiled."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from spladectl.batches import tokenizes_ahead
from spladectl.bench.device import MatmulPeak, PeakMemory, current_memory, memory_kind, release_memory, synchronize
from spladectl.bench.settings import BenchSettings, Log


def count_step_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of `step` (forward, backward and optimizer), counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def estimate_step_flops(model_config: Any, query_tokens: tuple[int, int], doc_tokens: tuple[int, int]) -> int:
    """Textbook FLOPs of one step for a BERT-style encoder, used when FlopCounterMode cannot run.

    For a text of T (padded) tokens, with L layers, hidden size H, FFN size I and vocabulary V, the forward is
      L × (2·T·(4H² + 2·H·I) + 4·T²·H)    projections and FFN, plus attention scores and their weighted sum
      + 2·T·H² + 2·T·H·V                  the MLM head's transform and the vocabulary projection
    and a training step costs 3× the forward (the backward is about twice the forward). `query_tokens` and
    `doc_tokens` are (texts, padded length). This overestimates the memory-efficient head, whose backward through
    the vocabulary projection is sparse; FlopCounterMode counts what really runs.
    """
    L = model_config.num_hidden_layers
    H = model_config.hidden_size
    I = getattr(model_config, "intermediate_size", 4 * H)  # the usual name
    V = model_config.vocab_size
    total = 0
    for texts, T in (query_tokens, doc_tokens):
        per_text = L * (2 * T * (4 * H * H + 2 * H * I) + 4 * T * T * H) + 2 * T * H * H + 2 * T * H * V
        total += texts * per_text
    return 3 * total


def make_config(settings: BenchSettings, precision: str, batch_size: int, total_steps: int, output_dir: str):
    """The TrainConfig of one measured precision, built like a training's from a request, with the hardware settings
    given exactly (a bench measures what it was asked to, so no profile fallback applies)."""
    from spladectl.request import TrainRequest, make_config as config_of

    request = TrainRequest(model=settings.model, output_dir=output_dir, max_steps=total_steps, seed=settings.seed,
                           n_negatives=1, compile=settings.compile, memory_efficient=settings.memory_efficient)
    hardware = {"device": settings.device, "precision": precision, "batch_size": batch_size, "grad_accum": 1,
                "tf32": settings.tf32, "gradient_checkpointing": settings.gradient_checkpointing,
                "memory_efficient_head": settings.memory_efficient_head,
                "dataloader_workers": settings.dataloader_workers, "max_query_length": settings.max_query_length,
                "max_doc_length": settings.max_doc_length}
    return config_of(request, hardware, profile=settings.profile)


class _Run:
    """A fresh Trainer for one precision and batch size, stepped one optimizer step at a time."""

    def __init__(self, settings: BenchSettings, precision: str, batch_size: int, total_steps: int, examples,
                 pm, log: Log, workdir: str):
        from spladectl.engine import Trainer

        self.device = torch.device(settings.device)
        config = make_config(settings, precision, batch_size, total_steps, workdir)
        self.trainer = Trainer(config, examples, pm=pm, log=log, progress=False)
        self.pm = pm
        self.state = self.trainer.state

    def step(self) -> tuple[float, dict[str, Any]]:
        """(seconds, metrics) of one optimizer step, synchronised with the device at both ends."""
        synchronize(self.device)
        started = time.perf_counter()
        metrics = self.trainer.step()
        synchronize(self.device)
        return time.perf_counter() - started, metrics

    def close(self) -> None:
        self.trainer = self.state = None
        release_memory(self.device)


def optimizer_description(optimizer: torch.optim.Optimizer) -> str:
    defaults = optimizer.defaults
    impl = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "for-loop"
    return f"{type(optimizer).__name__} ({impl})"


def tokenize_seconds(collator, examples, batch_size: int, seed: int, repeats: int = 3) -> float:
    """Median time to produce one tokenized micro-batch through the engine's data path in this process (what a step
    costs inside the step on a CPU device, in the prefetch thread on an accelerator when dataloader workers are 0, or
    a worker per batch)."""
    from spladectl.batches import micro_batches

    batches = micro_batches(examples, collator, batch_size=batch_size, seed=seed, epoch=0, workers=0, prefetch=False)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        if next(batches, None) is None:
            break
        times.append(time.perf_counter() - started)
    return statistics.median(times) if times else 0.0


def profile_top_ops(run: _Run, n: int) -> list[dict[str, Any]]:
    """The `n` ops with the most self time in one optimizer step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    on_cuda = run.device.type == "cuda"
    if on_cuda:
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        run.step()
    events = prof.key_averages()
    attr = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    total = sum(getattr(e, attr, 0.0) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, attr, 0.0), reverse=True)[:n]
    return [{"op": e.key, "self_ms": round(getattr(e, attr, 0.0) / 1e3, 2),
             "share": round(getattr(e, attr, 0.0) / total, 4), "calls": int(e.count)} for e in ranked]


# Ops that are matrix products, for the "kind" table of --profile-step; everything else is element-wise or copying.
_GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
             "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
             "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention",
             "aten::mkldnn_linear", "mkl::_mkl_linear", "mkldnn::_linear_pointwise")


def profile_step_breakdown(run: _Run) -> dict[str, Any]:
    """Where one optimizer step's wall time goes (torch.profiler): shares by phase (data, encoder forward, the SPLADE
    head's projection and its backward, loss, the rest of backward, optimizer, other) and by op kind (matrix
    products against element-wise work), on the step's own thread."""
    from torch.profiler import ProfilerActivity, profile

    from spladectl.engine import PHASE_BACKWARD, PHASE_DATA, PHASE_FORWARD, PHASE_LOSS
    from spladectl.pooling import PHASE_HEAD

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds, _ = run.step()
    wall_us = seconds * 1e6
    spent: dict[str, float] = {}
    for event in prof.events():
        name = event.name
        if name.startswith("Optimizer.step#"):
            name = "optimizer"
        elif "SpladeMaxHeadBackward" in name and name.startswith("autograd::engine::evaluate_function"):
            name = "head backward"
        spent[name] = spent.get(name, 0.0) + event.cpu_time_total
    head, head_back = spent.get(PHASE_HEAD, 0.0), spent.get("head backward", 0.0)
    phases = {
        "data": spent.get(PHASE_DATA, 0.0),
        "encoder forward": spent.get(PHASE_FORWARD, 0.0) - head,
        "head forward (vocabulary projection + max)": head,
        "loss": spent.get(PHASE_LOSS, 0.0),
        "head backward": head_back,
        "rest of backward (encoder)": spent.get(PHASE_BACKWARD, 0.0) - head_back,
        "optimizer": spent.get("optimizer", 0.0),
    }
    phases["other (clipping, scaler, metrics, host)"] = max(0.0, wall_us - sum(phases.values()))
    self_time = {}
    for event in prof.key_averages():
        kind = "matrix products" if event.key in _GEMM_OPS else "element-wise, copies and the rest"
        self_time[kind] = self_time.get(kind, 0.0) + event.self_cpu_time_total
    total_self = sum(self_time.values()) or 1.0
    return {
        "step_s": round(seconds, 4),
        "phases": [{"phase": k, "ms": round(v / 1e3, 1), "share": round(v / wall_us, 4)} for k, v in phases.items()],
        "kinds": [{"kind": k, "ms": round(v / 1e3, 1), "share": round(v / total_self, 4)}
                  for k, v in sorted(self_time.items(), key=lambda kv: -kv[1])],
    }


def bench_precision(settings: BenchSettings, precision: str, examples, pm, log: Log, workdir: str) -> dict[str, Any]:
    """One row of the bench table for `precision` (which must be supported on the device)."""
    device = torch.device(settings.device)
    # the FLOP-counting step and the profiled ones
    extra = 1 + (1 if settings.top_ops else 0) + (1 if settings.profile_step else 0)
    release_memory(device)
    run = _Run(settings, precision, settings.batch_size, settings.warmup + settings.steps + extra, examples, pm,
               log, workdir)
    try:
        baseline = current_memory(device)
        optimizer = optimizer_description(run.state.optimizer)
        trained_as = run.state.config  # what the options resolved to (--memory-efficient sets two of them)
        memory = PeakMemory(device)
        matmul = MatmulPeak(device, precision)
        times, peaks, metrics, peak = [], [], {}, 0.0
        cpu_seconds = 0.0
        for i in range(settings.warmup + settings.steps):
            cpu_started = time.process_time()
            memory.start()  # steps only: the matmul samples between them are not training's memory
            try:
                seconds, metrics = run.step()
            finally:
                peak = max(peak, memory.stop())
            if i >= settings.warmup:
                cpu_seconds += time.process_time() - cpu_started
            phase = "warm-up" if i < settings.warmup else "step"
            log(f"  {precision}: {phase} {i + 1 - (0 if i < settings.warmup else settings.warmup)}"
                f"/{settings.warmup if i < settings.warmup else settings.steps}: {seconds:.3f} s")
            if i >= settings.warmup:
                times.append(seconds)
                peaks.append(matmul.sample())
        split = run.state.split_factor
        try:
            step_flops, flops_source = count_step_flops(run.step), "FlopCounterMode"
        except Exception as exc:  # noqa: BLE001 - an op the counter cannot trace: fall back to the formula
            log(f"  {precision}: FlopCounterMode failed ({type(exc).__name__}: {exc}); estimating FLOPs")
            batch = run.trainer._next_micro_batch()
            step_flops = estimate_step_flops(run.state.model.config, tuple(batch.query_ids.shape),
                                             tuple(batch.doc_ids.shape))
            flops_source = "estimate"
        top = profile_top_ops(run, settings.top_ops) if settings.top_ops else None
        breakdown = profile_step_breakdown(run) if settings.profile_step else None
        tokenize = tokenize_seconds(run.trainer.collator, examples, settings.batch_size, settings.seed)
    finally:
        run.close()

    median = statistics.median(times)
    achieved = step_flops / median
    # Each step against the peak sampled right after it, then the median: a drifting machine moves both alike.
    shares = [step_flops / seconds / flops for seconds, flops in zip(times, peaks)]
    row: dict[str, Any] = {
        "precision": precision, "status": "ok", "reason": None, "device": str(device),
        "batch_size": settings.batch_size, "steps": settings.steps, "warmup": settings.warmup,
        "median_step_s": round(median, 4), "min_step_s": round(min(times), 4), "max_step_s": round(max(times), 4),
        "step_s": times,
        "examples_per_s": round(settings.batch_size / median, 3), "speedup": None,
        "peak_memory_gb": round(peak / 2**30, 4), "baseline_memory_gb": round(baseline / 2**30, 4),
        "step_memory_gb": round(max(0.0, peak - baseline) / 2**30, 4), "memory_kind": memory_kind(device),
        "step_flops": step_flops, "flops_source": flops_source, "achieved_flops_per_s": achieved,
        "matmul_peak_flops_per_s": statistics.median(peaks), "matmul_peaks_flops_per_s": peaks,
        "matmul_share": round(statistics.median(shares), 4),
        "matmul_share_range": [round(min(shares), 4), round(max(shares), 4)],
        "tokenize_s": round(tokenize, 4),
        "tokenize_in": ("dataloader workers" if settings.dataloader_workers else
                        "prefetch thread" if tokenizes_ahead(device.type) else "training thread"),
        "optimizer": optimizer, "gradient_checkpointing": trained_as.gradient_checkpointing,
        "grad_cache_chunk": trained_as.grad_cache_chunk,
        "memory_efficient_head": settings.memory_efficient_head, "compile": settings.compile, "model": settings.model,
        "max_query_length": settings.max_query_length, "max_doc_length": settings.max_doc_length,
        "threads": torch.get_num_threads(), "last_loss": metrics.get("loss"),
        # CPU time of this process over (wall time × threads) in the timed steps: well below 1 on a CPU device
        # means other processes took the cores and the timings are not this machine's best.
        "cpu_utilisation": round(cpu_seconds / (sum(times) * torch.get_num_threads()), 3),
    }
    if split > 1:
        row["note"] = f"out-of-memory recovery split each micro-batch in {split}"
    if top is not None:
        row["top_ops"] = top
    if breakdown is not None:
        row["step_breakdown"] = breakdown
    return row
