"""From training examples to tokenized micro-batches, in an order that a checkpoint can resume exactly.

The order of an epoch is a permutation drawn from its own generator (seed + epoch), so the data position of a
checkpoint is just (epoch, micro-batches consumed) and resuming needs no replay of the random stream.
With several processes, every process draws the same permutation and cuts it into global micro-batches of
batch_size × world_size examples; each process takes its own contiguous share of each, so the processes together see
exactly the micro-batches one process with the global batch size would see, in the same order.
Tokenization stays off the training step's critical path: in DataLoader workers when the profile asks for them, else
in a background thread of the training process that keeps the next micro-batches ready (see Prefetcher).
"""

from __future__ import annotations

import copy
import hashlib
import queue
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from spladectl.data import Example


@dataclass
class MicroBatch:
    query_ids: torch.Tensor  # (B, Tq)
    query_mask: torch.Tensor
    doc_ids: torch.Tensor  # (B * (1 + N), Td): each example's positive, then its N negatives
    doc_mask: torch.Tensor
    teacher_scores: torch.Tensor | None  # (B, 1 + N)
    size: int  # examples in the micro-batch
    query_keys: torch.Tensor | None = None  # (B,) text_key of each query
    doc_keys: torch.Tensor | None = None  # (B * (1 + N),) text_key of each document, in doc_ids' order

    def split(self, parts: int) -> list["MicroBatch"]:
        """Up to `parts` smaller micro-batches of the same examples (after an out-of-memory error)."""
        if parts <= 1 or self.size <= 1:
            return [self]
        size = -(-self.size // parts)
        per_example = self.doc_ids.shape[0] // self.size
        out = []
        for start in range(0, self.size, size):
            stop = min(start + size, self.size)
            rows, docs = slice(start, stop), slice(start * per_example, stop * per_example)
            part = lambda t, cut: None if t is None else t[cut]  # noqa: E731
            out.append(MicroBatch(
                self.query_ids[rows], self.query_mask[rows], self.doc_ids[docs], self.doc_mask[docs],
                part(self.teacher_scores, rows), stop - start, part(self.query_keys, rows), part(self.doc_keys, docs),
            ))
        return out

    def to(self, device: torch.device) -> "MicroBatch":
        # Asynchronous only from pinned memory (see pin_memory); from pageable memory it is an ordinary copy.
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "MicroBatch":
        """The same batch in page-locked memory, so that `to("cuda")` overlaps the copy with the GPU's work. The
        DataLoader calls it (in its pinning thread, or in the prefetch thread) when the run trains on a CUDA GPU."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> "MicroBatch":
        move = lambda t: None if t is None else fn(t)  # noqa: E731
        return MicroBatch(
            move(self.query_ids), move(self.query_mask), move(self.doc_ids), move(self.doc_mask),
            move(self.teacher_scores), self.size, move(self.query_keys), move(self.doc_keys),
        )


def text_key(text: str) -> int:
    """A 64-bit key of a text, equal for equal texts in every process (Python's hash() is salted per process), so
    the loss can tell a query's other positives apart from true negatives over a gathered global batch."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def text_keys(texts: list[str]) -> torch.Tensor:
    return torch.tensor([text_key(t) for t in texts], dtype=torch.int64)


def pad_multiple(max_length: int) -> int | None:
    """The padded length's granularity (see Collator._tokenize): 32, or less when max_length is not a multiple of 32,
    because the tokenizer refuses a truncation length that is not a multiple of it."""
    return next((m for m in (32, 16, 8) if max_length % m == 0), None)


class Collator:
    """Tokenizes examples into a MicroBatch; picklable so DataLoader workers can run it.

    An example with more negatives than a step uses (BM25 mining keeps 50) contributes a different sample of them each
    epoch, drawn from (seed, epoch, example index) alone so that a resumed run draws the same ones.
    """

    def __init__(self, tokenizer, *, n_negatives: int, max_query_length: int, max_doc_length: int, seed: int = 0):
        # A copy of its own: the prefetch thread tokenizes while the main thread may encode with the model's tokenizer
        # (evaluation during training), and a Rust tokenizer used from two threads at once raises "Already borrowed".
        self.tokenizer = copy.deepcopy(tokenizer)
        self.n_negatives = n_negatives
        self.max_query_length = max_query_length
        self.max_doc_length = max_doc_length
        self.seed = seed
        self.epoch = 0

    def negative_positions(self, index: int, available: int) -> list[int]:
        if available <= self.n_negatives:
            # Fewer than asked: reuse them in order, since the documents tensor must stay rectangular.
            return [i % available for i in range(self.n_negatives)]
        return random.Random(f"{self.seed}:{self.epoch}:{index}").sample(range(available), self.n_negatives)

    def _tokenize(self, texts: list[str], max_length: int):
        # Lengths rounded up to a multiple of 32 give the encoder's matmuls a handful of shapes per run: oneDNN keeps
        # a compiled kernel (≈1.5 MB) per shape it sees, so exact lengths made bf16 RSS creep up step after step.
        return self.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                              pad_to_multiple_of=pad_multiple(max_length), return_tensors="pt")

    def __call__(self, indexed: list[tuple[int, Example]]) -> MicroBatch:
        examples = [e for _, e in indexed]
        picks = [self.negative_positions(i, len(e.negatives)) for i, e in indexed]
        queries = [e.query for e in examples]
        docs = [text for e, p in zip(examples, picks) for text in [e.positive, *(e.negatives[j] for j in p)]]
        q = self._tokenize(queries, self.max_query_length)
        d = self._tokenize(docs, self.max_doc_length)
        teacher = None
        if all(e.teacher_scores is not None for e in examples):
            teacher = torch.tensor([[e.teacher_scores[0], *(e.teacher_scores[1 + j] for j in p)]
                                    for e, p in zip(examples, picks)], dtype=torch.float32)
        return MicroBatch(q["input_ids"], q["attention_mask"], d["input_ids"], d["attention_mask"], teacher,
                          len(examples), text_keys(queries), text_keys(docs))


class _Indexed(Dataset):
    def __init__(self, examples: Sequence[Example], order: Sequence[list[int]]):
        self.examples = examples
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> list[tuple[int, Example]]:
        return [(j, self.examples[j]) for j in self.order[i]]


class BatchOrder(Sequence):
    """One process's micro-batches of an epoch, as lists of example indices built when asked for.

    Only the epoch's permutation is held (a tensor, 4 bytes an example): a list of lists of Python ints took about
    ten times that, which for tens of millions of prepared examples was gigabytes.
    """

    def __init__(self, perm: torch.Tensor, batch_size: int, *, world_size: int = 1, rank: int = 0, start: int = 0):
        self.perm, self.batch_size, self.world_size, self.rank = perm, batch_size, world_size, rank
        self.start = start
        self._global = batch_size * world_size
        self._batches = -(-len(perm) // self._global)

    def __len__(self) -> int:
        return max(0, self._batches - self.start)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            if index.step in (None, 1) and index.stop is None:
                first = self.start + min(len(self), index.indices(len(self))[0])
                return BatchOrder(self.perm, self.batch_size, world_size=self.world_size, rank=self.rank,
                                  start=first)
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        b = self.start + index
        batch = self.perm[b * self._global : (b + 1) * self._global].tolist()
        if self.world_size == 1:
            return batch
        # A last global micro-batch that does not split evenly is topped up with the epoch's first examples.
        n = len(self.perm)
        batch += [int(self.perm[i % n]) for i in range(-len(batch) % self.world_size)]
        size = len(batch) // self.world_size
        return batch[self.rank * size : (self.rank + 1) * size]

    def __eq__(self, other) -> bool:
        return isinstance(other, (BatchOrder, list)) and list(self) == list(other)


def _permutation(n_examples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    # int32 halves the order's memory (40 MB for 10M examples) and draws the very permutation int64 does.
    dtype = torch.int32 if n_examples < 2**31 else torch.int64
    return torch.randperm(n_examples, generator=generator, dtype=dtype)


def epoch_order(n_examples: int, batch_size: int, seed: int, epoch: int) -> BatchOrder:
    """The micro-batches of one epoch as lists of example indices; a shorter last batch is kept, not dropped."""
    return BatchOrder(_permutation(n_examples, seed, epoch), batch_size)


def rank_order(n_examples: int, batch_size: int, seed: int, epoch: int, *, world_size: int = 1,
               rank: int = 0) -> BatchOrder:
    """This process's micro-batches of one epoch (`batch_size` examples each, per process).

    The epoch's global micro-batches hold batch_size × world_size examples; process `rank` takes the rank-th equal,
    contiguous part of each. A last global micro-batch that does not split evenly is topped up with the epoch's
    first examples (fewer than world_size of them), because every process must contribute the same number of
    representations to the gathers of the loss.
    """
    return BatchOrder(_permutation(n_examples, seed, epoch), batch_size, world_size=world_size, rank=rank)


class Prefetcher:
    """Runs an iterator in a daemon thread, up to `depth` items ahead of its consumer.

    Without DataLoader workers the next micro-batch is tokenized here while the step computes: the Rust tokenizer
    releases the GIL while it encodes, and a thread costs neither a process's memory nor a worker's start-up.
    An exception in the thread is raised to the consumer at the item where it happened; close() stops the thread.
    """

    _END = object()

    def __init__(self, iterable, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(iterable,), name="spladectl-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterable) -> None:
        try:
            for item in iterable:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as exc:  # handed to the consumer, who decides what is fatal
            self._put((None, exc))

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item, error = self._queue.get()
        if error is not None:
            self._done = True
            raise error
        if item is self._END:
            self._done = True
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._done = True
        self._thread.join(timeout=5)


def tokenizes_ahead(device_type: str) -> bool:
    """Whether a run on this device type tokenizes the next micro-batches in a prefetch thread (with no DataLoader
    workers). It pays where the step runs elsewhere (a GPU). On a CPU device the step's own threads fill every core,
    and the thread preempting them cost more than it saved: 2-core Xeon, SciFact batch 16, tokenizing inside the step
    took 5–10% less time per step in float32 and 4–5% in bf16 than a prefetch thread did (2026-12-03)."""
    return device_type != "cpu"


def micro_batches(
    examples: list[Example], collator: Collator, *, batch_size: int, seed: int, epoch: int, start: int = 0,
    workers: int = 0, world_size: int = 1, rank: int = 0, prefetch: bool = True, pin_memory: bool = False,
):
    """Iterate this process's micro-batches of the epoch from position `start` (micro-batches already consumed).

    With workers=0 and prefetch, a Prefetcher thread tokenizes ahead; call close() on the result when abandoning it.
    `pin_memory` (for a CUDA device) hands out batches in page-locked memory, pinned off the training thread."""
    order = rank_order(len(examples), batch_size, seed, epoch, world_size=world_size, rank=rank)[start:]
    collator.epoch = epoch
    # Its own generator: creating a DataLoader iterator draws a seed, and drawing it from the global RNG would shift
    # the dropout stream depending on where in an epoch a run was resumed.
    loader = DataLoader(
        _Indexed(examples, order), batch_size=None, shuffle=False, collate_fn=collator, num_workers=workers,
        persistent_workers=False, prefetch_factor=4 if workers else None, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed + epoch),
    )
    if workers == 0 and prefetch:
        return Prefetcher(loader)
    return iter(loader)


def micro_batches_per_epoch(n_examples: int, batch_size: int) -> int:
    return -(-n_examples // batch_size)
