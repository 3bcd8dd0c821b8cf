"""SPLADE vectors of texts as scipy CSR matrices, a batch at a time: never a dense texts × vocabulary matrix.

Evaluation, search, teacher scoring and mining all encode through `encode_sparse`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp


def encode_sparse(
    encoder,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int = 64,
    precision: str = "32-true",
    device: str = "cpu",
    top_k: int | None = None,
    threshold: float = 0.0,
    show_progress: bool = False,
    desc: str = "encoding",
) -> sp.csr_matrix:
    """SPLADE vectors of `texts` as a (len(texts), vocab) float32 CSR matrix, rows in the order of `texts`.

    Texts are encoded longest first, so each batch pads to similar lengths (a large speed-up on real corpora) and the
    progress bar's first estimate is pessimistic rather than optimistic. Weights <= threshold are dropped; top_k keeps
    at most that many terms per text.
    """
    from tqdm.auto import tqdm

    texts = list(texts)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    # A few batches per encode() call: it sorts them by token length, which our character-length order only
    # approximates, while its dense (chunk, vocab) output stays small (4 × 64 × 30522 floats is 31 MB).
    chunk = batch_size * 4
    blocks: list[sp.csr_matrix] = []
    with tqdm(total=len(texts), desc=desc, unit="text", disable=not show_progress, leave=False) as bar:
        for start in range(0, len(texts), chunk):
            batch = [texts[i] for i in order[start:start + chunk]]
            dense = encoder.encode(batch, max_length=max_length, batch_size=batch_size, precision=precision,
                                   device=device, show_progress=False)
            blocks.append(sparsify(dense, top_k=top_k, threshold=threshold))
            bar.update(len(batch))
    if not blocks:
        return sp.csr_matrix((0, int(getattr(encoder, "vocab_size", 0))), dtype=np.float32)
    matrix = sp.vstack(blocks, format="csr")
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[np.asarray(order)] = np.arange(len(order))
    return matrix[inverse]


def sparsify(dense, *, top_k: int | None = None, threshold: float = 0.0) -> sp.csr_matrix:
    """A (B, V) tensor or array of SPLADE weights -> CSR, keeping weights > threshold (and only the top_k per row)."""
    import torch

    dense = torch.as_tensor(dense).detach().to("cpu", torch.float32)
    n_rows, vocab = dense.shape
    if top_k is not None and top_k < vocab:
        values, columns = torch.topk(dense, top_k, dim=1)
        keep = values > threshold
        rows = torch.arange(n_rows).unsqueeze(1).expand_as(columns)[keep]
        values, columns = values[keep], columns[keep]
    else:
        rows, columns = (dense > threshold).nonzero(as_tuple=True)
        values = dense[rows, columns]
    return sp.csr_matrix(
        (values.numpy(), (rows.numpy(), columns.numpy())), shape=(n_rows, vocab), dtype=np.float32
    )


def top_terms(vector: sp.spmatrix, tokenizer, n: int = 20) -> list[tuple[str, float]]:
    """The n heaviest vocabulary terms of one SPLADE vector (a 1 × V row): what a query expanded to."""
    row = sp.csr_matrix(vector)
    order = np.argsort(-row.data, kind="stable")[:n]
    tokens = tokenizer.convert_ids_to_tokens([int(i) for i in row.indices[order]])
    return [(str(t), float(w)) for t, w in zip(tokens, row.data[order])]
