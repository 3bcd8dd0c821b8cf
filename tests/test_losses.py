"""Loss functions against formulas written out by hand on tiny inputs."""

from __future__ import annotations

import math

import pytest
import torch

from spladectl import losses
from spladectl.errors import SpladectlError
from spladectl.losses import LossInputs

# 2 examples × (1 positive + 1 negative) over a 3-term vocabulary, chosen so every score is a small integer.
Q = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])
D = torch.tensor(
    [
        [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]],  # example 0: positive, negative
        [[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]],  # example 1: positive, negative
    ]
)
# scores[i, j] = Q[i] · D.flatten(0, 1)[j]
SCORES = [[3.0, 0.0, 0.0, 1.0], [1.0, 1.0, 2.0, 0.0]]


def test_build_scores_and_target_layout():
    inputs = LossInputs.build(Q, D)
    assert inputs.scores.dtype == torch.float32
    assert inputs.scores.tolist() == SCORES
    assert inputs.targets.tolist() == [0, 2]  # query i's positive is column i * (1 + N)
    assert inputs.own_scores.tolist() == [[3.0, 0.0], [2.0, 0.0]]


def test_build_computes_scores_in_fp32():
    inputs = LossInputs.build(Q.bfloat16(), D.bfloat16())
    assert inputs.scores.dtype == torch.float32


def test_build_rejects_bad_shapes():
    with pytest.raises(ValueError):
        LossInputs.build(Q, D[:, :, :2])
    with pytest.raises(ValueError):
        LossInputs.build(Q, D, teacher_scores=torch.zeros(2, 3))


def test_contrastive_loss_by_hand():
    def nll(row, target):
        return -(row[target] - math.log(sum(math.exp(s) for s in row)))

    expected = (nll(SCORES[0], 0) + nll(SCORES[1], 2)) / 2
    assert losses.contrastive_loss(LossInputs.build(Q, D)).item() == pytest.approx(expected, rel=1e-6)
    own_only = (nll([3.0, 0.0], 0) + nll([2.0, 0.0], 0)) / 2
    assert losses.contrastive_loss(LossInputs.build(Q, D), in_batch=False).item() == pytest.approx(own_only, rel=1e-6)


def test_per_device_groups_keep_in_batch_negatives_within_each_device():
    # Two "devices" of two examples each: with groups=2 a query's in-batch negatives are its own device's documents,
    # so the loss is the mean of the two devices' own in-batch losses; with groups=1 every document competes.
    q, d = torch.cat([Q, Q.flip(0)]), torch.cat([D, D.flip(0)])
    grouped = losses.contrastive_loss(LossInputs.build(q, d), groups=2)
    per_device = [losses.contrastive_loss(LossInputs.build(q[i:i + 2], d[i:i + 2])) for i in (0, 2)]
    assert grouped.item() == pytest.approx(sum(per_device).item() / 2, rel=1e-6)
    everything = losses.contrastive_loss(LossInputs.build(q, d))
    assert everything.item() > grouped.item() + 0.1  # more negatives, a harder task
    with pytest.raises(ValueError, match="equal groups"):
        losses.contrastive_loss(LossInputs.build(q[:3], d[:3]), groups=2)


def test_flops_and_l1_by_hand():
    reps = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    # batch means per term: 2, 0, 1 → 4 + 0 + 1
    assert losses.flops(reps).item() == pytest.approx(5.0)
    # row L1 norms 3 and 3
    assert losses.l1(reps).item() == pytest.approx(3.0)
    # documents (B, 1+N, V) count every document as one batch row
    assert losses.flops(reps.view(1, 2, 3)).item() == pytest.approx(5.0)


def test_margin_mse_by_hand():
    teacher = torch.tensor([[5.0, 1.0], [0.0, 1.0]])
    inputs = LossInputs.build(Q, D, teacher_scores=teacher)
    # student margins 3 - 0 = 3 and 2 - 0 = 2; teacher margins 4 and -1
    assert losses.margin_mse(inputs).item() == pytest.approx(((3 - 4) ** 2 + (2 + 1) ** 2) / 2)


def test_distillation_is_zero_when_student_matches_teacher():
    own = LossInputs.build(Q, D).own_scores
    shifted = own + torch.tensor([[10.0], [-3.0]])  # same margins, different offsets
    inputs = LossInputs.build(Q, D, teacher_scores=shifted)
    assert losses.margin_mse(inputs).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.kl_distillation(inputs).item() == pytest.approx(0.0, abs=1e-6)  # softmax ignores offsets


def test_kl_distillation_by_hand():
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    inputs = LossInputs.build(Q, D, teacher_scores=teacher)
    t = 2.0

    def softmax(row):
        z = sum(math.exp(x / t) for x in row)
        return [math.exp(x / t) / z for x in row]

    expected = 0.0
    for student_row, teacher_row in zip([[3.0, 0.0], [2.0, 0.0]], teacher.tolist()):
        p, q = softmax(teacher_row), softmax(student_row)
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = expected / 2 * t**2
    assert losses.kl_distillation(inputs, temperature=t).item() == pytest.approx(expected, rel=1e-5)


def test_distillation_without_teacher_scores_is_an_error():
    with pytest.raises(ValueError, match="teacher"):
        losses.margin_mse(LossInputs.build(Q, D))


def test_flops_weight_schedules():
    f = losses.flops_weight
    assert [f(1e-3, s, 100) for s in (0, 50, 100, 200)] == pytest.approx([0.0, 2.5e-4, 1e-3, 1e-3])
    assert [f(1e-3, s, 100, "linear") for s in (0, 50, 100, 200)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    assert [f(1e-3, s, 100, "constant") for s in (0, 50, 100)] == pytest.approx([1e-3] * 3)
    assert f(1e-3, 0, 0) == pytest.approx(1e-3)  # no warm-up: the target from the first step
    with pytest.raises(SpladectlError, match="cubic"):
        f(1e-3, 0, 10, "cubic")


def test_active_dims():
    reps = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.5]])
    assert losses.active_dims(reps) == pytest.approx(1.5)
    assert losses.active_dims(reps.view(1, 2, 3)) == pytest.approx(1.5)


def test_losses_are_differentiable():
    q, d = Q.clone().requires_grad_(), D.clone().requires_grad_()
    inputs = LossInputs.build(q, d, teacher_scores=torch.tensor([[5.0, 1.0], [0.0, 1.0]]))
    terms = [losses.contrastive_loss(inputs), losses.flops(q), losses.margin_mse(inputs), losses.kl_distillation(inputs)]
    sum(terms).backward()
    assert q.grad is not None and d.grad is not None and torch.isfinite(q.grad).all()


# ------------------------------------------------------------------------------------ false negatives in a real batch

HONEY = "how do bees make honey"
FALSE_NEGATIVE_EXAMPLES = [
    # two examples of one query, each with its own positive: each positive is a false negative of the other
    (HONEY, "Bees turn nectar into honey by evaporating water in the hive.", "Wasps build paper nests from wood."),
    (HONEY, "Honeybees store concentrated nectar in wax cells.", "Ants farm aphids for their honeydew."),
    # a mined hard negative that is the positive itself
    ("why is the sky blue", "Rayleigh scattering favours short blue wavelengths.",
     "Rayleigh scattering favours short blue wavelengths."),
    ("what makes bread rise", "Yeast releases carbon dioxide that leavens dough.", "Baking soda reacts with acid."),
]
# Columns: 0 P0, 1 N0, 2 P1, 3 N1, 4 P2, 5 N2 (= P2), 6 P3, 7 N3. Targets 0, 2, 4, 6.
KEPT_IN_BATCH = [[0, 1, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]]
KEPT_OWN = [[0, 1], [2, 3], [4], [6, 7]]


@pytest.fixture(scope="module")
def encoded_false_negatives():
    """The examples above as a Collator micro-batch, encoded by splade-tiny: (LossInputs, scores as lists)."""
    from spladectl.batches import Collator
    from spladectl.data import Example
    from spladectl.model import SpladeEncoder

    encoder = SpladeEncoder.from_pretrained("splade-tiny").eval()
    collator = Collator(encoder.tokenizer, n_negatives=1, max_query_length=16, max_doc_length=32)
    batch = collator(list(enumerate(Example(q, p, [n]) for q, p, n in FALSE_NEGATIVE_EXAMPLES)))
    with torch.no_grad():
        query, docs = encoder(batch.query_ids, batch.query_mask), encoder(batch.doc_ids, batch.doc_mask)
    inputs = LossInputs.build(query, docs.view(batch.size, 2, -1), query_keys=batch.query_keys,
                              doc_keys=batch.doc_keys)
    return inputs, inputs.scores.tolist()


def cross_entropy_by_hand(scores: list[list[float]], kept: list[list[int]]) -> float:
    targets = [0, 2, 4, 6]
    rows = [math.log(sum(math.exp(row[c]) for c in cols)) - row[t] for row, cols, t in zip(scores, kept, targets)]
    return sum(rows) / len(rows)


def test_other_positives_of_the_query_and_copies_of_the_positive_are_not_negatives(encoded_false_negatives):
    inputs, scores = encoded_false_negatives
    assert len({round(row[4] - row[5], 6) for row in scores}) == 1  # identical texts, identical scores
    assert losses.contrastive_loss(inputs).item() == pytest.approx(cross_entropy_by_hand(scores, KEPT_IN_BATCH),
                                                                   rel=1e-5)
    assert losses.contrastive_loss(inputs, in_batch=False).item() == pytest.approx(
        cross_entropy_by_hand(scores, KEPT_OWN), rel=1e-5)
    everything = [list(range(8))] * 4
    unmasked = LossInputs.build(inputs.query, inputs.documents)  # no text keys: every column competes, as before
    assert losses.contrastive_loss(unmasked).item() == pytest.approx(cross_entropy_by_hand(scores, everything),
                                                                     rel=1e-5)
    assert losses.contrastive_loss(unmasked).item() > losses.contrastive_loss(inputs).item() + 0.05
    chance, candidates = losses.chance_loss(inputs)
    assert candidates.item() == pytest.approx(7.25)
    assert chance.item() == pytest.approx((3 * math.log(7) + math.log(8)) / 4)


def test_false_negatives_across_device_groups(encoded_false_negatives):
    # Two devices of two examples: the two examples of one query are on device 0, so nothing changes on device 1.
    inputs, scores = encoded_false_negatives
    kept = [[0, 1, 3], [1, 2, 3], [4, 6, 7], [4, 5, 6, 7]]  # the copy of the positive (column 5) only for row 2
    assert losses.contrastive_loss(inputs, groups=2).item() == pytest.approx(cross_entropy_by_hand(scores, kept),
                                                                             rel=1e-5)
