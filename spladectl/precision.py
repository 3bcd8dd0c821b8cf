"""Precision names, following Lightning: `32-true`, `16-mixed`, `bf16-mixed`."""

from __future__ import annotations

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
