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


class MatmulPeak:
    """The FLOP/s of a square matmul on `device` in the precision's compute dtype (operands already in that dtype,
    under the same autocast as training), sampled as often as asked.

    A bench samples it after every timed step, so that each step is compared with what the device could do at that
    moment: on a shared machine the same product ran anywhere from 117 to 181 GFLOP/s over one session (2-core AMD
    EPYC, 2026-12-04), and a peak measured once, after all the steps, moved "of peak" by as much. The operands live
    only during a sample, so the steps' peak memory does not include them."""

    def __init__(self, device: torch.device, precision: str, *, size: int | None = None):
        self.device = device
        self.dtype = autocast_dtype(precision) or torch.float32
        self.autocast = precision != "32-true"
        self.size = size or (8192 if device.type == "cuda" else 1536)

    def sample(self, repeats: int = 2) -> float:
        """FLOP/s of the best of `repeats` timed products, after an untimed one (which picks kernels and warms
        caches): a peak is what the device can do."""
        a = torch.randn(self.size, self.size, device=self.device).to(self.dtype)
        b = torch.randn(self.size, self.size, device=self.device).to(self.dtype)
        context = torch.autocast(self.device.type, dtype=self.dtype) if self.autocast else contextlib.nullcontext()
        times = []
        with torch.no_grad(), context:
            for i in range(repeats + 1):
                synchronize(self.device)
                started = time.perf_counter()
                (a @ b)
                synchronize(self.device)
                if i >= 1:
                    times.append(time.perf_counter() - started)
        return 2 * self.size**3 / min(times)
