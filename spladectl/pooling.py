"""SPLADE pooling: max over the real tokens of log(1 + ReLU(logits)), computed without paying for the activation.

log1p∘ReLU is monotonic, so max-then-activate equals activate-then-max, but touches B×V values instead of B×T×V.
The logits are the expensive part: B×T×V (16 × 256 × 30522 fp32 is 500 MB per encoder pass), and every element-wise
pass over them (activation, mask, cast, the dense backward of the max) costs more than the projection's matmul on CPU.
`efficient_splade_pool` therefore never builds them: it projects tiles of the vocabulary (chunks of tokens on
accelerators), keeps only their max over each example's tokens, and back-propagates sparsely through the few
(example, term) pairs whose max is positive. In float32 on CPUs whose bf16 products are faster, a bf16 product of the
whole vocabulary first rules out the terms whose max cannot be positive (_screened_float32_max).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from spladectl.hardware import bf16_products_pay_off, has_amx_tiles


# On CPU the projection runs tile by tile of the vocabulary, each tile against blocks of tokens (_length_groups): a
# (tile, H) slice of the projection stays in cache while the blocks pass through it. The token-chunked loop used on
# accelerators (below) re-reads the whole 15.6 MB projection for every chunk: 4.93 s for 64 documents against 1.46 s
# in tiles (fp32, 2-core AMD EPYC with AVX2). How large a block and a tile should be depends on the CPU: the same
# sizes were 30% slower on one kind than the best sizes on it.
class CpuHeadLayout(NamedTuple):
    block: int  # tokens per matmul
    tile: int  # vocabulary rows per matmul
    bias_columns: int  # bf16: columns that carry the bias in the product (_with_bias_column); float32 adds it after
    row_multiple: int  # a group's rows are rounded up to a multiple of this (see _LOW_PRECISION_ROWS)


# oneDNN keeps a compiled kernel (≈1.5 MB) per bf16/fp16 matmul shape it meets; rounding each group's rows up to a
# multiple of this keeps the shapes few, so RSS does not grow with every new length.
_LOW_PRECISION_ROWS = 128

# Xeon with AMX, the head forward of a SciFact step (16 queries, 32 documents), 2 threads, 2026-12-03. float32: 276 ms
# with 512-token blocks and 2048-row tiles, 283 with 4096-row tiles, 334 with 256-token blocks. bf16: AMX multiplies
# faster than the products are written, so larger blocks pay, and its bf16 tiles are 32 deep: 79 ms with 1024 / 4096,
# 91 with 512 / 4096, 103 with 512 / 2048.
AMX_FLOAT32 = CpuHeadLayout(block=512, tile=2048, bias_columns=0, row_multiple=1)
AMX_LOW_PRECISION = CpuHeadLayout(block=1024, tile=4096, bias_columns=32, row_multiple=_LOW_PRECISION_ROWS)
# AMD EPYC (Zen 4: AVX512-BF16, no AMX), the same head, calls alternating, 2026-12-04. float32: a block's products
# should stay in the core's 1 MB of L2 until the max has read them: 512 / 512 took 0.66× the time of 512 / 2048,
# 1024 / 512 0.67×, 512 / 256 0.75×, 512 / 1024 0.81×. bf16: AVX512-BF16 multiplies pairs, so one bias column and one
# zero suffice (30 more are 23% more work): 242 ms with 512 / 2048 / 2 columns, 262 with 8 columns, 276 with
# 1024 / 4096, and 349 with AMX's layout; 512 / 1024 took 1.04× and 512 / 512 1.15× of 512 / 2048. CPUs with AVX2
# alone are given these layouts too (not measured with the grouped head).
VECTOR_FLOAT32 = CpuHeadLayout(block=512, tile=512, bias_columns=0, row_multiple=1)
VECTOR_LOW_PRECISION = CpuHeadLayout(block=512, tile=2048, bias_columns=2, row_multiple=_LOW_PRECISION_ROWS)


def cpu_head_layout(dtype: torch.dtype) -> CpuHeadLayout:
    """The block and tile sizes of the CPU head for products in `dtype` on this CPU."""
    low_precision = dtype in (torch.bfloat16, torch.float16)
    if has_amx_tiles():
        return AMX_LOW_PRECISION if low_precision else AMX_FLOAT32
    return VECTOR_LOW_PRECISION if low_precision else VECTOR_FLOAT32


# On GPUs per-example tiles would only add kernel launches: chunks of tokens (examples packed back to back) against
# the whole vocabulary, 512 × 30522 bf16 being 31 MB. Not measured here (no GPU).
DEFAULT_GPU_CHUNK_SIZE = 512

# The vocabulary projection's name in a torch.profiler trace (its backward is the autograd node SpladeMaxHeadBackward).
PHASE_HEAD = "spladectl.head"

# Bound on the elements of the temporaries in the backward (active pairs × hidden, tokens × active terms).
_BACKWARD_BLOCK_ELEMENTS = 1 << 22


def naive_splade_pool(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reference SPLADE pooling, in the order of the paper's code: activate, zero the padding, max over tokens.

    `logits` (B, T, V), `attention_mask` (B, T) → (B, V) float32. Materialises several B×T×V tensors; tests and the
    benchmarks' "plain loop" use it, training does not.
    """
    dtype = _output_dtype(logits.dtype)
    activated = torch.log1p(torch.relu(logits.to(dtype))) * attention_mask.unsqueeze(-1).to(dtype)
    return torch.max(activated, dim=1).values


def splade_max_pool(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Max-first SPLADE pooling of full logits (B, T, V) → (B, V) float32; equal to `naive_splade_pool`.

    Padding is masked in the logits' own dtype (one pass, skipped when there is none) and only the (B, V) maxima are
    cast and activated. `max(dim)` rather than `amax`: its backward is a scatter, not a comparison over all logits.
    """
    mask = attention_mask.bool()
    if not bool(mask.all()):
        logits = logits.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    best = logits.max(dim=1).values.to(_output_dtype(logits.dtype))
    # An example with no real token has max -inf; relu maps it to 0 like the naive formula, with zero gradient.
    return torch.log1p(torch.relu(best))


def efficient_splade_pool(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    attention_mask: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """SPLADE representation straight from the MLM head's transformed hidden states, without B×T×V logits.

    `hidden` (B, T, H) is the input of the vocabulary projection, `weight` (V, H) and `bias` (V,) are its parameters.
    Returns log1p(relu(max over real tokens of hidden @ weight.T + bias)) as (B, V) float32, equal in value and
    gradient to `splade_max_pool` on the full logits. Under autocast the projection runs in the autocast dtype.
    `chunk_size` is the unit of work: vocabulary rows per tile on CPU (default: by CPU and dtype, cpu_head_layout),
    tokens per chunk on accelerators (default 512).
    """
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    with torch.profiler.record_function(PHASE_HEAD):
        positive_max = SpladeMaxHead.apply(hidden, weight, bias, attention_mask, chunk_size)
    return torch.log1p(positive_max)


def _output_dtype(dtype: torch.dtype) -> torch.dtype:
    # Representations feed the loss, which must run in fp32 (fp64 stays fp64 for gradcheck).
    return torch.promote_types(dtype, torch.float32)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class SpladeMaxHead(torch.autograd.Function):
    """relu(max over real tokens t of hidden[b, t] @ weight.T + bias) → (B, V) float32, tile by tile of the vocabulary.

    The relu is part of the function because only positive maxima matter downstream, which lets the bf16 path on CPU
    find them without float comparisons (see _positive_max_bf16). Saved for backward: the inputs
    (already alive: they are the encoder's activation and the parameters), the positions of the real tokens and which
    maxima are positive. The argmax is not stored: the backward only needs it where the max is positive — a few
    hundred terms per example — and recomputes it there for a small fraction of the forward's cost.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, attention_mask, chunk_size):
        B, T, H = hidden.shape
        V = weight.shape[0]
        dtype = _compute_dtype(hidden, weight)
        mask = attention_mask.bool()
        # Real tokens in example order: each example is one contiguous run of `positions`.
        positions = mask.reshape(-1).nonzero().squeeze(1)
        lengths = mask.sum(1).tolist()
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)

        out_dtype = _output_dtype(weight.dtype)
        on_cpu = hidden.device.type == "cpu"
        out = None
        if on_cpu:
            if dtype == weight.dtype == hidden.dtype == torch.float32 and bf16_products_pay_off():
                packed = hidden.reshape(B * T, H).index_select(0, positions)
                out = _screened_float32_max(packed, weight, bias, lengths, starts, chunk_size)
            if out is None:
                layout = cpu_head_layout(dtype)
                groups = _length_groups(lengths, starts, layout.block, pad_to=layout.row_multiple)
                tile = chunk_size or layout.tile
                rows = hidden.reshape(B * T, H).index_select(0, positions.index_select(0, groups.rows)).to(dtype)
                if dtype == torch.bfloat16:
                    out = _positive_max_bf16(rows, weight, bias, groups, tile, layout.bias_columns)
                if out is None:
                    best = _max_by_vocabulary_tile(rows, _cast_weight(weight, dtype), groups, tile)
        else:
            packed = hidden.reshape(B * T, H).index_select(0, positions).to(dtype)
            best = torch.full((B, V), float("-inf"), dtype=dtype, device=hidden.device)
            _max_by_token_chunk(packed, weight.to(dtype), starts, best, chunk_size or DEFAULT_GPU_CHUNK_SIZE)
        if out is None:
            # The bias is per term, so it commutes with the max over tokens: add it to B×V values, not B×T×V.
            out = torch.relu(best.to(out_dtype) + bias.to(out_dtype))
        out = out.to(out_dtype)

        ctx.save_for_backward(hidden, weight, positions, out > 0)
        ctx.lengths = lengths
        ctx.dtype, ctx.bias_dtype = dtype, bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, positions, positive = ctx.saved_tensors
        B, T, H = hidden.shape
        V = weight.shape[0]
        grad_hidden = grad_weight = grad_bias = None
        acc = _output_dtype(weight.dtype)  # gradients accumulate in fp32 even when the forward ran in bf16
        with torch.autocast(hidden.device.type, enabled=False):
            grad_out = grad_out.to(acc) * positive  # relu: no gradient where the max is not positive
            if ctx.needs_input_grad[2]:
                grad_bias = grad_out.sum(0).to(ctx.bias_dtype)
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            if not (need_h or need_w):
                return grad_hidden, grad_weight, grad_bias, None, None

            # Only pairs with a non-zero gradient matter: a few hundred positive maxima per example.
            flat = grad_out.reshape(-1)
            active = flat.nonzero().squeeze(1)
            pair_example, pair_term = active // V, active % V
            pair_grad = flat.index_select(0, active)
            # An example without real tokens has a constant -inf max: no gradient, whatever arrives.
            has_tokens = torch.tensor(ctx.lengths, device=grad_out.device) > 0
            pair_grad = pair_grad * has_tokens.index_select(0, pair_example)
            token = _argmax_tokens(hidden, weight, positions, ctx.lengths, pair_example, pair_term, ctx.dtype)

            hidden_flat = hidden.reshape(B * T, H)
            if need_h:
                grad_hidden = torch.zeros(B * T, H, dtype=acc, device=hidden.device)
            if need_w:
                grad_weight = torch.zeros(V, H, dtype=acc, device=weight.device)
            block = max(1, _BACKWARD_BLOCK_ELEMENTS // H)
            for k0 in range(0, active.numel(), block):
                g = pair_grad[k0 : k0 + block].unsqueeze(1)
                tok, term = token[k0 : k0 + block], pair_term[k0 : k0 + block]
                if need_h:
                    grad_hidden.index_add_(0, tok, g * weight.index_select(0, term).to(acc))
                if need_w:
                    grad_weight.index_add_(0, term, g * hidden_flat.index_select(0, tok).to(acc))
            if need_h:
                grad_hidden = grad_hidden.view(B, T, H).to(hidden.dtype)
            if need_w:
                grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


class _Groups:
    """The layout of the CPU head's rows: texts sorted longest first, in groups of texts padded to one length.

    A group is `n` texts of `length` rows each, back to back from its first row, then rows up to a multiple of
    `pad_to` (n · length ≤ `block` rows unless one text alone is longer). A text shorter than its group's length is
    padded with copies of its own first token, which leave its max unchanged, so the max over a group's tokens is a
    single reduction of a (n, length, tile) view. `rows` indexes the packed real tokens (see SpladeMaxHead.forward)
    for each row of the layout; `order` are the texts in layout order (texts without tokens are in no group).
    """

    def __init__(self, rows: torch.Tensor, order: list[int], groups: list[tuple[int, int, int, int, int]],
                 n_texts: int, block: int):
        self.rows, self.order, self.groups, self.n_texts, self.block = rows, order, groups, n_texts, block


def _length_groups(lengths: list[int], starts: list[int], block: int, pad_to: int = 1) -> _Groups:
    order = sorted((b for b in range(len(lengths)) if lengths[b] > 0), key=lambda b: -lengths[b])
    index: list[int] = []
    groups = []  # (first row, end row, first text in `order`, texts, length)
    i = 0
    while i < len(order):
        length = lengths[order[i]]
        n = max(1, min(len(order) - i, block // length))
        first_row = len(index)
        for b in order[i : i + n]:
            index.extend(range(starts[b], starts[b + 1]))
            index.extend([starts[b]] * (length - lengths[b]))
        index.extend([starts[order[i]]] * (-(n * length) % pad_to))
        groups.append((first_row, len(index), i, n, length))
        i += n
    return _Groups(torch.tensor(index, dtype=torch.long), order, groups, len(lengths), block)


def _max_by_vocabulary_tile(rows, w, groups: _Groups, tile: int, compare_as: torch.dtype | None = None,
                            floor: float = float("-inf")) -> torch.Tensor:
    """(texts, V) maxima over each text's rows of rows @ w.T, and `floor` for texts without rows.

    Tile-major: a (tile, H) slice of the projection stays in cache while the groups pass through it, and each
    (group, tile) product is reduced right after the matmul that wrote it, while it is still in cache, straight into
    its place in the result: one matmul and one reduction per pair, however many texts a group holds (per-text
    reductions cost a dispatch each; with OMP_WAIT_POLICY=PASSIVE each also woke the thread pool). Blocks of a few
    hundred rows keep the GEMM near its best (~190 GFLOPS in fp32 on a 2-core Xeon, against ~170 for one text at a
    time). `compare_as` reads the products as another dtype of the same width before taking maxima (int16 keys:
    _positive_max_bf16).
    """
    compare_as = compare_as or w.dtype
    V = w.shape[0]
    found = torch.empty(len(groups.order), V, dtype=w.dtype, device=rows.device)
    keys = found.view(compare_as)
    for v0 in range(0, V, tile):
        w_tile = w[v0 : v0 + tile]
        for first_row, end, first, n, length in groups.groups:
            target = keys[first : first + n, v0 : v0 + tile]
            if n * length <= groups.block:
                logits = torch.nn.functional.linear(rows[first_row:end], w_tile).view(compare_as)
                torch.amax(logits[: n * length].view(n, length, -1), dim=1, out=target)
                continue
            # One text longer than a block: its rows in blocks, maxima combined.
            for r0 in range(0, length, groups.block):
                r1 = min(r0 + groups.block, length)
                logits = torch.nn.functional.linear(rows[first_row + r0 : first_row + r1], w_tile).view(compare_as)
                if r0 == 0:
                    torch.amax(logits, dim=0, keepdim=True, out=target)
                else:
                    torch.maximum(target, logits.amax(0, keepdim=True), out=target)
    best = torch.full((groups.n_texts, V), floor, dtype=w.dtype, device=rows.device)
    if groups.order:
        best.index_copy_(0, torch.tensor(groups.order, device=rows.device), found)
    return best


def _positive_max_bf16(rows, weight, bias, groups: _Groups, tile: int, bias_columns: int,
                       offset: float | None = None) -> torch.Tensor | None:
    """bf16 on CPU: max(0, max over each text's rows of rows @ weight.T + bias (+ offset)) as (B, V) bf16, or None
    when an operand is not finite (the caller then takes the float path). `rows` are cast to bf16 on the way in.

    A bf16 max over tokens ran at a sixth of the speed of an int16 one (Xeon with AMX, 2026-12-03), and with AMX it
    cost as much as the matmul before it. Non-negative bf16 values order like their bit patterns read as int16, and
    every negative value reads as a negative int16; so the int16 max of the bits, clamped at the int16 0 (+0.0), is
    the bits of the float max clamped at zero. A NaN with its sign bit set (x86's default NaN) would read as a
    negative number and vanish, hence the finiteness check. The max must include the bias to be compared with zero,
    so the bias rides in the matmul as an operand column (_with_bias_column).
    """
    rows, w_bias = _with_bias_column(rows, weight, bias, torch.bfloat16, bias_columns, offset)
    # A sum is finite only if every term is (and it overflows float32 only for values no model has): one pass that
    # writes nothing, where isfinite().all() wrote a mask. A false alarm would only cost the float path's speed.
    if not (bool(torch.isfinite(rows.sum(dtype=torch.float32))) and bool(torch.isfinite(
            w_bias.sum(dtype=torch.float32)))):
        return None
    best = _max_by_vocabulary_tile(rows, w_bias, groups, tile, compare_as=torch.int16, floor=0.0)
    return best.view(torch.int16).clamp_min_(0).view(torch.bfloat16)


def _screened_float32_max(packed, weight, bias, lengths: list[int], starts: list[int],
                           tile: int | None) -> torch.Tensor | None:
    """float32 on a CPU whose bf16 products are faster: relu(max over each text's tokens of packed @ weight.T +
    bias) as (texts, V) float32, the float32 formula's values, or None when an operand is not finite.

    Most of a text's 30,522 maxima are negative (a few hundred of them are positive), and only the positive ones
    matter. A bf16 product of the whole vocabulary, at bf16 speed, finds every term whose max could be positive;
    float32 products recompute just those. Rounding cannot hide one: for a token t and a term v, the bf16 product
    with its offset c (below) is within err(t, v) of logit + c, and err is bounded from the operands' norms, the
    precision of bf16 (u = 2⁻⁸, inputs and output), and float32 accumulation over K terms (γ = K · 2⁻²⁴). So a
    term whose screened max is below c − 2 · err (twice the bound, for slack) has no positive logit and its output is
    exactly 0. The offset c (in the product's second extra column, like the bias in the first) shifts the window
    worth looking at above zero, where the int16 max of _positive_max_bf16 applies.
    """
    n_texts, V = len(lengths), weight.shape[0]
    layout = cpu_head_layout(torch.bfloat16)
    columns = max(2, layout.bias_columns)
    u, gamma = 2.0**-8, 1.01 * (packed.shape[1] + columns) * 2.0**-24
    # |error of a product| <= k1 · |x| · |w| + k2 · |bias| + k3 · c, before the output's own rounding (u · |P|).
    k1, k2, k3 = 2 * u + u * u + gamma * (1 + u) ** 2, u + gamma * (1 + u), gamma
    text_of_token = torch.repeat_interleave(torch.arange(n_texts), torch.tensor(lengths))
    norms = torch.zeros(n_texts).scatter_reduce_(0, text_of_token, packed.norm(dim=1), "amax")
    weight_norms = _weight_cache.get((weight, None, torch.float32, "row-norms"), lambda _: weight.norm(dim=1))
    # For a logit L >= 0 the screened value is at least c - E with E = 2 · (u · c + (1 + u) · (k1·|x|·|w| +
    # k2·|bias| + k3 · c)). The threshold c - E must not be negative (the screen clamps at 0), so c >= max E.
    # A non-finite operand makes c or the operands themselves non-finite, which _positive_max_bf16 turns away.
    worst = float((k1 * float(norms.max()) * weight_norms + k2 * bias.abs()).max())
    c = 2 * (1 + u) * worst / (1 - 2 * u - 2 * (1 + u) * k3) * (1 + 2 * u)  # rounded to bf16 below, up to u lower
    c = float(torch.tensor(c).to(torch.bfloat16))
    threshold = torch.addr(c * (1 - 2 * u - 2 * (1 + u) * k3) - 2 * (1 + u) * k2 * bias.abs(), norms,
                           weight_norms, alpha=-2 * (1 + u) * k1)

    groups = _length_groups(lengths, starts, layout.block, pad_to=layout.row_multiple)
    screened = _positive_max_bf16(packed.index_select(0, groups.rows), weight, bias, groups, tile or layout.tile,
                                  columns, offset=c)
    if screened is None:
        return None
    candidates = screened.float() >= threshold
    del screened, threshold
    out = torch.zeros(n_texts, V)
    with torch.autocast(packed.device.type, enabled=False):  # float32 products, whatever the caller's autocast
        _fill_candidates(out, packed, weight, bias, lengths, starts, candidates)
    return out


def _fill_candidates(out, packed, weight, bias, lengths, starts, candidates) -> None:
    """out[b, v] = relu(max over text b's tokens of packed @ weight[v] + bias[v]) for the candidate pairs."""
    for b in range(out.shape[0]):
        n_tok = lengths[b]
        terms = candidates[b].nonzero().squeeze(1) if n_tok else None
        if terms is None or not terms.numel():
            continue
        x = packed[starts[b] : starts[b + 1]]
        step = max(1, _BACKWARD_BLOCK_ELEMENTS // max(n_tok, packed.shape[1]))
        for p0 in range(0, terms.numel(), step):
            picked = terms[p0 : p0 + step]
            # (terms, tokens): the max runs along contiguous rows
            best = (weight.index_select(0, picked) @ x.T).amax(1)
            out[b].index_copy_(0, picked, torch.relu(best + bias.index_select(0, picked)))


# Why the bias rides in the product instead of being passed to it: a (512 × 160) · (160 × 2048) bf16 matmul took
# 0.31 ms where the same product with a bias argument took 0.43 ms (oneDNN first copies the bias into every output
# row) and without bias 0.25 ms (Xeon with AMX).
def _with_bias_column(rows, weight, bias, dtype, columns: int, offset: float | None = None):
    """(rows | 1 0…0) and (weight | bias 0…0) in `dtype`, `columns` wider (CpuHeadLayout.bias_columns): their
    product is rows @ weight.T + bias, summed in the matmul's accumulator. With an `offset` (exact in `dtype`), the
    second extra columns are `offset` and 1, and the product is rows @ weight.T + bias + offset. Each operand is
    written once, cast on the way in; the weight's copy is kept while the weight is unchanged (a step encodes
    queries and documents with the same weights)."""
    padded = rows.new_zeros(rows.shape[0], rows.shape[1] + columns, dtype=dtype)
    padded[:, : rows.shape[1]] = rows
    padded[:, rows.shape[1]] = 1
    if offset is not None:
        padded[:, rows.shape[1] + 1] = offset

    def build(previous):
        shape = (weight.shape[0], weight.shape[1] + columns)
        # Rewritten in place after each update: its zero columns stay zero, and a fresh 10 MB buffer every step would
        # be zero-filled and page-faulted again.
        w_bias = previous if previous is not None and previous.shape == shape else weight.new_zeros(shape, dtype=dtype)
        w_bias[:, : weight.shape[1]] = weight
        w_bias[:, weight.shape[1]] = bias
        if offset is not None:
            w_bias[:, weight.shape[1] + 1] = 1
        return w_bias

    kind = ("bias-column", columns, offset is not None)
    return padded, _weight_cache.get((weight, bias, dtype, kind), build)


def _cast_weight(weight, dtype):
    if weight.dtype == dtype:
        return weight
    return _weight_cache.get((weight, None, dtype, "cast"), lambda previous: weight.to(dtype))


class _WeightCache:
    """One derived copy of the projection (cast, or with its bias column) per kind, rebuilt when the weight or bias
    changes. The same tensor objects (held weakly), storage and autograd's version counter say "unchanged": an
    optimizer step or a load (in-place) bumps the version. `build(previous)` makes the copy, and may write it into
    the previous one, which no caller holds beyond a forward."""

    def __init__(self):
        self._entries: dict[tuple, tuple] = {}

    def get(self, key, build):
        weight, bias, dtype, kind = key
        sources = tuple(t for t in (weight, bias) if t is not None)
        stamp = tuple((t.data_ptr(), t._version) for t in sources)
        entry = self._entries.get((dtype, kind))
        if (entry is not None and entry[1] == stamp and len(entry[0]) == len(sources)
                and all(ref() is t for ref, t in zip(entry[0], sources))):
            return entry[2]
        value = build(entry[2] if entry is not None else None)
        self._entries[(dtype, kind)] = (tuple(weakref.ref(t) for t in sources), stamp, value)
        return value


_weight_cache = _WeightCache()


def _max_by_token_chunk(packed, w, starts, best, chunk: int) -> None:
    # Few, large kernels for accelerators: `chunk` tokens × the whole vocabulary at a time, examples may straddle.
    B, seen, example = best.shape[0], [False] * best.shape[0], 0
    for r0 in range(0, starts[-1], chunk):
        r1 = min(r0 + chunk, starts[-1])
        logits = packed[r0:r1] @ w.T  # (chunk, V): the only logits that ever exist
        while example < B and starts[example + 1] <= r0:
            example += 1
        b = example
        while b < B and starts[b] < r1:
            s0, s1 = max(starts[b], r0) - r0, min(starts[b + 1], r1) - r0
            if s1 > s0:
                part = logits[s0:s1].amax(0)
                best[b] = torch.maximum(best[b], part) if seen[b] else part
                seen[b] = True
            b += 1


def _argmax_tokens(hidden, weight, positions, lengths, pair_example, pair_term, dtype):
    """Flat token position (b * T + t) of the max for each active (example, term) pair, recomputed in `dtype`.

    Recomputing from the forward's operands (rounded to `dtype`) picks the same token as the forward up to exact ties
    (measure zero in fp32; in bf16 any tied token is an equally valid subgradient). Pairs are sorted by example, as
    nonzero() returns them.
    """
    B, T, H = hidden.shape
    hidden_flat = hidden.reshape(B * T, H)
    acc = _output_dtype(dtype)
    token = torch.zeros_like(pair_term)
    counts = torch.bincount(pair_example, minlength=B).tolist()
    start_pair, start_tok = 0, 0
    for b in range(B):
        n_pairs, n_tok = counts[b], lengths[b]
        if n_pairs and n_tok:
            tok_pos = positions[start_tok : start_tok + n_tok]
            # bf16-rounded operands multiplied in fp32: the same products as the forward's, but fp32 matmuls do not
            # leave a oneDNN kernel behind for every new (pairs × tokens) shape, as bf16 ones do.
            h = hidden_flat.index_select(0, tok_pos).to(dtype).to(acc)  # (L, H)
            step = max(1, _BACKWARD_BLOCK_ELEMENTS // max(n_tok, H))
            for p0 in range(start_pair, start_pair + n_pairs, step):
                p1 = min(p0 + step, start_pair + n_pairs)
                w = weight.index_select(0, pair_term[p0:p1]).to(dtype).to(acc)  # (P, H)
                # Along contiguous rows, and max().indices: both several times faster than argmax(0) on CPU.
                token[p0:p1] = tok_pos[(w @ h.T).max(1).indices]
        start_pair += n_pairs
        start_tok += n_tok
    return token
