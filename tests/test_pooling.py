"""Max-first pooling and the memory-efficient head equal the naive SPLADE formula, in value and gradient."""

from __future__ import annotations

import pytest
import torch

from spladectl.pooling import efficient_splade_pool, naive_splade_pool, splade_max_pool

B, T, H, V = 4, 12, 16, 300


def _mask(kind: str) -> torch.Tensor:
    mask = torch.ones(B, T, dtype=torch.long)
    if kind == "right":
        mask[1, 7:] = 0
        mask[2, 1:] = 0  # a one-token text
    elif kind == "left":
        mask[0, :5] = 0
        mask[3, :2] = 0
    elif kind == "empty-row":
        mask[1, :] = 0
    return mask


def _inputs(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype, requires_grad=True)
    # Scaled so that about half the maxima are positive: both branches of the ReLU are exercised.
    weight = (torch.randn(V, H, generator=g, dtype=dtype) * 0.3).requires_grad_()
    bias = (torch.randn(V, generator=g, dtype=dtype) - 1.0).requires_grad_()
    upstream = torch.rand(B, V, generator=g, dtype=dtype)  # a generic downstream loss: sum(upstream * reps)
    return hidden, weight, bias, upstream


def _value_and_grads(fn, tensors, upstream):
    out = fn(*tensors)
    grads = torch.autograd.grad((out * upstream).sum(), tensors)
    return out.detach(), grads


def _assert_close(actual, expected, rtol=1e-5, floor=1e-12):
    # Relative to the tensor's scale: gradients sum in a different order, so individual tiny entries may differ more.
    # `floor`: the scale below which a tensor is round-off around an exact zero (e.g. attention key biases).
    scale = expected.abs().max().clamp_min(floor)
    assert (actual - expected).abs().max() <= rtol * scale, (actual - expected).abs().max() / scale


@pytest.mark.parametrize("kind", ["none", "right", "left", "empty-row"])
def test_max_first_pooling_equals_naive(kind):
    mask = _mask(kind)
    logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(1), requires_grad=True)
    upstream = torch.rand(B, V)
    ref, (ref_grad,) = _value_and_grads(lambda x: naive_splade_pool(x, mask), [logits], upstream)
    out, (grad,) = _value_and_grads(lambda x: splade_max_pool(x, mask), [logits], upstream)
    assert out.dtype == torch.float32
    _assert_close(out, ref)
    _assert_close(grad, ref_grad)
    if kind == "empty-row":
        assert out[1].abs().sum() == 0


@pytest.mark.parametrize("kind", ["none", "right", "left", "empty-row"])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_efficient_head_equals_naive(kind, chunk_size):
    mask = _mask(kind)
    hidden, weight, bias, upstream = _inputs()

    def naive(h, w, b):
        return naive_splade_pool(h @ w.T + b, mask)

    def efficient(h, w, b):
        return efficient_splade_pool(h, w, b, mask, chunk_size=chunk_size)

    ref, ref_grads = _value_and_grads(naive, [hidden, weight, bias], upstream)
    out, grads = _value_and_grads(efficient, [hidden, weight, bias], upstream)
    assert 0 < (ref > 0).float().mean() < 1  # the test exercises active and inactive terms
    _assert_close(out, ref)
    for grad, ref_grad in zip(grads, ref_grads):
        _assert_close(grad, ref_grad)


@pytest.mark.parametrize("kind", ["none", "right", "left", "empty-row", "uneven"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocabulary_tiles_and_token_chunks_find_the_same_maxima(kind, dtype):
    # The CPU tiles the vocabulary over texts grouped by length (padded with copies of their own first token), and
    # accelerators chunk the packed tokens; both strategies run here on the CPU, against the masked max of the full
    # logits. A CPU block of 3 rows puts each text longer than that alone, in blocks of rows; a block of 8 groups
    # texts of unequal length; in bf16 each group is padded to 32 rows.
    from spladectl.pooling import _length_groups, _max_by_token_chunk, _max_by_vocabulary_tile

    mask = _uneven_mask() if kind == "uneven" else _mask(kind)
    hidden, weight, _, _ = (t.detach().to(dtype) for t in _inputs())
    logits = (hidden.float() @ weight.float().T).masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
    expected = logits.max(1).values
    packed = hidden.reshape(B * T, H)[mask.reshape(-1).bool()]
    lengths = mask.sum(1).tolist()
    starts = [0, *mask.sum(1).cumsum(0).tolist()]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    pad_to = 1 if dtype == torch.float32 else 32
    for fill, size, block in [("tile", 7, 3), ("tile", 2048, 3), ("tile", 7, 8), ("tile", 2048, 512),
                              ("chunk", 5, None), ("chunk", 512, None)]:
        if fill == "tile":
            groups = _length_groups(lengths, starts, block, pad_to=pad_to)
            assert sorted(groups.order) == [b for b in range(B) if lengths[b]]
            best = _max_by_vocabulary_tile(packed.index_select(0, groups.rows), weight, groups, size)
        else:
            best = torch.full((B, V), float("-inf"), dtype=dtype)
            _max_by_token_chunk(packed, weight, starts, best, size)
        assert torch.equal(best.isneginf(), expected.isneginf())  # only a text without tokens has no max
        real = ~expected.isneginf()
        _assert_close(best.float()[real], expected[real], rtol=tol)


def _uneven_mask() -> torch.Tensor:
    # Lengths 12, 5, 3, 9: groups of a block of 8 rows mix texts of different lengths.
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate((12, 5, 3, 9)):
        mask[b, :n] = 1
    return mask


@pytest.mark.parametrize("kind", ["none", "right", "left", "empty-row", "uneven"])
@pytest.mark.parametrize("block", [3, 8, 512])
@pytest.mark.parametrize("bias_columns", [2, 32])
def test_bf16_positive_max_on_int16_keys_equals_the_float_max(kind, block, bias_columns):
    # The bf16 CPU path compares bit patterns as int16 against a floor of +0.0; the reference takes the float max of
    # the same bf16 logits (bias included, as the path computes them) and clamps it at zero.
    from spladectl import pooling

    mask = _uneven_mask() if kind == "uneven" else _mask(kind)
    hidden, weight, bias, _ = (t.detach().to(torch.bfloat16) for t in _inputs(seed=4))
    packed = hidden.reshape(B * T, H)[mask.reshape(-1).bool()]
    lengths = mask.sum(1).tolist()
    starts = [0, *mask.sum(1).cumsum(0).tolist()]
    logits = torch.nn.functional.linear(packed, weight, bias).float()
    expected = torch.zeros(B, V)
    for b in range(B):
        if starts[b + 1] > starts[b]:
            expected[b] = logits[starts[b] : starts[b + 1]].max(0).values.clamp_min(0)
    assert 0.05 < (expected > 0).float().mean() < 0.95  # positive and negative maxima both occur
    groups = pooling._length_groups(lengths, starts, block, pad_to=32)
    best = pooling._positive_max_bf16(packed.index_select(0, groups.rows), weight, bias, groups, 7, bias_columns)
    assert best.dtype == torch.bfloat16
    assert torch.equal(best.float(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_head_layouts_agree_in_value_and_gradient(dtype, monkeypatch):
    # AMX and other CPUs size the head's products differently (token blocks, vocabulary tiles, bf16 bias columns);
    # which layout runs depends on the machine, so both run here. Texts longer than either block and a vocabulary of
    # several tiles make the two layouts group and tile differently.
    from spladectl import pooling

    g = torch.Generator().manual_seed(8)
    lengths, hidden_size, vocab = (1100, 700, 40, 513, 3), 16, 9000
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    hidden = torch.randn(len(lengths), max(lengths), hidden_size, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.3).requires_grad_()
    bias = (torch.randn(vocab, generator=g) - 2.5).requires_grad_()
    upstream = torch.rand(len(lengths), vocab, generator=g)
    ref, ref_grads = _value_and_grads(lambda h, w, b: naive_splade_pool(h @ w.T + b, mask), [hidden, weight, bias],
                                      upstream)
    assert 0.05 < (ref > 0).float().mean() < 0.95
    results = []
    for amx in (True, False):
        monkeypatch.setattr(pooling, "has_amx_tiles", lambda amx=amx: amx)
        layout = pooling.cpu_head_layout(dtype)
        assert layout.block < max(lengths) and layout.tile < vocab
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            results.append(_value_and_grads(lambda h, w, b: efficient_splade_pool(h, w, b, mask),
                                            [hidden, weight, bias], upstream))
    (amx, amx_grads), (vector, vector_grads) = results
    if dtype == torch.float32:
        for out, grads in results:
            _assert_close(out, ref)
            for grad, ref_grad in zip(grads, ref_grads):
                _assert_close(grad, ref_grad)
        return
    # The same bf16 products summed in fp32 (here: bit for bit; another kernel may sum in another order, at most one
    # bf16 rounding apart), and both near the float32 formula.
    _assert_close(vector, amx, rtol=2**-8)
    _assert_close(vector, ref, rtol=3e-2)
    assert (vector > 0).ne(amx > 0).float().mean() < 1e-3
    for a, v, r in zip(amx_grads, vector_grads, ref_grads):
        _assert_close(v, a, rtol=2e-2)
        assert torch.nn.functional.cosine_similarity(v.flatten(), r.flatten(), dim=0) > 0.99


def test_cpu_head_layout_follows_the_cpu(monkeypatch):
    # No machine here has both kinds of CPU: the AMX probe is replaced.
    from spladectl import pooling

    monkeypatch.setattr(pooling, "has_amx_tiles", lambda: True)
    assert pooling.cpu_head_layout(torch.float32) == pooling.AMX_FLOAT32
    assert pooling.cpu_head_layout(torch.bfloat16) == pooling.AMX_LOW_PRECISION
    assert pooling.cpu_head_layout(torch.float16) == pooling.AMX_LOW_PRECISION
    monkeypatch.setattr(pooling, "has_amx_tiles", lambda: False)
    assert pooling.cpu_head_layout(torch.float32) == pooling.VECTOR_FLOAT32
    assert pooling.cpu_head_layout(torch.bfloat16) == pooling.VECTOR_LOW_PRECISION


def test_bf16_head_lets_a_nan_through():
    # x86's default NaN has its sign bit set: as an int16 key it would lose to zero and vanish. The head checks its
    # inputs and takes the float path, where the NaN reaches the loss and --on-nan sees it.
    hidden, weight, bias, _ = (t.detach() for t in _inputs(seed=5))
    hidden[2, 3, 0] = float("nan")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = efficient_splade_pool(hidden, weight, bias, _mask("none"))
    assert out[2].isnan().all()
    assert torch.isfinite(out[[0, 1, 3]]).all()


def test_efficient_head_gradcheck_fp64():
    hidden, weight, bias, _ = _inputs(seed=3, dtype=torch.float64)
    mask = _mask("right")
    small = (hidden[:, :6, :4].detach().requires_grad_(), weight[:20, :4].detach().requires_grad_(),
             bias[:20].detach().requires_grad_())
    mask = mask[:, :6]
    assert torch.autograd.gradcheck(lambda h, w, b: efficient_splade_pool(h, w, b, mask, chunk_size=4), small)


def test_efficient_head_without_bias_and_frozen_weight():
    hidden, weight, _, upstream = _inputs()
    mask = _mask("right")
    frozen = weight.detach()
    ref, (ref_grad,) = _value_and_grads(lambda h: naive_splade_pool(h @ frozen.T, mask), [hidden], upstream)
    out, (grad,) = _value_and_grads(lambda h: efficient_splade_pool(h, frozen, None, mask), [hidden], upstream)
    _assert_close(out, ref)
    _assert_close(grad, ref_grad)


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_close_to_fp32(device, dtype):
    mask = _mask("right").to(device)
    hidden, weight, bias, upstream = (t.detach().to(device).requires_grad_(t.requires_grad) for t in _inputs())
    ref, ref_grads = _value_and_grads(
        lambda h, w, b: naive_splade_pool(h @ w.T + b, mask), [hidden, weight, bias], upstream
    )
    with torch.autocast(device, dtype=dtype):
        out, grads = _value_and_grads(
            lambda h, w, b: efficient_splade_pool(h, w, b, mask), [hidden, weight, bias], upstream
        )
        plain = splade_max_pool(torch.nn.functional.linear(hidden, weight, bias), mask)
    assert out.dtype == plain.dtype == torch.float32  # the loss runs in fp32
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    _assert_close(out, ref, rtol=tol)
    _assert_close(plain, ref, rtol=tol)
    for grad, ref_grad, param in zip(grads, ref_grads, (hidden, weight, bias)):
        assert grad.dtype == param.dtype  # fp32 parameters get fp32 gradients
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0)
        assert cosine > 0.99


def _saved_bytes(fn, inputs):
    """Bytes that autograd saves for backward while running `fn`, not counting tensors that share the inputs' memory."""
    input_storages = {t.untyped_storage().data_ptr() for t in inputs}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in input_storages:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(saved)


def test_efficient_head_saves_only_batch_by_vocab():
    batch, tokens, hidden_size, vocab = 4, 128, 32, 5000
    hidden = torch.randn(batch, tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    bias = torch.zeros(vocab, requires_grad=True)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[0, 64:] = 0
    full_logits = batch * tokens * vocab * 4

    params = [hidden, weight, bias]
    efficient = _saved_bytes(lambda h, w, b: efficient_splade_pool(h, w, b, mask, chunk_size=32), params)
    naive = _saved_bytes(lambda h, w, b: naive_splade_pool(h @ w.T + b, mask), params)
    # O(B × V): the pre-activation maxima saved by relu/log1p, plus token positions (B × T); nothing B × T × V.
    assert efficient <= 3 * batch * vocab * 4 + batch * tokens * 8
    assert efficient < full_logits / 20
    assert naive >= full_logits  # the reference keeps (several) full-size tensors


@pytest.fixture(scope="module")
def tiny():
    from spladectl.model import SpladeEncoder

    encoder = SpladeEncoder.from_pretrained("splade-tiny")
    encoder.eval()  # no dropout: both heads must see the same network
    return encoder


def test_efficient_head_matches_naive_through_splade_tiny(tiny):
    from spladectl.model import SpladeEncoder

    plain = SpladeEncoder(tiny.model, tiny.tokenizer, memory_efficient_head=False)
    assert tiny.memory_efficient_head and not plain.memory_efficient_head
    batch = tiny.tokenize(["what causes the seasons on earth", "the tilt of the axis, not the distance to the sun, "
                           "causes seasons", "a"], max_length=32)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert not mask.bool().all()  # padding is exercised
    upstream = torch.rand(3, tiny.vocab_size, generator=torch.Generator().manual_seed(0))
    params = [p for p in tiny.model.parameters() if p.requires_grad]

    def run(fn):
        out = fn()
        return out.detach(), torch.autograd.grad((out * upstream).sum(), params, allow_unused=True)

    ref, ref_grads = run(lambda: naive_splade_pool(plain.model(input_ids=ids, attention_mask=mask).logits, mask))
    for fn in (lambda: tiny(ids, mask), lambda: plain(ids, mask)):
        out, grads = run(fn)
        _assert_close(out, ref)
        for grad, ref_grad in zip(grads, ref_grads):
            if ref_grad is None:
                assert grad is None or grad.abs().max() == 0
            elif ref_grad.abs().max() < 1e-6:  # zero up to round-off: attention key biases (softmax ignores them)
                assert grad.abs().max() < 1e-6
            else:
                _assert_close(grad, ref_grad, rtol=1e-5, floor=1e-2)


def test_splade_tiny_bf16_close_to_fp32(tiny):
    batch = tiny.tokenize(["how do vaccines train the immune system"], max_length=16)
    with torch.no_grad():
        ref = tiny(**batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tiny(**batch)
    assert out.dtype == torch.float32
    _assert_close(out, ref, rtol=5e-2)
    top_ref, top_out = set(ref[0].topk(10).indices.tolist()), set(out[0].topk(10).indices.tolist())
    assert len(top_ref & top_out) >= 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_copy_of_the_projection_follows_the_weights(dtype, monkeypatch):
    # The head keeps its cast copy of the projection between calls (queries and documents of a step share it); an
    # optimizer's in-place update must replace it, and a new weight tensor must never reuse it.
    from spladectl import pooling

    hidden, weight, bias, _ = (t.detach() for t in _inputs(seed=6))
    mask = _mask("right")

    def head(w, b):
        with torch.autocast("cpu", dtype=dtype):
            return efficient_splade_pool(hidden, w, b, mask)

    def uncached(w, b):
        monkeypatch.setattr(pooling, "_weight_cache", pooling._WeightCache())
        return head(w, b)

    first = head(weight, bias)
    assert torch.equal(head(weight, bias), first)
    with torch.no_grad():
        weight.mul_(-1.5)  # in place, as AdamW updates it
        bias.add_(0.5)
    second = head(weight, bias)
    assert not torch.equal(second, first)
    assert torch.equal(second, uncached(weight, bias))
    other = weight.clone() * 0.5
    assert torch.equal(head(other, bias), uncached(other, bias))


def _long_texts(seed: int, vocab: int = 9000, hidden_size: int = 16, bias_shift: float = 2.5):
    # Texts longer than a block and a vocabulary of several tiles: the head groups and tiles them as in training.
    g = torch.Generator().manual_seed(seed)
    lengths = (1100, 700, 40, 0, 513, 3)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    hidden = torch.randn(len(lengths), max(lengths), hidden_size, generator=g)
    hidden[0, 5] *= 40  # one token with a large norm, as [CLS] and [SEP] often have
    weight = torch.randn(vocab, hidden_size, generator=g) * 0.3
    bias = torch.randn(vocab, generator=g) - bias_shift
    return hidden, weight, bias, mask, torch.rand(len(lengths), vocab, generator=g)


@pytest.mark.parametrize(("screen", "amx"), [(True, False), (True, True), (False, False)])
def test_float32_head_with_and_without_the_bf16_screen_equals_the_formula(screen, amx, monkeypatch):
    # The screen runs where the CPU's bf16 products are faster, with AMX's layout (32 extra columns) or the others'
    # (2); every combination runs here on any CPU.
    from spladectl import pooling

    monkeypatch.setattr(pooling, "bf16_products_pay_off", lambda: screen)
    monkeypatch.setattr(pooling, "has_amx_tiles", lambda: amx)
    hidden, weight, bias, mask, upstream = _long_texts(seed=9)
    tensors = [t.requires_grad_() for t in (hidden, weight, bias)]
    ref, ref_grads = _value_and_grads(lambda h, w, b: naive_splade_pool(h @ w.T + b, mask), tensors, upstream)
    assert 0.05 < (ref > 0).float().mean() < 0.95
    out, grads = _value_and_grads(lambda h, w, b: efficient_splade_pool(h, w, b, mask), tensors, upstream)
    _assert_close(out, ref)
    assert torch.equal(out > 0, ref > 0)
    assert out[3].abs().sum() == 0  # the text without tokens
    for grad, ref_grad in zip(grads, ref_grads):
        _assert_close(grad, ref_grad)


def test_bf16_screen_misses_no_maximum_just_above_zero(monkeypatch):
    # The screen's bf16 products are off by up to ~1% of |x|·|w|; every term here has its max within 1e-3 of zero
    # (half of them above), far inside that error, so only the rounding bound keeps the positive ones.
    from spladectl import pooling

    hidden, weight, bias, mask, _ = _long_texts(seed=10, vocab=5000)
    exact = torch.einsum("bth,vh->btv", hidden.double(), weight.double())
    exact = exact.masked_fill(~mask.bool()[..., None], float("-inf")).amax(1)  # (texts, V), float64
    eps = (torch.rand(exact.shape[1], generator=torch.Generator().manual_seed(11)) - 0.5) * 2e-3
    bias = (-exact[0] + eps).float()  # text 0's maxima land at eps, the other texts' anywhere
    results = []
    for screen in (True, False):
        monkeypatch.setattr(pooling, "bf16_products_pay_off", lambda screen=screen: screen)
        with torch.no_grad():
            results.append(pooling.SpladeMaxHead.apply(hidden, weight, bias, mask, None))
    screened, plain = results
    assert (plain[0] > 0).sum() > 1000
    _assert_close(screened, plain)
    # Both sum the same float32 products; a sign may differ only for a max that is round-off away from zero.
    differs = (screened > 0) != (plain > 0)
    assert (plain[differs].abs() < 1e-6).all() and (screened[differs].abs() < 1e-6).all()


def test_bf16_screen_is_used_only_for_float32_on_cpus_with_bf16_arithmetic(monkeypatch):
    from spladectl import pooling

    calls = []
    real = pooling._screened_float32_max
    monkeypatch.setattr(pooling, "_screened_float32_max", lambda *a: calls.append(1) or real(*a))
    hidden, weight, bias, _ = (t.detach() for t in _inputs(seed=12))
    for native, autocast, expected in ((True, False, 1), (False, False, 0), (True, True, 0)):
        calls.clear()
        monkeypatch.setattr(pooling, "bf16_products_pay_off", lambda native=native: native)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            efficient_splade_pool(hidden, weight, bias, _mask("right"))
        assert len(calls) == expected, (native, autocast)
    calls.clear()
    monkeypatch.setattr(pooling, "bf16_products_pay_off", lambda: True)
    efficient_splade_pool(hidden.double(), weight.double(), bias.double(), _mask("right"))
    assert not calls


def test_bf16_screen_lets_a_nan_through(monkeypatch):
    # A NaN cannot be screened (it compares false with everything): the float32 path takes over and propagates it.
    from spladectl import pooling

    monkeypatch.setattr(pooling, "bf16_products_pay_off", lambda: True)
    hidden, weight, bias, _ = (t.detach() for t in _inputs(seed=5))
    hidden[2, 3, 0] = float("nan")
    out = efficient_splade_pool(hidden, weight, bias, _mask("none"))
    assert out[2].isnan().all()
    assert torch.isfinite(out[[0, 1, 3]]).all()
