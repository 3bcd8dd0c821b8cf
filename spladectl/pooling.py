"""SPLADE pooling: max over the real tokens of log(1 + ReLU(logits)), computed without paying for the activation.

log1p∘ReLU is monotonic, so max-then-activate equals activate-then-max, but touches B×V values instead of B×T×V.
The logits are the expensive part: B×T×V (16 × 256 × 30522 fp32 is 500 MB per encoder pass), and every element-wise
pass over them (activation, mask, cast, the dense backward of the max) costs more than the projection's matmul on CPU.
`efficient_splade_pool` therefore never builds them: it projects tiles of the vocabulary (chunks of tokens on
accelerators), keeps only their max over each example's tokens, and back-propagates sparsely through the few
(example, term) pairs whose max is positive.
"""

from __future__ import annotations

import torch

# On CPU the projection runs tile by tile of the vocabulary, each tile against one example's tokens at a time.
# Measured (splade-tiny head, 64 documents of ≤ 320 tokens, fp32, 2 threads, no grad) on a 2-core AMD EPYC (AVX2):
# 2048-row tiles 1.46 s, 1024 1.55 s, against 4.93 s for the token-chunked loop below with 32-token chunks (2.9 s
# with 128): that loop re-reads the whole 15.6 MB projection from memory for every chunk of tokens. On a Xeon with
# AMX the tiles also made whole training steps faster (fp32 -10%, bf16 -4%, measured 2026-12-01).
DEFAULT_VOCAB_TILE = 2048
# Tokens per matmul in those tiles: texts packed back to back (see _max_by_vocabulary_tile).
CPU_TOKEN_BLOCK = 512
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
    `chunk_size` is the unit of work: vocabulary rows per tile on CPU (default 2048), tokens per chunk on
    accelerators (default 512).
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
        # Real tokens packed in example order, so padding costs nothing and each example is one contiguous run.
        positions = mask.reshape(-1).nonzero().squeeze(1)
        lengths = mask.sum(1).tolist()
        packed = hidden.reshape(B * T, H).index_select(0, positions).to(dtype)
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)

        out_dtype = _output_dtype(weight.dtype)
        on_cpu = hidden.device.type == "cpu"
        out = None
        if on_cpu and dtype == torch.bfloat16:
            out = _positive_max_bf16(packed, weight, bias, starts, chunk_size or DEFAULT_VOCAB_TILE)
        if out is None:
            w = weight.to(dtype)
            best = torch.full((B, V), float("-inf"), dtype=dtype, device=hidden.device)
            if on_cpu:
                _max_by_vocabulary_tile(packed, w, starts, best, chunk_size or DEFAULT_VOCAB_TILE)
            else:
                _max_by_token_chunk(packed, w, starts, best, chunk_size or DEFAULT_GPU_CHUNK_SIZE)
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


def _token_blocks(packed, starts, pad_to: int = 1) -> list:
    """The packed tokens in blocks of CPU_TOKEN_BLOCK rows, each with the (example, first row, end row) segments of
    the texts it holds (texts back to back, a text may straddle two blocks). The last block is padded with zero rows
    (in no text's segment) to a multiple of `pad_to`."""
    n_rows = starts[-1]
    blocks = []
    for r0 in range(0, n_rows, CPU_TOKEN_BLOCK):
        r1 = min(r0 + CPU_TOKEN_BLOCK, n_rows)
        rows = packed[r0:r1]
        if (r1 - r0) % pad_to:
            rows = torch.cat([rows, rows.new_zeros(-(r1 - r0) % pad_to, rows.shape[1])])
        segments = [(b, max(starts[b], r0) - r0, min(starts[b + 1], r1) - r0)
                    for b in range(len(starts) - 1) if max(starts[b], r0) < min(starts[b + 1], r1)]
        blocks.append((rows, segments))
    return blocks


# oneDNN keeps a compiled kernel (≈1.5 MB) per bf16/fp16 matmul shape it meets; rounding the last token block up to
# a multiple of this keeps the shapes few, so RSS does not grow with every new length.
_LOW_PRECISION_ROWS = 32


def _max_by_vocabulary_tile(packed, w, starts, best, tile: int, compare_as: torch.dtype | None = None) -> None:
    # Tile-major: a (tile, H) slice of the projection stays in cache while the tokens pass through it in blocks, and
    # each (block, tile) product is reduced right after the matmul that wrote it, while it is still in cache. One
    # text at a time (a few hundred rows) left the GEMM at ~170 GFLOPS where 512-row blocks reach ~190 (2-core Xeon,
    # fp32, measured 2026-12-03). `compare_as` reads `best` and the products as another dtype of the same width
    # before taking maxima (int16 keys: see _positive_max_bf16).
    low_precision = w.dtype in (torch.bfloat16, torch.float16)
    blocks = _token_blocks(packed, starts, _LOW_PRECISION_ROWS if low_precision else 1)
    compare_as = compare_as or best.dtype
    keys = best.view(compare_as)
    for v0 in range(0, w.shape[0], tile):
        w_tile = w[v0 : v0 + tile]
        for rows, segments in blocks:
            logits = torch.nn.functional.linear(rows, w_tile).view(compare_as)  # (block, tile)
            for b, s0, s1 in segments:
                target = keys[b, v0 : v0 + tile]
                torch.maximum(target, logits[s0:s1].amax(0), out=target)


def _positive_max_bf16(packed, weight, bias, starts, tile: int) -> torch.Tensor | None:
    """bf16 on CPU: max(0, max over each text's tokens of packed @ weight.T + bias) as (B, V) bf16, or None when an
    operand is not finite (the caller then takes the float path).

    A bf16 max over tokens ran at a sixth of the speed of an int16 one (Xeon with AMX, 2026-12-03), and with AMX it
    cost as much as the matmul before it. Non-negative bf16 values order like their bit patterns read as int16, and
    every negative value reads as a negative int16; so against a floor of +0.0 (the int16 0) the int16 max of the bits
    is the bits of the float max. A NaN with its sign bit set (x86's default NaN) would read as a negative number and
    vanish, hence the finiteness check. The max must include the bias to be compared with zero, so the bias rides in
    the matmul as an operand column (_with_bias_column).
    """
    rows, w_bias = _with_bias_column(packed, weight, bias, torch.bfloat16)
    if not (bool(torch.isfinite(rows).all()) and bool(torch.isfinite(w_bias).all())):
        return None
    best = torch.zeros(len(starts) - 1, weight.shape[0], dtype=torch.bfloat16, device=packed.device)  # +0.0: key 0
    _max_by_vocabulary_tile(rows, w_bias, starts, best, tile, compare_as=torch.int16)
    return best


# Columns appended to the head's operands to carry the bias: a 1 (or the bias) and zeros up to a multiple of 32,
# AMX's bf16 tile depth. A (512 × 160) · (160 × 2048) bf16 matmul took 0.31 ms where the same product with a bias
# argument took 0.43 ms (oneDNN first copies the bias into every output row) and without bias 0.25 ms (Xeon with AMX).
_BIAS_COLUMNS = 32


def _with_bias_column(packed, weight, bias, dtype):
    """(rows | 1 0…0) and (weight | bias 0…0) in `dtype`: their product is packed @ weight.T + bias, summed in the
    matmul's accumulator. Each operand is written once, cast on the way in."""
    rows = packed.new_zeros(packed.shape[0], packed.shape[1] + _BIAS_COLUMNS, dtype=dtype)
    rows[:, : packed.shape[1]] = packed
    rows[:, packed.shape[1]] = 1
    w_bias = weight.new_zeros(weight.shape[0], weight.shape[1] + _BIAS_COLUMNS, dtype=dtype)
    w_bias[:, : weight.shape[1]] = weight
    w_bias[:, weight.shape[1]] = bias
    return rows, w_bias


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
