"""The largest batch whose step fits a memory budget."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from spladectl.bench.device import (
    PeakMemory,
    default_memory_budget,
    memory_kind,
    release_memory,
    return_freed_memory_promptly,
)
from spladectl.bench.settings import BenchSettings, Log
from spladectl.bench.step import _Run
from spladectl.errors import SpladectlError

# A probe predicted (by linear extrapolation) to exceed the budget by this factor is not run.
_PREDICTION_MARGIN = 1.25
_MAX_BATCH_CAP = 1 << 16


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
