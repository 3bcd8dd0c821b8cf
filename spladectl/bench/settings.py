"""What a bench measures: its settings, the precisions asked for, and the examples it steps on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spladectl.errors import SpladectlError
from spladectl.precision import PRECISIONS, autocast_dtype, canonical_precision

DEMO_TRAIN = Path(__file__).resolve().parent.parent / "demo" / "train.jsonl"
DEFAULT_PRECISIONS = ",".join(PRECISIONS[i] for i in (0, 2, 1))  # 32-true,bf16-mixed,16-mixed
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
    memory_efficient: bool = False  # as `train --memory-efficient`: checkpointing and gradient caching
    compile: bool = False  # torch.compile the encoder, as `train --compile`
    dataloader_workers: int = 0
    find_max_batch: bool = False
    memory_budget_gb: float | None = None  # None: default_memory_budget(device)
    top_ops: int = 0  # profile one extra step and keep its N most expensive ops
    profile_step: bool = False  # profile one extra step and split its time by phase and op kind
    data: str | None = None  # None: synthetic examples from the demo
    profile: str = "cpu"
    seed: int = 42
    threads: int | None = None  # torch CPU threads; None: torch's default


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
