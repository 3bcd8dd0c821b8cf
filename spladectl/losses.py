"""SPLADE training losses as pure tensor functions: ranking, distillation, sparsity regularisers and their schedule.

Shapes: B examples per micro-batch, each with 1 positive and N hard-negative documents, vocabulary V. The ranking
scores of a micro-batch are every query against every document of the micro-batch (in-batch negatives); the target
of query i is its own positive, column i * (1 + N). In a distributed run the micro-batch is the global one: every
process's examples, gathered (see engine.py), so every term here is computed over the global batch.

A query with several positives appears in several examples; when two of them share a micro-batch, each one's positive
would be a negative of the other: contradictory targets. The ranking loss therefore leaves out, for each query, every
document whose text is a positive of the same query (by text keys, see batches.text_key), except its own target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spladectl.errors import SpladectlError

FLOPS_SCHEDULES = ("quadratic", "linear", "constant")


@dataclass
class LossInputs:
    """Everything a loss term sees for one micro-batch.

    query (B, V), documents (B, 1+N, V) positive first, scores (B, B*(1+N)) fp32 query·document for every document
    of the micro-batch, teacher_scores (B, 1+N) or None: a teacher's scores of each query's own documents.
    In a distributed run B counts the examples of all processes, and `local_rows` are this process's (the only rows
    whose representations carry gradients here); None in a single process.
    query_keys (B,) and doc_keys (B*(1+N),), int64, identify the texts (equal text, equal key); None when unknown,
    and then no document is left out of the ranking loss as a false negative.
    """

    query: torch.Tensor
    documents: torch.Tensor
    scores: torch.Tensor
    teacher_scores: torch.Tensor | None = None
    local_rows: slice | None = None
    query_keys: torch.Tensor | None = None
    doc_keys: torch.Tensor | None = None

    @classmethod
    def build(
        cls, query: torch.Tensor, documents: torch.Tensor, teacher_scores: torch.Tensor | None = None,
        local_rows: slice | None = None, *, query_keys: torch.Tensor | None = None,
        doc_keys: torch.Tensor | None = None,
    ) -> "LossInputs":
        """Compute the in-batch scores (in fp32, whatever the representations' dtype) and check the shapes."""
        if query.dim() != 2 or documents.dim() != 3 or documents.shape[0] != query.shape[0] \
                or documents.shape[2] != query.shape[1]:
            raise ValueError(f"expected query (B, V) and documents (B, 1+N, V), got {tuple(query.shape)} and "
                             f"{tuple(documents.shape)}")
        if teacher_scores is not None and tuple(teacher_scores.shape) != tuple(documents.shape[:2]):
            raise ValueError(f"teacher_scores must be (B, 1+N) = {tuple(documents.shape[:2])}, "
                             f"got {tuple(teacher_scores.shape)}")
        if (query_keys is None) != (doc_keys is None) or (query_keys is not None and (
                tuple(query_keys.shape) != (query.shape[0],)
                or tuple(doc_keys.shape) != (documents.shape[0] * documents.shape[1],))):
            raise ValueError("query_keys (B,) and doc_keys (B*(1+N),) go together")
        flat_docs = documents.reshape(-1, documents.shape[-1])
        scores = query.float() @ flat_docs.float().T
        return cls(query, documents, scores, teacher_scores, local_rows, query_keys, doc_keys)

    @property
    def docs_per_query(self) -> int:
        """1 + N: the positive and the hard negatives of each example."""
        return self.documents.shape[1]

    @property
    def targets(self) -> torch.Tensor:
        """(B,) column of each query's positive in `scores`."""
        batch = self.scores.shape[0]
        return torch.arange(batch, device=self.scores.device) * self.docs_per_query

    @property
    def own_scores(self) -> torch.Tensor:
        """(B, 1+N) student scores of each query with its own documents, positive first (gathered from `scores`)."""
        cols = self.targets.unsqueeze(1) + torch.arange(self.docs_per_query, device=self.scores.device)
        return self.scores.gather(1, cols)


def candidates(inputs: LossInputs, *, in_batch: bool = True, groups: int = 1) -> torch.Tensor:
    """(B, B*(1+N)) bool: the documents each query's positive competes with in the ranking loss, the positive included.

    All documents of the micro-batch (in-batch + hard negatives); with `in_batch=False`, its own documents only.
    `groups` > 1 splits the batch into that many equal consecutive groups of examples, and a query's in-batch
    negatives come from its own group only: the examples of one device, when cross-device negatives are off.
    Either way, the false negatives (`false_negatives`) are left out.
    """
    batch, columns = inputs.scores.shape
    device = inputs.scores.device
    query_group = torch.arange(batch, device=device)
    doc_group = torch.arange(columns, device=device) // inputs.docs_per_query  # the example each column belongs to
    if in_batch:
        if batch % groups:
            raise ValueError(f"a batch of {batch} examples does not split into {groups} equal groups")
        query_group, doc_group = query_group // (batch // groups), doc_group // (batch // groups)
    keep = query_group.unsqueeze(1) == doc_group.unsqueeze(0)
    fake = false_negatives(inputs)
    return keep if fake is None else keep & ~fake


def false_negatives(inputs: LossInputs) -> torch.Tensor | None:
    """(B, B*(1+N)) bool: the documents whose text is a positive of query i, in this example or another example of
    the same query, other than query i's own target; None without text keys."""
    if inputs.query_keys is None:
        return None
    positive_keys = inputs.doc_keys[inputs.targets]  # (B,)
    same_query = inputs.query_keys.unsqueeze(1) == inputs.query_keys.unsqueeze(0)  # (B, B), the diagonal included
    is_positive_of = positive_keys.unsqueeze(1) == inputs.doc_keys.unsqueeze(0)  # (B, columns): example j's positive
    fake = (same_query.float() @ is_positive_of.float()) > 0
    fake[torch.arange(fake.shape[0], device=fake.device), inputs.targets] = False
    return fake


def contrastive_loss(inputs: LossInputs, *, in_batch: bool = True, groups: int = 1) -> torch.Tensor:
    """Cross-entropy of each query's positive against its `candidates` (see there for `in_batch` and `groups`)."""
    keep = candidates(inputs, in_batch=in_batch, groups=groups)
    return F.cross_entropy(inputs.scores.masked_fill(~keep, float("-inf")), inputs.targets)


def chance_loss(inputs: LossInputs, *, in_batch: bool = True, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(the contrastive loss of scores that rank nothing, the mean number of candidates per query): with equal
    scores each query's loss is ln(its candidates), so the first is their mean (see collapse.py)."""
    counts = candidates(inputs, in_batch=in_batch, groups=groups).sum(dim=1).float()
    return counts.log().mean(), counts.mean()


def flops(reps: torch.Tensor) -> torch.Tensor:
    """FLOPS regulariser (Paria et al. 2020, as in naver/splade): sum over terms of the squared mean activation.

    `reps` (..., V); all leading dimensions count as the batch.
    """
    flat = reps.reshape(-1, reps.shape[-1]).float()
    return torch.sum(torch.mean(torch.abs(flat), dim=0) ** 2)


def l1(reps: torch.Tensor) -> torch.Tensor:
    """L1 regulariser: mean over the batch of each representation's L1 norm."""
    flat = reps.reshape(-1, reps.shape[-1]).float()
    return torch.sum(torch.abs(flat), dim=-1).mean()


def _teacher(inputs: LossInputs) -> torch.Tensor:
    if inputs.teacher_scores is None:
        raise ValueError("this loss needs teacher scores, and the micro-batch has none")
    return inputs.teacher_scores.to(device=inputs.scores.device, dtype=torch.float32)


def margin_mse(inputs: LossInputs) -> torch.Tensor:
    """MarginMSE (Hofstätter et al. 2020): MSE between the student's and teacher's margins positive − negative,
    over each example's own hard negatives."""
    student, teacher = inputs.own_scores, _teacher(inputs)
    return F.mse_loss(student[:, :1] - student[:, 1:], teacher[:, :1] - teacher[:, 1:])


def kl_distillation(inputs: LossInputs, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) of the softmax over each example's own documents at `temperature`, averaged over the
    batch and scaled by temperature² (so its gradients keep their size when the temperature changes)."""
    student = F.log_softmax(inputs.own_scores / temperature, dim=1)
    teacher = F.log_softmax(_teacher(inputs) / temperature, dim=1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def flops_warmup_steps(configured: int | None, total_steps: int) -> int:
    """The λ ramp's length: `flops_warmup_steps` when set, else a third of the run."""
    # naver/splade ramps over 50k steps; a short run needs the ramp to end well before it does.
    return configured if configured is not None else max(1, total_steps // 3)


def flops_weight(target: float, step: int, warmup_steps: int, schedule: str = "quadratic") -> float:
    """λ at optimizer step `step`: ramps from 0 to `target` over `warmup_steps`, then stays at `target`.

    quadratic: target × min(1, step/warmup)² (naver/splade), linear: target × min(1, step/warmup), constant: target.
    """
    if schedule not in FLOPS_SCHEDULES:
        raise SpladectlError(
            f"flops_schedule: unknown schedule {schedule!r}; expected one of {', '.join(FLOPS_SCHEDULES)}"
        )
    if schedule == "constant" or warmup_steps <= 0:
        return float(target)
    ratio = min(1.0, max(0, step) / warmup_steps)
    return float(target) * (ratio**2 if schedule == "quadratic" else ratio)


def active_dims(reps: torch.Tensor) -> float:
    """Average number of non-zero terms per representation (`reps` (..., V))."""
    flat = reps.reshape(-1, reps.shape[-1])
    if flat.shape[0] == 0:
        return 0.0
    return float((flat != 0).sum(dim=1).float().mean())
