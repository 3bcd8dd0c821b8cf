"""Low-precision matmuls on CPUs without native bf16/fp16 GEMMs: float32 products of the rounded operands.

The mode is forced on with SPLADECTL_EMULATE_LOW_PRECISION=1 so these tests run the same on CPUs with and without
native bf16; the reference is PyTorch's own bf16/fp16 kernel, whatever this CPU has.
"""

from __future__ import annotations

import json

import pytest
import torch

from spladectl.engine import Trainer
from spladectl.plugin_loading import load_plugins
from spladectl.precision import has_native_matmul, low_precision_matmuls

from tiny import config, examples


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_matmuls_match_the_native_kernel_within_one_rounding(monkeypatch, dtype):
    monkeypatch.setenv("SPLADECTL_EMULATE_LOW_PRECISION", "1")
    torch.manual_seed(0)
    a = torch.randn(24, 48, requires_grad=True)
    b = torch.randn(40, 48, requires_grad=True)
    bias = torch.randn(40)

    def run():
        with torch.autocast("cpu", dtype=dtype):
            outs = torch.nn.functional.linear(a, b, bias), a @ a.T, torch.bmm(a[None], b[None].transpose(1, 2))
        sum(o.float().square().sum() for o in outs).backward()
        grads = a.grad.clone(), b.grad.clone()
        a.grad = b.grad = None
        return outs, grads

    native, native_grads = run()
    with low_precision_matmuls("cpu", dtype):
        emulated, emulated_grads = run()
    for e, n in zip(emulated, native):  # addmm, mm, bmm
        assert e.dtype == n.dtype == dtype
        # Both round float32 accumulations of the same rounded operands: they differ by accumulation order at most.
        ulp = torch.finfo(dtype).eps * n.float().abs().clamp_min(1.0)
        assert ((e.float() - n.float()).abs() <= 2 * ulp).all()
    # And it is what the mode promises, exactly: the float32 product of the rounded operands, rounded.
    rounded = a.detach().to(dtype).float()
    assert torch.equal(emulated[1], (rounded @ rounded.T).to(dtype))
    for e, n in zip(emulated_grads, native_grads):
        torch.testing.assert_close(e, n, rtol=0.05, atol=0.02 * n.abs().max().item())


def test_off_for_float32_and_by_environment(monkeypatch):
    from contextlib import nullcontext

    assert isinstance(low_precision_matmuls("cpu", None), nullcontext)
    monkeypatch.setenv("SPLADECTL_EMULATE_LOW_PRECISION", "0")
    assert isinstance(low_precision_matmuls("cpu", torch.bfloat16), nullcontext)
    assert has_native_matmul("cuda", torch.bfloat16)  # only CPUs are ever emulated


def test_bf16_training_steps_agree_with_and_without_emulation(tmp_path, monkeypatch):
    losses = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("SPLADECTL_EMULATE_LOW_PRECISION", flag)
        out = tmp_path / flag
        Trainer(config(out, precision="bf16-mixed"), examples(), pm=load_plugins(), progress=False).fit()
        rows = [json.loads(line) for line in (out / "out" / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [r["loss"] for r in rows]
    # Same rounding points, different accumulation order: equal to bf16's precision, not bit for bit.
    assert losses["0"] == pytest.approx(losses["1"], rel=0.02)
