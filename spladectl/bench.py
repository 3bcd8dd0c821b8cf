"""`spladectl bench`: real training steps in each precision on this machine, timed, measured and compared.

For every precision asked for, a fresh `engine.Trainer` (model, optimizer, GradScaler, autocast exactly as
`spladectl train` builds them) runs W warm-up steps and N timed optimizer steps on the same examples. A row reports:

- the median step time and examples/s (batch / median step), and the speed-up over 32-true;
- peak memory during the steps: process RSS on CPU (sampled every 5 ms by spladectl.memory.StepSampler), the CUDA
  caching allocator's `max_memory_allocated` on CUDA, allocated memory on MPS;
- the model FLOPs of one optimizer step, counted by `torch.utils.flop_counter.FlopCounterMode` on one extra step
  (exact for the ops it knows: every matmul of the encoder, the vocabulary projection, the attention and the
  backward; element-wise ops count as 0). If the counter cannot run, `estimate_step_flops` gives the textbook
  formula instead, and `flops_source` says which;
- achieved FLOP/s (step FLOPs / median step time) and its share of this device's own matmul FLOP/s in that precision,
  measured by timing a large square matmul of operands already in the compute dtype, under the same autocast.

`find_max_batch` searches the largest batch whose step fits a memory budget: from the bench batch it doubles while
the step fits (or halves until it does), then bisects; every probe is two real optimizer steps of a fresh Trainer
(the second step is the heavier one: the optimizer's state exists by then). A probe fails when its peak exceeds the
budget, when the step raises out-of-memory, or when the engine's OOM recovery had to split the micro-batch. A probe
whose memory, extrapolated linearly from the probes before it, would exceed the budget by more than 25% is not run
(on a CPU, really running out of memory ends in the kernel's OOM killer, not an exception).

The default examples are the demo's queries with documents filled to `max_doc_length` tokens from the demo passages,
so each document costs what a SciFact abstract does (most exceed 256 tokens); `data=` benchmarks real data instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spladectl.errors import SpladectlError
from spladectl.precision import PRECISIONS, autocast_dtype, canonical_precision

DEMO_TRAIN = Path(__file__).resolve().parent / "demo" / "train.jsonl"
DEFAULT_PRECISIONS = ",".join(PRECISIONS[i] for i in (0, 2, 1))  # 32-true,bf16-mixed,16-mixed
# A probe predicted (by linear extrapolation) to exceed the budget by this factor is not run.
_PREDICTION_MARGIN = 1.25
_MAX_BATCH_CAP = 1 << 16
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

Log = Callable[[str], None]


@dataclass
class BenchSettings:
    model: str = "splade-tiny"
    device: str = "cpu"
    precisions: list[str] = field(default_factory=lambda: ["32-true", "bf16-mixed"])
    batch_size: int = 8
    steps: int = 5
    warmup: int = 2
    max_query_length: int = 64
    max_doc_length: int = 256
    tf32: bool = False
    gradient_checkpointing: bool = False
    memory_efficient_head: bool = True
    dataloader_workers: int = 0
    find_max_batch: bool = False
    memory_budget_gb: float | None = None  # None: default_memory_budget(device)
    top_ops: int = 0  # profile one extra step and keep its N most expensive ops
    data: str | None = None  # None: synthetic examples from the demo
    profile: str = "cpu"
    seed: int = 42
    threads: int | None = None  # torch CPU threads; None: torch's default


# ------------------------------------------------------------------------------------------------ precisions

def parse_precisions(text: str) -> list[str]:
    """Comma-separated precision names or aliases → canonical names, in order, without repeats."""
    out: list[str] = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        name = canonical_precision(part, where="--precisions")
        if name not in out:
            out.append(name)
    if not out:
        raise SpladectlError("--precisions: give at least one of " + ", ".join(PRECISIONS))
    return out


def unsupported_reason(precision: str, device: torch.device, facts: Any = None) -> str | None:
    """Why `precision` cannot be benchmarked on `device`, or None when it can.

    bf16 needs native support: a CUDA GPU of compute capability 8.0+, an Apple chip from M2 on, or a CPU with
    AVX512-BF16/AMX (elsewhere it is emulated and slower than float32: not a number anyone should train with).
    fp16 autocast must be available for the device type, and on a CPU a native fp16 matmul, for the same reason.
    """
    dtype = autocast_dtype(precision)
    if dtype is None:
        return None
    kind = device.type
    if not torch.amp.is_autocast_available(kind):
        return f"torch has no autocast for {kind}"
    if dtype == torch.bfloat16:
        if kind == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            if (major, minor) < (8, 0):
                name = torch.cuda.get_device_name(device)
                return f"{name} (compute capability {major}.{minor}) has no native bf16 (needs 8.0+)"
        elif kind in ("cpu", "mps"):
            if facts is None:
                from spladectl.hardware import detect

                facts = detect()
            if not facts.has_bf16:
                return ("this CPU has no native bf16 (AVX512-BF16 or AMX): emulated, bf16 cannot beat float32 here"
                        if kind == "cpu" else "this Apple chip has no bf16 (M2 and newer)")
    if dtype == torch.float16 and kind == "cpu":
        from spladectl import precision as precision_module

        if not precision_module.has_native_matmul("cpu", torch.float16):
            return ("this CPU has no native fp16 matmul (AVX512-FP16 or AMX-FP16): emulated, fp16 cannot beat "
                    "float32 here")
        try:
            with torch.autocast("cpu", dtype=torch.float16):
                probe = torch.ones(4, 4) @ torch.ones(4, 4)
            if probe.dtype != torch.float16:
                return "this torch build's CPU autocast does not run float16"
        except (RuntimeError, AssertionError) as exc:
            return f"CPU float16 autocast is not available ({exc})"
    return None


# ------------------------------------------------------------------------------------------------ examples

def bench_examples(tokenizer, n: int, max_doc_length: int, *, seed: int = 0):
    """`n` training examples: the demo's queries (natural length) with a positive and one negative each filled to
    at least `max_doc_length` tokens from the demo's passages, so every document is truncated at the configured
    length, as most SciFact abstracts are at 256."""
    from spladectl.data import Example, load_training_data

    demo = load_training_data(str(DEMO_TRAIN), show_progress=False)
    passages = list(dict.fromkeys(t for e in demo for t in [e.positive, *e.negatives]))
    lengths = [len(ids) for ids in tokenizer(passages, add_special_tokens=False)["input_ids"]]

    def filled(start: int) -> str:
        parts, tokens, j = [], 0, start
        while tokens < max_doc_length:
            parts.append(passages[j % len(passages)])
            tokens += lengths[j % len(passages)]
            j += 1
        return " ".join(parts)

    out = []
    for i in range(n):
        e = demo[i % len(demo)]
        shift = (i // len(demo)) * 7 + seed  # repeats of the demo get other filler passages
        first = passages.index(e.positive)
        out.append(Example(query=e.query, positive=filled(first + shift),
                           negatives=[filled(first + shift + len(passages) // 2)]))
    return out


def load_tokenizer(model: str):
    """The model's tokenizer alone (the weights are loaded by each Trainer)."""
    from transformers import AutoTokenizer

    from spladectl.model import resolve_model_path

    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(model))
    except SpladectlError:
        raise
    except Exception as exc:  # whatever transformers raises here is about the model name
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpladectlError(f"--model: cannot load the tokenizer of {model!r} ({detail})") from exc


# ------------------------------------------------------------------------------------------------ devices

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def release_memory(device: torch.device) -> None:
    """Give freed memory back, so the next measurement starts from what is really alive: the garbage collector,
    glibc's malloc_trim (freed heap pages otherwise stay in RSS), the CUDA caching allocator."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        with contextlib.suppress(Exception):
            torch.mps.empty_cache()


def return_freed_memory_promptly() -> None:
    """glibc: serve every allocation above 64 KiB with its own mmap, returned to the OS when freed.

    By default glibc raises that threshold (up to 32 MiB) as large blocks are freed, and keeps later ones in the heap,
    where freed memory stays resident; a probe run after a larger one would then be charged for its leftovers.
    Only for the max-batch probes, after the timed steps: page-faulting fresh memory costs some speed.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD


def memory_kind(device: torch.device) -> str:
    return {"cuda": "CUDA allocated", "mps": "MPS allocated"}.get(device.type, "RSS")


def current_memory(device: torch.device) -> float:
    """Bytes in use now, in the same kind as `peak_memory` measures."""
    if device.type == "cuda":
        return float(torch.cuda.memory_allocated(device))
    if device.type == "mps":
        return float(torch.mps.current_allocated_memory())
    import psutil

    return float(psutil.Process().memory_info().rss)


def default_memory_budget(device: torch.device) -> float:
    """GiB: 90% of the GPU's memory; on a CPU 80% of what this process holds plus what the system has available."""
    if device.type == "cuda":
        return 0.9 * torch.cuda.get_device_properties(device).total_memory / 2**30
    if device.type == "mps":
        with contextlib.suppress(Exception):
            return 0.9 * torch.mps.recommended_max_memory() / 2**30
    import psutil

    return 0.8 * (psutil.virtual_memory().available + psutil.Process().memory_info().rss) / 2**30


class PeakMemory:
    """Peak memory of the device between `start()` and `stop()` (bytes), from spladectl.memory's probes."""

    def __init__(self, device: torch.device):
        from spladectl import memory

        self.device = device
        probes, _ = memory.probes_for(device)
        # The NVML probe sees the whole GPU (other processes too): the allocator's peak is this run's own.
        self.sampler = memory.StepSampler([p for p in probes if p.name != "nvml"])
        self.key = {"cuda": "mem_cuda_allocated_peak", "mps": "mem_mps_allocated_peak"}.get(device.type,
                                                                                           "mem_rss_peak")

    def start(self) -> None:
        self.sampler.start()

    def stop(self) -> float:
        return float(self.sampler.stop().get(self.key, 0.0))


# ------------------------------------------------------------------------------------------------ matmul peak

def matmul_peak(device: torch.device, precision: str, *, size: int | None = None, repeats: int = 4) -> float:
    """FLOP/s of a square matmul on `device` in the precision's compute dtype (operands already in that dtype, under
    the same autocast as training); the best of `repeats` timings, since a peak is what the device can do."""
    dtype = autocast_dtype(precision) or torch.float32
    size = size or (8192 if device.type == "cuda" else 1536)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    context = torch.autocast(device.type, dtype=dtype) if precision != "32-true" else contextlib.nullcontext()
    times = []
    with torch.no_grad(), context:
        for i in range(repeats + 1):
            synchronize(device)
            started = time.perf_counter()
            (a @ b)
            synchronize(device)
            if i >= 1:  # the first call picks kernels and warms caches
                times.append(time.perf_counter() - started)
    return 2 * size**3 / min(times)


# ------------------------------------------------------------------------------------------------ FLOPs

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


# ------------------------------------------------------------------------------------------------ one precision

def make_config(settings: BenchSettings, precision: str, batch_size: int, total_steps: int, output_dir: str):
    from spladectl.config import TrainConfig

    return TrainConfig(
        model=settings.model, output_dir=output_dir, profile=settings.profile, device=settings.device,
        precision=precision, batch_size=batch_size, grad_accum=1, tf32=settings.tf32,
        gradient_checkpointing=settings.gradient_checkpointing,
        memory_efficient_head=settings.memory_efficient_head, dataloader_workers=settings.dataloader_workers,
        max_query_length=settings.max_query_length, max_doc_length=settings.max_doc_length,
        max_steps=total_steps, seed=settings.seed, n_negatives=1,
    )


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
        self.state.model.train()
        pm.hook.on_train_start(state=self.state)

    def step(self) -> tuple[float, dict[str, Any]]:
        """(seconds, metrics) of one optimizer step, synchronised with the device at both ends."""
        synchronize(self.device)
        started = time.perf_counter()
        metrics = self.pm.hook.optimizer_step(state=self.state)
        synchronize(self.device)
        return time.perf_counter() - started, metrics

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pm.hook.on_train_end(state=self.state, status="finished")
        self.trainer = self.state = None
        release_memory(self.device)


def optimizer_description(optimizer: torch.optim.Optimizer) -> str:
    defaults = optimizer.defaults
    impl = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "for-loop"
    return f"{type(optimizer).__name__} ({impl})"


def tokenize_seconds(collator, examples, batch_size: int, seed: int, repeats: int = 3) -> float:
    """Median time to produce one tokenized micro-batch through the engine's data path in this process (what a step
    costs in the prefetch thread when dataloader workers are 0, or a worker per batch)."""
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


def bench_precision(settings: BenchSettings, precision: str, examples, pm, log: Log, workdir: str,
                    peaks: dict[str, float]) -> dict[str, Any]:
    """One row of the bench table for `precision` (which must be supported on the device)."""
    device = torch.device(settings.device)
    extra = 1 + (1 if settings.top_ops else 0)  # the FLOP-counting step and the profiled one
    release_memory(device)
    run = _Run(settings, precision, settings.batch_size, settings.warmup + settings.steps + extra, examples, pm,
               log, workdir)
    try:
        baseline = current_memory(device)
        optimizer = optimizer_description(run.state.optimizer)
        memory = PeakMemory(device)
        times, metrics = [], {}
        memory.start()
        cpu_seconds = 0.0
        try:
            for i in range(settings.warmup + settings.steps):
                cpu_started = time.process_time()
                seconds, metrics = run.step()
                if i >= settings.warmup:
                    cpu_seconds += time.process_time() - cpu_started
                phase = "warm-up" if i < settings.warmup else "step"
                log(f"  {precision}: {phase} {i + 1 - (0 if i < settings.warmup else settings.warmup)}"
                    f"/{settings.warmup if i < settings.warmup else settings.steps}: {seconds:.3f} s")
                if i >= settings.warmup:
                    times.append(seconds)
        finally:
            peak = memory.stop()
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
        tokenize = tokenize_seconds(run.trainer.collator, examples, settings.batch_size, settings.seed)
    finally:
        run.close()

    if precision not in peaks:
        log(f"  {precision}: measuring the matmul peak")
        peaks[precision] = matmul_peak(device, precision)
    median = statistics.median(times)
    achieved = step_flops / median
    row: dict[str, Any] = {
        "precision": precision, "status": "ok", "reason": None, "device": str(device),
        "batch_size": settings.batch_size, "steps": settings.steps, "warmup": settings.warmup,
        "median_step_s": round(median, 4), "min_step_s": round(min(times), 4), "max_step_s": round(max(times), 4),
        "examples_per_s": round(settings.batch_size / median, 3), "speedup": None,
        "peak_memory_gb": round(peak / 2**30, 4), "baseline_memory_gb": round(baseline / 2**30, 4),
        "step_memory_gb": round(max(0.0, peak - baseline) / 2**30, 4), "memory_kind": memory_kind(device),
        "step_flops": step_flops, "flops_source": flops_source, "achieved_flops_per_s": achieved,
        "matmul_peak_flops_per_s": peaks[precision], "matmul_share": round(achieved / peaks[precision], 4),
        "tokenize_s": round(tokenize, 4),
        "tokenize_in": "prefetch thread" if settings.dataloader_workers == 0 else "dataloader workers",
        "optimizer": optimizer, "gradient_checkpointing": settings.gradient_checkpointing,
        "memory_efficient_head": settings.memory_efficient_head, "model": settings.model,
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
    return row


# ------------------------------------------------------------------------------------------------ max batch

def search_max_batch(probe: Callable[[int], tuple[bool, float | None, str]], start: int, budget: float, *,
                     cap: int = _MAX_BATCH_CAP, log: Log = lambda _: None) -> tuple[int | None, list[dict]]:
    """The largest batch b for which `probe(b)` fits: doubling from `start` while it fits (halving while it does
    not), then bisection to within 1/8 of the answer. `probe(b)` -> (fits, peak bytes or None, why not).

    A batch whose peak, extrapolated from the two largest fitting probes, exceeds `budget` × 1.25 is not probed.
    Returns (largest fitting batch or None, the probes in order).
    """
    probes: list[dict[str, Any]] = []
    fitting: dict[int, float] = {}

    def predicted(b: int) -> float | None:
        known = sorted(fitting.items())[-2:]
        if len(known) < 2:
            return None
        (b0, m0), (b1, m1) = known
        return m1 + (m1 - m0) / (b1 - b0) * (b - b1)

    def attempt(b: int) -> bool:
        guess = predicted(b)
        if guess is not None and guess > _PREDICTION_MARGIN * budget:
            probes.append({"batch_size": b, "fits": False, "peak_gb": None, "predicted_gb": round(guess / 2**30, 3),
                           "why": "predicted over budget (not run)"})
            log(f"  batch {b}: predicted {guess / 2**30:.2f} GiB, over the budget: not run")
            return False
        fits, peak, why = probe(b)
        probes.append({"batch_size": b, "fits": fits, "peak_gb": None if peak is None else round(peak / 2**30, 4),
                       "why": why})
        if fits and peak is not None:
            fitting[b] = peak
        log(f"  batch {b}: " + ("fits" if fits else f"does not fit ({why})")
            + ("" if peak is None or "peak" in why else f", peak {peak / 2**30:.3f} GiB"))
        return fits

    lo = hi = None
    b = max(1, start)
    if attempt(b):
        lo = b
        while b * 2 <= cap:
            b *= 2
            if attempt(b):
                lo = b
            else:
                hi = b
                break
    else:
        hi = b
        while b > 1:
            b //= 2
            if attempt(b):
                lo = b
                break
            hi = b
    if lo is None:
        return None, probes
    if hi is None:
        return lo, probes
    while hi - lo > max(1, lo // 8):
        mid = (lo + hi) // 2
        if attempt(mid):
            lo = mid
        else:
            hi = mid
    return lo, probes


def find_max_batch(settings: BenchSettings, precision: str, make_examples: Callable[[int], list], pm, log: Log,
                   workdir: str, *, own_process: bool = False) -> dict[str, Any]:
    """The max-batch search of one precision. `own_process`: this process exists only for the bench, so glibc may
    be told to return freed memory at once (see return_freed_memory_promptly); otherwise probes after a larger one
    can be charged for memory it left resident, which only makes the answer more cautious."""
    device = torch.device(settings.device)
    budget_gb = settings.memory_budget_gb or default_memory_budget(device)
    budget = budget_gb * 2**30

    def probe(batch_size: int) -> tuple[bool, float | None, str]:
        from spladectl.engine import is_out_of_memory

        examples = make_examples(batch_size * 2)
        release_memory(device)
        memory = PeakMemory(device)
        run, failure = None, None
        memory.start()
        try:
            run = _Run(settings, precision, batch_size, 2, examples, pm, log, workdir)
            run.step()
            run.step()  # the optimizer's state exists from the second step on
        except Exception as exc:
            # The engine's own recovery stops at micro-batch 1 with a SpladectlError that says so.
            if not (is_out_of_memory(exc) or (isinstance(exc, SpladectlError) and "out of memory" in str(exc))):
                memory.stop()
                if run is not None:
                    run.close()
                raise
            failure = "out of memory"
        peak = memory.stop()
        split = run.state.split_factor if run is not None else 1
        if run is not None:
            run.close()
        if failure:
            return False, peak, failure
        if split > 1:
            return False, peak, "out of memory (the engine split the micro-batch)"
        if peak > budget:
            return False, peak, f"peak {peak / 2**30:.3f} GiB over the {budget_gb:.3f} GiB budget"
        return True, peak, ""

    if device.type == "cpu" and own_process:
        return_freed_memory_promptly()
    log(f"  {precision}: largest batch within {budget_gb:.2f} GiB ({memory_kind(device)})")
    best, probes = search_max_batch(probe, settings.batch_size, budget, log=log)
    fit_peaks = [p["peak_gb"] for p in probes if p["fits"] and p["batch_size"] == best]
    return {"max_batch_size": best, "memory_budget_gb": round(budget_gb, 3),
            "max_batch_peak_gb": fit_peaks[-1] if fit_peaks else None, "max_batch_probes": probes}


# ------------------------------------------------------------------------------------------------ the bench

def bench_one(settings: BenchSettings, precision: str, *, log: Log = lambda _: None, pm=None,
              own_process: bool = False) -> dict[str, Any]:
    """The row of one (supported) precision: timed steps, FLOPs, matmul peak, and the max-batch search if asked.
    A precision that fails with a runtime error (an op without a kernel, out of memory) gives a "failed" row."""
    if pm is None:
        from spladectl.plugins import load_plugins

        pm = load_plugins()
    threads_before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _bench_one(settings, precision, log, pm, own_process)
    finally:
        torch.set_num_threads(threads_before)  # an in-process caller keeps its own setting


def _bench_one(settings: BenchSettings, precision: str, log: Log, pm, own_process: bool) -> dict[str, Any]:
    device = torch.device(settings.device)
    tokenizer = load_tokenizer(settings.model)
    pool: list = []

    def make_examples(n: int) -> list:
        if settings.data:
            if not pool:
                from spladectl.data import load_training_data

                pool.extend(load_training_data(settings.data, n_negatives=1, show_progress=False))
            return (pool * -(-n // len(pool)))[:max(n, len(pool))]
        if len(pool) < n:
            pool[:] = bench_examples(tokenizer, n, settings.max_doc_length, seed=settings.seed)
        return pool

    needed = settings.batch_size * (settings.warmup + settings.steps + 2)
    log(f"{precision}: batch {settings.batch_size}, {settings.warmup} warm-up + {settings.steps} timed steps on "
        f"{device}")
    with tempfile.TemporaryDirectory(prefix="spladectl-bench-") as workdir:
        try:
            row = bench_precision(settings, precision, make_examples(needed), pm, log, workdir, {})
            if settings.find_max_batch:
                row.update(find_max_batch(settings, precision, make_examples, pm, log, workdir,
                                          own_process=own_process))
        except SpladectlError:
            raise
        except (RuntimeError, NotImplementedError) as exc:  # one precision failing must not hide the others
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log(f"{precision}: failed: {detail}")
            row = {"precision": precision, "status": "failed", "reason": detail, "device": str(device),
                   "examples_per_s": None}
    return row


def run_bench(settings: BenchSettings, *, log: Log = lambda _: None, facts=None, isolate: bool = True,
              pm=None) -> list[dict[str, Any]]:
    """Every precision of `settings`: a row each (status "ok", "skipped" with a reason, or "failed").

    `isolate` (default) runs each precision in its own Python process, so its peak memory is its own: in one
    process, memory an earlier precision freed often stays resident (allocator caches, oneDNN scratchpads) and
    would be counted against the next. `facts`: the machine's HardwareFacts when the caller has them.
    """
    device = torch.device(settings.device)
    if facts is None and device.type in ("cpu", "mps") and "bf16-mixed" in settings.precisions:
        from spladectl.hardware import detect

        facts = detect()
    rows: list[dict[str, Any]] = []
    for precision in settings.precisions:
        reason = unsupported_reason(precision, device, facts)
        if reason:
            log(f"{precision}: skipped: {reason}")
            rows.append({"precision": precision, "status": "skipped", "reason": reason, "device": str(device),
                         "examples_per_s": None})
            continue
        if isolate:
            rows.append(_bench_in_child(settings, precision, log))
        else:
            rows.append(bench_one(settings, precision, log=log, pm=pm))
    reference = next((r for r in rows if r["precision"] == "32-true" and r["status"] == "ok"), None)
    for row in rows:
        if reference is not None and row["status"] == "ok":
            row["speedup"] = round(row["examples_per_s"] / reference["examples_per_s"], 3)
    return rows


_ROW_MARKER = "SPLADECTL-BENCH-ROW "


def _bench_in_child(settings: BenchSettings, precision: str, log: Log) -> dict[str, Any]:
    """bench_one in a fresh `python -m spladectl.bench` process; its stderr is relayed line by line to `log`."""
    import dataclasses
    import json
    import subprocess
    import threading

    request = json.dumps({"settings": dataclasses.asdict(settings), "precision": precision})
    child = subprocess.Popen([sys.executable, "-m", "spladectl.bench"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    tail: list[str] = []

    def relay() -> None:
        for line in child.stderr:
            line = line.rstrip("\n")
            if line.startswith("USDT:"):  # the profiler's start/stop markers
                continue
            tail[:] = (tail + [line])[-20:]
            log(line)

    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    try:
        child.stdin.write(request)
        child.stdin.close()
        out = child.stdout.read()  # stderr is the relay thread's alone (communicate() would read it too)
        child.wait()
    except BaseException:
        child.kill()
        child.wait()
        raise
    relay_thread.join(timeout=5)
    rows = [line[len(_ROW_MARKER):] for line in out.splitlines() if line.startswith(_ROW_MARKER)]
    if child.returncode == 0 and rows:
        return json.loads(rows[-1])
    errors = [line for line in tail if line.startswith("Error:")]
    if errors:  # a SpladectlError in the child (a bad model name, unreadable data): the user's to fix
        raise SpladectlError(errors[-1][len("Error:"):].strip())
    detail = tail[-1] if tail else f"exit status {child.returncode}"
    if child.returncode < 0:
        detail = f"killed by signal {-child.returncode} (out of memory?)"
    log(f"{precision}: failed: {detail}")
    return {"precision": precision, "status": "failed", "reason": detail, "device": settings.device,
            "examples_per_s": None}


def _child_main() -> int:
    import json

    request = json.loads(sys.stdin.read())
    settings = BenchSettings(**request["settings"])
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    try:
        row = bench_one(settings, request["precision"], log=log, own_process=True)
    except SpladectlError as exc:
        log(f"Error: {exc.format_message()}".splitlines()[0])
        return 2
    print(_ROW_MARKER + json.dumps(row, default=str), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ output

def _si(value: float | None, unit: str = "FLOP/s") -> str:
    if value is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def render_table(rows: list[dict[str, Any]], console) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    ok = [r for r in rows if r["status"] == "ok"]
    first = ok[0] if ok else rows[0]
    caption = None
    if ok:
        caption = (f"{first['model']}, batch {first['batch_size']}, query/doc ≤ {first['max_query_length']}/"
                   f"{first['max_doc_length']} tokens, {_threads(first['threads'])}, median of {first['steps']} steps "
                   f"after {first['warmup']} warm-up; {first['optimizer']}")
    table = Table(title=f"spladectl bench on {first['device']}", caption=caption, box=box.SIMPLE_HEAD)
    show_max = any("max_batch_size" in r for r in ok)
    columns = ["precision", "step (s)", "examples/s", "speed-up", f"peak {ok[0]['memory_kind'] if ok else 'memory'}",
               "GFLOP/step", "achieved", "of peak"] + (["max batch"] if show_max else [])
    for name in columns:
        table.add_column(name, justify="left" if name == "precision" else "right", no_wrap=True,
                         min_width=10 if name == "precision" else None)
    for r in rows:
        if r["status"] != "ok":
            table.add_row(r["precision"], r["status"], *[""] * (len(columns) - 2))
            continue
        cells = [r["precision"], f"{r['median_step_s']:.3f}", f"{r['examples_per_s']:.2f}",
                 "-" if r["speedup"] is None else f"{r['speedup']:.2f}×", f"{r['peak_memory_gb']:.2f} GiB",
                 f"{r['step_flops'] / 1e9:.0f}" + ("" if r["flops_source"] == "FlopCounterMode" else " (est.)"),
                 _si(r["achieved_flops_per_s"]), f"{100 * r['matmul_share']:.0f}%"]
        if show_max:
            best = r.get("max_batch_size")
            cells.append("-" if best is None else str(best))
        table.add_row(*cells)
    console.print(table)
    for r in rows:
        if r["status"] != "ok":
            console.print(Text(f"{r['precision']} {r['status']}: {r['reason']}"))
    if ok:
        peaks = ", ".join(f"{r['precision']} {_si(r['matmul_peak_flops_per_s'])}" for r in ok)
        console.print(f"of peak = achieved ÷ the matmul peak of this {first['device']} ({_threads(first['threads'])}): "
                      f"{peaks}")
        busy = [r for r in ok if r["device"] == "cpu" and r["cpu_utilisation"] < 0.75]
        if busy:
            worst = min(r["cpu_utilisation"] for r in busy)
            console.print(f"warning: the timed steps got as little as {100 * worst:.0f}% of the CPU time of their "
                          f"{_threads(first['threads'])}: other processes are using this machine, so the timings "
                          "are noisy")
        for r in ok:
            if "max_batch_size" in r:
                console.print(f"max batch ({r['precision']}): the largest batch whose step stayed within "
                              f"{r['memory_budget_gb']:.2f} GiB of {r['memory_kind']}, from "
                              f"{len(r['max_batch_probes'])} probes" + (" (none fitted)" if r["max_batch_size"] is None
                                                                        else ""))
        tok = first["tokenize_s"]
        where = ("in a prefetch thread, overlapping the step (dataloader workers 0)"
                 if first["tokenize_in"] == "prefetch thread" else "in dataloader workers")
        console.print(f"tokenizing one batch: {1e3 * tok:.1f} ms, {where}")
    for r in ok:
        if r.get("note"):
            console.print(f"{r['precision']}: {r['note']}")
        if r.get("top_ops"):
            top = Table(title=f"top ops of one {r['precision']} step (self time)", box=box.SIMPLE_HEAD)
            for name in ("op", "self ms", "share", "calls"):
                top.add_column(name, justify="left" if name == "op" else "right")
            for op in r["top_ops"]:
                top.add_row(Text(op["op"]), f"{op['self_ms']:.1f}", f"{100 * op['share']:.1f}%", str(op["calls"]))
            console.print(top)


def plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Bars of examples/s and peak memory per precision, written to `path` (PNG, SVG, PDF by suffix)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SpladectlError("--plot needs matplotlib", hint="pip install 'spladectl[bench]'") from exc
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        raise SpladectlError("--plot: no precision ran, nothing to plot")
    names = [r["precision"] for r in ok]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    bars = left.bar(names, [r["examples_per_s"] for r in ok], color="#4C72B0")
    left.bar_label(bars, labels=[f"{r['examples_per_s']:.1f}" + ("" if r["speedup"] is None else
                                                                   f"\n{r['speedup']:.2f}×") for r in ok])
    left.set_ylabel("examples/s")
    left.set_title("throughput")
    bars = right.bar(names, [r["peak_memory_gb"] for r in ok], color="#DD8452")
    right.bar_label(bars, labels=[f"{r['peak_memory_gb']:.2f}" for r in ok])
    right.set_ylabel(f"peak {ok[0]['memory_kind']} (GiB)")
    right.set_title("memory")
    for axis in (left, right):
        axis.margins(y=0.2)
    fig.suptitle(f"spladectl bench: {ok[0]['model']}, batch {ok[0]['batch_size']}, {ok[0]['device']}")
    fig.tight_layout()
    path = Path(path)
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise SpladectlError(f"--plot: cannot write {path} ({exc.strerror or exc})") from exc
    finally:
        plt.close(fig)
    return path


if __name__ == "__main__":  # the child process of run_bench(isolate=True)
    sys.exit(_child_main())
