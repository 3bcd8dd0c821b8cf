"""Device facts a bench needs: synchronising, freeing and measuring memory, and the matmul peak."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
import time

import torch

from spladectl.precision import autocast_dtype


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
