"""Precision names, following Lightning: `32-true`, `16-mixed`, `bf16-mixed`."""

from __future__ import annotations

import functools

from spladectl.errors import SpladectlError

PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")

_ALIASES = {
    "32-true": "32-true", "32": "32-true", "fp32": "32-true", "float32": "32-true", "no": "32-true",
    "16-mixed": "16-mixed", "16": "16-mixed", "fp16": "16-mixed", "float16": "16-mixed", "half": "16-mixed",
    "bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed", "bfloat16": "bf16-mixed",
}


def canonical_precision(name: str, *, where: str = "precision") -> str:
    """Map a precision name or alias to its canonical name; an unknown name is a user error naming `where`."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise SpladectlError(
            f"{where}: unknown precision {name!r}; expected one of {', '.join(PRECISIONS)} "
            "(aliases: fp32/no, fp16, bf16)"
        )
    return _ALIASES[key]


def autocast_dtype(precision: str):
    """The dtype autocast runs in for a canonical precision, or None for 32-true."""
    import torch

    return {"32-true": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}[precision]


@functools.cache
def has_native_matmul(device_type: str, dtype) -> bool:
    """Whether this device multiplies `dtype` matrices in hardware. Only CPUs lack it: PyTorch then falls back to a
    scalar kernel for bf16/fp16 GEMMs (measured 60× slower than fp32 on an AVX2-only EPYC)."""
    import torch

    if device_type != "cpu" or dtype is None or dtype == torch.float32:
        return True
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError, TypeError):
        return True  # cannot tell: leave PyTorch's own kernels in charge


def low_precision_matmuls(device_type: str, dtype):
    """A context for the forward and backward of a mixed-precision step.

    Where the device has no native `dtype` GEMM (see has_native_matmul), matrix products of `dtype` operands run as
    float32 products of the same, already rounded, operands and are rounded back to `dtype`: the numbers a native
    bf16/fp16 GEMM with float32 accumulation gives, at float32 speed. Elsewhere (and for 32-true) it does nothing.
    SPLADECTL_EMULATE_LOW_PRECISION=0 turns it off, =1 forces it on (to compare both on one machine).
    """
    import os
    from contextlib import nullcontext

    forced = os.environ.get("SPLADECTL_EMULATE_LOW_PRECISION", "").strip()
    if dtype is None or forced == "0" or (forced != "1" and has_native_matmul(device_type, dtype)):
        return nullcontext()
    return _float32_matmul_mode()(dtype)


@functools.cache  # one class, built on first use, so that importing this module stays torch-free
def _float32_matmul_mode():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    matmuls = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}

    class Float32Matmuls(TorchDispatchMode):
        def __init__(self, dtype):
            super().__init__()
            self.dtype = dtype

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in matmuls and any(isinstance(a, torch.Tensor) and a.dtype == self.dtype for a in args):
                wide = [a.float() if isinstance(a, torch.Tensor) and a.dtype == self.dtype else a for a in args]
                return func(*wide, **kwargs).to(self.dtype)
            return func(*args, **kwargs)

    return Float32Matmuls


def set_tf32(device_type: str, enabled: bool) -> None:
    """TF32 for float32 matmuls and convolutions on a CUDA device (the profiles' `tf32`). Other devices have no TF32
    mode, and their runs leave the process-wide flags as they were."""
    if device_type != "cuda":
        return
    import torch

    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
