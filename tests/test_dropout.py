"""CPU dropout (spladectl.dropout): the distribution of torch's dropout, and the attention it feeds equal to
transformers' SDPA attention with the same mask, in value and gradient."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spladectl import dropout
from spladectl.model import SpladeEncoder


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_masks_drop_with_probability_p_independently(p):
    torch.manual_seed(0)
    keep = dropout.keep_mask(torch.Size([1000, 1000]), p)
    n = keep.numel()
    dropped = 1 - keep.float().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)
    # Neighbours come from the same 64-bit draw: their keys must still be independent.
    pairs = keep.view(-1, 4).float()
    both = (pairs[:, 0] * pairs[:, 1]).mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 / (n / 4))


def test_masks_follow_the_seed():
    torch.manual_seed(3)
    a = dropout.keep_mask(torch.Size([64, 33]), 0.1)
    torch.manual_seed(3)
    b = dropout.keep_mask(torch.Size([64, 33]), 0.1)
    torch.manual_seed(4)
    c = dropout.keep_mask(torch.Size([64, 33]), 0.1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Each mask draws its seed from torch's generator, so consecutive masks differ and resuming its state resumes them.
    state = torch.get_rng_state()
    d, e = dropout.keep_mask(torch.Size([64, 33]), 0.1), dropout.keep_mask(torch.Size([64, 33]), 0.1)
    torch.set_rng_state(state)
    assert not torch.equal(d, e) and torch.equal(dropout.keep_mask(torch.Size([64, 33]), 0.1), d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_zeroes_and_scales_like_torch(dtype):
    x = torch.randn(200, 300, dtype=dtype, requires_grad=True)
    torch.manual_seed(7)
    out = dropout.fast_dropout(x, 0.2)
    torch.manual_seed(7)
    keep = dropout.keep_mask(x.shape, 0.2)
    expected = torch.where(keep, x.detach() * (1 / 0.8), torch.zeros((), dtype=dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.detach(), expected)
    upstream = torch.randn_like(x)
    (grad,) = torch.autograd.grad((out * upstream).sum(), x)
    torch.testing.assert_close(grad, torch.where(keep, upstream * (1 / 0.8), torch.zeros((), dtype=dtype)))
    assert dropout.fast_dropout(x, 0.2, training=False) is x
    assert dropout.fast_dropout(x, 0.0) is x


def _qkv(seed=0, heads=2, length=9, dim=8, batch=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, dim, generator=g, requires_grad=True) for _ in range(3)]


def _reference_attention(q, k, v, mask, keep, p):
    """Attention written out with an explicit dropout mask: softmax(q kᵀ/√d, masked) · keep/(1-p) · v."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, -1) * keep / (1 - p)
    return (probs @ v).transpose(1, 2)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_attention_with_dropout_equals_the_written_out_formula(mask_kind):
    q, k, v = _qkv()
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 6:] = False  # a padded text
    given = mask if mask_kind == "bool" else torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    module = nn.Module()
    torch.manual_seed(11)
    out, weights = dropout.attention(module, q, k, v, given, dropout=0.25)
    torch.manual_seed(11)
    keep = dropout.keep_mask(torch.Size([3, 2, 9, 9]), 0.25)
    ref = _reference_attention(q, k, v, mask, keep, 0.25)
    assert weights is None and out.shape == (3, 9, 2, 8)
    torch.testing.assert_close(out, ref)
    upstream = torch.randn_like(ref)
    grads = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (q, k, v))
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad)


def test_attention_without_dropout_is_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv(seed=1)
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., 4:] = False
    module = nn.Module()
    ours, _ = dropout.attention(module, q, k, v, mask, dropout=0.0)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0)
    assert torch.equal(ours, theirs)


@pytest.fixture(scope="module")
def texts():
    return ["sparse retrieval with learned term weights", "a short one", "bm25 ranks documents by term statistics"]


def test_splade_tiny_trains_with_it_and_evaluates_as_before(texts):
    # transformers' BERT, as any model spladectl.bert does not implement runs (tests/test_bert.py has spladectl's).
    plain = SpladeEncoder.from_pretrained("splade-tiny", native=False)
    switched = SpladeEncoder.from_pretrained("splade-tiny", native=False)
    assert switched.use_cpu_dropout()
    assert switched.model.config._attn_implementation == dropout.ATTENTION
    layers = [m for m in switched.model.modules() if isinstance(m, nn.Dropout)]
    assert layers and all(isinstance(m, dropout.CpuDropout) for m in layers)
    batch = plain.tokenize(texts, 32)
    plain.eval(), switched.eval()
    with torch.no_grad():
        assert torch.equal(switched(**batch), plain(**batch))  # evaluation: no dropout, SDPA itself
    switched.train()
    torch.manual_seed(0)
    first = switched(**batch)
    torch.manual_seed(0)
    again = switched(**batch)
    torch.manual_seed(1)
    other = switched(**batch)
    assert torch.equal(first, again) and not torch.equal(first, other)  # masks come from the seeded generator
    first.sum().backward()
    grads = [p.grad for p in switched.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_checkpoints_keep_the_plain_attention(tmp_path):
    encoder = SpladeEncoder.from_pretrained("splade-tiny", native=False)
    encoder.use_cpu_dropout()
    encoder.save_pretrained(tmp_path)
    assert dropout.ATTENTION not in (tmp_path / "config.json").read_text()
    reloaded = SpladeEncoder.from_pretrained(str(tmp_path), native=False)
    assert reloaded.model.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, dropout.CpuDropout) for m in reloaded.model.modules())
