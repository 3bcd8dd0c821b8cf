"""Dropout for training on CPU: cheaper than torch's, with the same distribution.

On CPU, torch draws dropout masks with `bernoulli_`, one random number per element, then multiplies twice; for a
2-layer encoder at 256 tokens that made dropout the largest element-wise cost of a training step, most of it on the
attention probabilities (B × heads × T × T), which also keep SDPA on its unfused math path. Here one 64-bit random
draw (numpy's SFC64, seeded from torch's generator) gives four 16-bit keys, each dropping its element with probability p rounded to a multiple of 1/65536, and the
mask and the 1/(1 - p) scale are applied in two passes, with a bool mask saved for backward.

Measured on 10.5 M elements (attention probabilities of 80 texts of 256 tokens, 2 heads), forward and backward,
2 threads, Xeon with AMX, 2026-12-03: float32 154 ms for `F.dropout` against 91 ms; bf16 117 ms against 83 ms. The
attention around it (forward and backward, with its mask): float32 0.63×, bf16 0.49× the time of SDPA's math path.

Only CPU training is affected: accelerators have fused dropout kernels, and evaluation has no dropout.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

ATTENTION = "spladectl_cpu_dropout"
_KEYS = 1 << 16  # 16-bit keys: p is rounded to a multiple of 1/65536


def keep_mask(shape: torch.Size, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool tensor of `shape`, each element False with probability round(p · 65536) / 65536.

    The bits come from numpy's SFC64 generator seeded by one draw from torch's default generator, so seeds and
    checkpointed RNG states govern the masks like any other draw. torch's CPU generator (mt19937, one thread) took
    4.6× as long for the same bits: 8.5 ms against 1.9 ms for the attention probabilities of 32 texts of 256 tokens
    (4.2 M keys), 2-core AMD EPYC (Zen 4), 2026-12-04. Whole training steps, alternating: 0.96–0.98× the time
    in float32, 0.996× in bf16.
    """
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    bits = torch.from_numpy(np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.int16)[:n])
    threshold = -(_KEYS // 2) + round(p * _KEYS)
    return (bits >= threshold).view(shape).to(device)


def apply_mask(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x where `keep` is True, 0 elsewhere. A product with the mask's bytes read as uint8: on CPU it ran 2.5–3.5×
    faster than `masked_fill` or `where` with the bool mask (4 M elements, bf16 and float32, Xeon with AMX)."""
    return x * keep.view(torch.uint8)


class _MaskAndScale(torch.autograd.Function):
    """x with the dropped elements zeroed, times 1/(1 - p): two passes, and a bool mask saved for backward (torch's
    dropout saves a mask in x's dtype)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return apply_mask(x, keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return apply_mask(grad, keep).mul_(ctx.scale), None, None


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`torch.nn.functional.dropout(x, p, training)`, cheaper on CPU (elsewhere it is that function)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return nn.functional.dropout(x, p, training)
    return _MaskAndScale.apply(x, keep_mask(x.shape, p, x.device), 1.0 / (1.0 - p))


class CpuDropout(nn.Dropout):
    """nn.Dropout that uses `fast_dropout`; swapped in for the model's own dropout layers while it trains on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return fast_dropout(x, self.p, self.training)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, but with `keep_mask`'s dropout on the attention probabilities while training on
    CPU (its 1/(1 - p) applied to their product with the values).

    Without dropout (evaluation, p = 0) or off CPU it is SDPA itself; with dropout SDPA runs its unfused math path
    on CPU anyway, which this repeats with the cheaper mask. Cases this does not write out (grouped key/value heads,
    causal or position-biased attention) also go to SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (dropout == 0.0 or dropout >= 1.0 or query.device.type != "cpu" or key.shape[1] != query.shape[1]
             or kwargs.get("position_bias") is not None or kwargs.get("is_causal")
             or getattr(module, "is_causal", False))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # Both scales act on the (B, heads, T, head size) operands, not on the T × T scores and probabilities: the query
    # before its product, the dropout's 1/(1 - p) after the product with the values. Each saves a pass over B·heads·T²
    # elements forward and backward (a quarter of the element-wise attention work at T = 256, head size 64).
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query * scale, key.transpose(-1, -2))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            # In place: the product's backward needs its operands, not its result.
            scores.masked_fill_(attention_mask.logical_not(), torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = apply_mask(torch.softmax(scores, dim=-1), keep_mask(scores.shape, dropout, scores.device))
    output = torch.matmul(probs.to(value.dtype), value) * (1.0 / (1.0 - dropout))
    return output.transpose(1, 2).contiguous(), None


def use_cpu_dropout(model: nn.Module) -> bool:
    """Give a transformers model `fast_dropout` in its dropout layers and, where it uses SDPA, in its attention.
    Returns whether the attention could be switched. Checkpoints are unaffected: dropout layers hold no weights, and
    transformers does not write the attention implementation into config.json."""
    for layer in model.modules():
        if type(layer) is nn.Dropout:
            layer.__class__ = CpuDropout
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)
    return True
