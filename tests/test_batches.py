"""Micro-batches: resumable order, no example dropped, hard negatives sampled per epoch, OOM splitting, and the
shares of each process in a distributed run."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoTokenizer

from spladectl.batches import Collator, epoch_order, micro_batches, rank_order, text_key
from spladectl.data import Example
from spladectl.model import resolve_model_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("splade-tiny"))


def test_epoch_order_covers_every_example_once_and_depends_on_the_epoch():
    first, second = epoch_order(10, 3, seed=1, epoch=0), epoch_order(10, 3, seed=1, epoch=1)
    assert sorted(i for batch in first for i in batch) == list(range(10))
    assert [len(b) for b in first] == [3, 3, 3, 1]  # the short last batch is kept
    assert first != second and first == epoch_order(10, 3, seed=1, epoch=0)


def test_processes_share_each_global_micro_batch_in_order():
    # 3 processes × 2 examples: the global micro-batches of one process with batch 6, cut into 3 contiguous shares.
    shares = [rank_order(12, 2, seed=5, epoch=0, world_size=3, rank=r) for r in range(3)]
    single = epoch_order(12, 6, seed=5, epoch=0)
    assert [sum((shares[r][b] for r in range(3)), []) for b in range(len(single))] == single
    assert all(len(batch) == 2 for share in shares for batch in share)
    # every epoch draws a new order, the same on every process
    later = [rank_order(12, 2, seed=5, epoch=1, world_size=3, rank=r) for r in range(3)]
    assert later != shares
    assert sorted(i for share in later for batch in share for i in batch) == list(range(12))


def test_an_uneven_last_micro_batch_is_topped_up_to_equal_shares():
    # 11 examples, 2 processes × 2: the last global micro-batch has 3 examples, one short of two equal shares.
    shares = [rank_order(11, 2, seed=0, epoch=0, world_size=2, rank=r) for r in range(2)]
    single = epoch_order(11, 4, seed=0, epoch=0)
    assert [len(batch) for batch in single] == [4, 4, 3]
    assert [len(batch) for batch in shares[0]] == [2, 2, 2] and [len(batch) for batch in shares[1]] == [2, 2, 2]
    last = shares[0][-1] + shares[1][-1]
    assert last == single[-1] + [single[0][0]]  # one example from the start of the epoch fills the gap
    assert sorted({i for share in shares for batch in share for i in batch}) == list(range(11))


def test_negatives_are_resampled_each_epoch_and_reproducibly(tokenizer):
    examples = [Example(query=f"q{i}", positive=f"p{i}", negatives=[f"n{i}-{k}" for k in range(20)]) for i in range(4)]
    collator = Collator(tokenizer, n_negatives=2, max_query_length=8, max_doc_length=8, seed=3)

    def negatives(epoch):
        picked = []
        for batch in micro_batches(examples, collator, batch_size=4, seed=3, epoch=epoch):
            texts = tokenizer.batch_decode(batch.doc_ids, skip_special_tokens=True)
            picked.append([t.replace(" ", "") for t in texts])
        return picked

    epoch0, epoch1 = negatives(0), negatives(1)
    assert epoch0 == negatives(0)  # what a resumed run would draw
    assert epoch0 != epoch1
    docs = epoch0[0]
    assert len(docs) == 4 * 3 and all(d.startswith("p") for d in docs[::3])


def test_short_negative_lists_cycle_and_teacher_scores_follow_the_pick(tokenizer):
    examples = [Example(query="q", positive="p", negatives=["a", "b", "c", "d"], teacher_scores=[9, 1, 2, 3, 4]),
                Example(query="r", positive="s", negatives=["e"], teacher_scores=[8, 5])]
    collator = Collator(tokenizer, n_negatives=2, max_query_length=8, max_doc_length=8, seed=0)
    batch = collator(list(enumerate(examples)))
    texts = tokenizer.batch_decode(batch.doc_ids, skip_special_tokens=True)
    assert texts[3:] == ["s", "e", "e"]
    assert batch.teacher_scores[1].tolist() == [8, 5, 5]
    first_negatives = texts[1:3]
    expected = [{"a": 1, "b": 2, "c": 3, "d": 4}[t] for t in first_negatives]
    assert batch.teacher_scores[0].tolist() == [9, *expected]


def test_split_keeps_every_example_with_its_documents(tokenizer):
    examples = [Example(query=f"q{i}", positive=f"p{i}", negatives=[f"n{i}"]) for i in range(5)]
    collator = Collator(tokenizer, n_negatives=1, max_query_length=8, max_doc_length=8)
    batch = collator(list(enumerate(examples)))
    pieces = batch.split(2)
    assert [p.size for p in pieces] == [3, 2]
    assert sum(p.doc_ids.shape[0] for p in pieces) == batch.doc_ids.shape[0]
    assert tokenizer.batch_decode(pieces[1].doc_ids, skip_special_tokens=True) == ["p3", "n3", "p4", "n4"]
    # the text keys (for the loss's false negatives) travel with their rows
    assert pieces[1].query_keys.tolist() == [text_key("q3"), text_key("q4")]
    assert pieces[1].doc_keys.tolist() == [text_key(t) for t in ("p3", "n3", "p4", "n4")]


def test_text_keys_are_the_same_in_every_process():
    # Python's own hash() of a str differs between processes; the processes of a distributed run compare these.
    import subprocess
    import sys

    code = "from spladectl.batches import text_key; print(text_key('how do bees make honey'))"
    keys = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, check=True,
                           capture_output=True, text=True).stdout.strip() for seed in ("1", "2")}
    assert keys == {str(text_key("how do bees make honey"))}
    assert text_key("a") != text_key("a ")


def test_prefetcher_yields_in_order_and_raises_a_collation_error_where_it_happened():
    from spladectl.batches import Prefetcher

    def items():
        yield from (1, 2, 3)
        raise ValueError("bad example at batch 4")

    got = Prefetcher(items())
    assert [next(got), next(got), next(got)] == [1, 2, 3]
    with pytest.raises(ValueError, match="batch 4"):
        next(got)
    assert next(got, "end") == "end"  # after the error the iterator is finished, not stuck


def test_prefetcher_close_stops_a_thread_blocked_on_a_full_queue():
    import itertools

    from spladectl.batches import Prefetcher

    got = Prefetcher(itertools.count(), depth=2)
    assert next(got) == 0
    got.close()
    assert not got._thread.is_alive()
    assert next(got, "end") == "end"


def test_without_workers_batches_are_tokenized_in_a_prefetch_thread_with_the_same_result(tokenizer):
    from spladectl.batches import Prefetcher

    examples = [Example(query=f"q{i}", positive=f"p{i}", negatives=[f"n{i}"]) for i in range(10)]
    collator = Collator(tokenizer, n_negatives=1, max_query_length=8, max_doc_length=8, seed=1)
    assert collator.tokenizer is not tokenizer  # the thread never shares the model's tokenizer (evaluation uses it)
    threaded = micro_batches(examples, collator, batch_size=3, seed=1, epoch=0)
    inline = micro_batches(examples, collator, batch_size=3, seed=1, epoch=0, prefetch=False)
    assert isinstance(threaded, Prefetcher) and not isinstance(inline, Prefetcher)
    pairs = list(zip(threaded, inline, strict=True))
    assert len(pairs) == 4
    for a, b in pairs:
        assert torch.equal(a.query_ids, b.query_ids) and torch.equal(a.doc_ids, b.doc_ids)


def test_batches_for_a_cuda_run_come_pinned_off_the_training_thread(tokenizer, monkeypatch):
    # This machine has no GPU, and page-locked memory needs a CUDA driver: the accelerator check and the pinning
    # itself are stand-ins (a pinned tensor is a clone remembered with the thread that pinned it). The DataLoader's
    # pinning logic, our MicroBatch.pin_memory and the prefetch thread are the real ones. (With DataLoader workers,
    # torch's own pinning thread does the same; it needs a real device index, so it is not exercised here.)
    import threading

    pinned: dict[int, str] = {}

    def fake_pin(tensor):
        copy = tensor.clone()
        pinned[id(copy)] = threading.current_thread().name
        return copy

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    examples = [Example(query=f"q{i}", positive=f"p{i}", negatives=[f"n{i}"], teacher_scores=[1.0, 0.5])
                for i in range(6)]
    collator = Collator(tokenizer, n_negatives=1, max_query_length=8, max_doc_length=8, seed=1)
    batches = list(micro_batches(examples, collator, batch_size=3, seed=1, epoch=0, pin_memory=True))
    plain = list(micro_batches(examples, collator, batch_size=3, seed=1, epoch=0, prefetch=False))
    assert len(batches) == 2
    for batch, reference in zip(batches, plain):
        tensors = [batch.query_ids, batch.query_mask, batch.doc_ids, batch.doc_mask, batch.teacher_scores,
                   batch.query_keys, batch.doc_keys]
        assert all(id(t) in pinned for t in tensors)
        assert all(pinned[id(t)] != threading.main_thread().name for t in tensors)
        assert torch.equal(batch.doc_ids, reference.doc_ids) and torch.equal(batch.teacher_scores,
                                                                             reference.teacher_scores)
    unpinned = micro_batches(examples, collator, batch_size=3, seed=1, epoch=0)
    assert not any(id(t) in pinned for t in [next(iter(unpinned)).query_ids])
