"""Memory in the metrics: the current RSS every step (cheap, for the progress bar) and, with --memory-tracking
(config `memory_tracking = true`), the peaks of each optimizer step and an end-of-run summary.

The peaks come from a light sampler thread started and stopped around the step by a `train_step` wrapper:
process RSS (psutil, plus ru_maxrss), the CUDA allocator's peaks and the GPU's used memory through NVML on cuda,
and MPS allocated memory on mps. See spladectl/memory.py.

In a distributed run every process measures its own (its RSS, its GPU) and rank 0 collects them after each step:
`mem_*_gb` is then the highest of the ranks, `mem_*_gb_by_rank` lists each rank's, and the summary names the rank.
"""

from __future__ import annotations

from typing import Any, Callable

import psutil

from spladectl import memory
from spladectl.hookspecs import hookimpl

_process = psutil.Process()

LABELS = {  # at most 28 characters: the train command aligns the summary's values after them
    "mem_rss_peak": "peak RSS in a step",
    "mem_rss_max": "RSS high-water (ru_maxrss)",
    "mem_cuda_allocated_peak": "peak CUDA allocated",
    "mem_cuda_reserved_peak": "peak CUDA reserved",
    "mem_gpu_used_peak": "peak GPU used (NVML)",
    "mem_mps_allocated_peak": "peak MPS allocated",
    "mem_mps_driver_peak": "peak MPS driver memory",
}


class MemoryTracker:
    """Per-step memory peaks; `probes_for(device)` -> (probes, notes) is replaceable so tests can inject fake GPUs."""

    def __init__(self, probes_for: Callable[[Any], tuple[list[Any], list[str]]] = memory.probes_for,
                 interval: float = 0.005):
        self.probes_for = probes_for
        self.interval = interval
        self._reset()

    def _reset(self) -> None:
        self.sampler: memory.StepSampler | None = None
        self.notes: list[str] = []
        self.peaks: dict[str, tuple[float, int, int]] = {}  # metric -> (GiB, step, rank) of the run's highest peak
        self.rank_peaks: dict[str, list[float | None]] = {}  # metric -> each rank's highest peak (distributed runs)

    def _start_run(self, state) -> None:
        self._close()
        self._reset()
        probes, self.notes = self.probes_for(state.device)
        self.sampler = memory.StepSampler(probes, interval=self.interval)

    @hookimpl(wrapper=True)
    def train(self, state):
        if state.config.memory_tracking:
            self._start_run(state)
        try:
            result = yield
        finally:
            self._close()
        result.setdefault("summary", []).extend(self.summary(state))
        return result

    @hookimpl(wrapper=True)
    def train_step(self, state):
        if not state.config.memory_tracking:
            return self._with_rss((yield))
        if self.sampler is None:
            self._start_run(state)
        self.sampler.start()
        try:
            metrics = yield
        finally:
            peaks = self.sampler.stop()
        # Rounded once, here: the summary shows exactly what metrics.jsonl holds.
        mine = {key: round(memory.gib(value), 4) for key, value in peaks.items()}
        by_rank = state.all_gather_object(mine) if getattr(state, "world_size", 1) > 1 else [mine]
        for key in sorted({key for ranks in by_rank for key in ranks}):
            values = [ranks.get(key) for ranks in by_rank]
            gb, rank = max((v, r) for r, v in enumerate(values) if v is not None)
            metrics[f"{key}_gb"] = gb
            if len(by_rank) > 1:
                metrics[f"{key}_gb_by_rank"] = values
                highest = self.rank_peaks.setdefault(key, [None] * len(values))
                self.rank_peaks[key] = [v if h is None or (v is not None and v > h) else h
                                        for v, h in zip(values, highest)]
            if key not in self.peaks or gb > self.peaks[key][0]:
                self.peaks[key] = (gb, state.step, rank)
        return self._with_rss(metrics)

    @staticmethod
    def _with_rss(metrics):
        metrics["memory_gb"] = _process.memory_info().rss / 2**30
        return metrics

    def summary(self, state) -> list[tuple[str, str]]:
        """(label, value) rows of the run's memory peaks for the end-of-training summary."""
        if not state.config.memory_tracking or not self.peaks:
            return []
        rows = []
        for key, (value, step, rank) in sorted(self.peaks.items(), key=lambda kv: list(LABELS).index(kv[0])
                                               if kv[0] in LABELS else len(LABELS)):
            if key in self.rank_peaks:
                ranks = ", ".join("-" if v is None else f"{v:.3f}" for v in self.rank_peaks[key])
                rows.append((LABELS.get(key, key), f"{value:.3f} GiB (step {step}, rank {rank}); by rank {ranks}"))
            else:
                rows.append((LABELS.get(key, key), f"{value:.3f} GiB (step {step})"))
        rows += [("memory note", note) for note in self.notes]
        if self.sampler is not None:
            rows += [("memory probe failed", error) for error in self.sampler.errors]
        return rows

    def _close(self) -> None:
        if self.sampler is not None:
            for probe in self.sampler.probes:
                close = getattr(probe, "close", None)
                if close is not None:
                    close()


def plugin(manager) -> MemoryTracker:
    """Each plugin manager gets its own tracker (it keeps the run's peaks)."""
    return MemoryTracker()
