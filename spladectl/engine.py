"""The training loop: one SPLADE encoder, automatic mixed precision, gradient accumulation, exact resume.

Read it top to bottom. Precision is chosen once: an autocast context (a no-op for 32-true) and a GradScaler that is
only enabled for 16-mixed, so the step has no precision branches. Everything optional (loss terms beyond the
ranking loss, the optimizer, the schedule, memory tracking, logging sinks) comes from plugins through hookspecs.py.

Distributed (several processes under torchrun, see distributed.py): the model is wrapped in DistributedDataParallel,
and each micro-batch's query and document representations are gathered from every process. Every process then
computes the same loss over the global batch (ranking, FLOPS, distillation, plugin terms alike) and back-propagates
it through its own examples only; the all-reduce of DDP averages those shares, so the backward is scaled by the world
size to make their sum the gradient of the global loss: the update one process with the global batch would make.

After each step the metrics go to a collapse detector (collapse.py); --on-collapse says whether a collapsed run stops,
goes back to a snapshot of a healthy step with half the learning rate, or only warns.

Gradient caching (`grad_cache_chunk`, see `Trainer._cached_backward`) computes the same gradient in two passes over
chunks of texts, so that activation memory is bounded by a chunk rather than by the micro-batch.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.profiler import record_function

from spladectl import checkpoint as ckpt
from spladectl import collapse, distributed
from spladectl.batches import Collator, MicroBatch, micro_batches, micro_batches_per_epoch, tokenizes_ahead
from spladectl.config import TrainConfig
from spladectl.data import Example
from spladectl.data.examples import all_have_teacher_scores, min_negatives
from spladectl.data.cache import recover_staged, staged_directory, write_atomically
from spladectl.distributed import World
from spladectl.errors import CollapseError, NonFiniteError, SpladectlError
from spladectl.losses import LossInputs, chance_loss, contrastive_loss, flops_warmup_steps
from spladectl.model import SpladeEncoder
from spladectl.precision import autocast_dtype, low_precision_matmuls, set_tf32

# Names of the parts of a step in a torch.profiler trace (`spladectl bench --profile-step` adds them up); a
# record_function costs nothing measurable when no profiler is running.
PHASE_DATA, PHASE_FORWARD, PHASE_LOSS, PHASE_BACKWARD = ("spladectl.data", "spladectl.forward", "spladectl.loss",
                                                        "spladectl.backward")


@dataclass
class TrainState:
    """What plugins see of a run. `step` counts optimizer steps completed."""

    config: TrainConfig
    output_dir: Path
    model: SpladeEncoder
    device: torch.device
    total_steps: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    scaler: torch.amp.GradScaler | None = None
    step: int = 0
    epoch: int = 0
    position: int = 0  # micro-batches of the current epoch already consumed
    skipped_steps: int = 0
    examples_seen: int = 0
    split_factor: int = 1  # each loaded micro-batch runs as this many pieces after an out-of-memory retry
    rank: int = 0
    world_size: int = 1
    last_metrics: dict[str, Any] = field(default_factory=dict)
    best_metric: float | None = None
    best_step: int | None = None  # the step of the model in OUTPUT/best
    # Set by a plugin's on_evaluate (a tuner's pruner) to end training after this evaluation, as early stopping does;
    # the text says why and is logged.
    stop_requested: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # room for plugins to keep per-run state

    @property
    def is_main_process(self) -> bool:
        """Rank 0: the process that writes metrics, checkpoints and the model (always true in a single process)."""
        return self.rank == 0

    def all_gather_object(self, obj: Any) -> list[Any]:
        """`obj` from every process, in rank order (`[obj]` in a single process). A collective: every process must
        call it at the same point of the run, as a hook that runs on every step does."""
        return distributed.gather_objects(obj) if self.world_size > 1 else [obj]


# Texts per chunk of gradient caching under --memory-efficient (when a micro-batch has more documents): memory then
# follows the chunk, not --batch-size. bf16, SciFact, batch 128 (Xeon with AMX): 1.19x the step time of checkpointing
# alone at half its peak RSS; the largest batch within 2 GiB went from 176 to 896 (docs/benchmarks.md).
MEMORY_EFFICIENT_CHUNK = 32


def _check_grad_cache(config: TrainConfig) -> None:
    chunk = config.grad_cache_chunk
    if chunk is None:
        return
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise SpladectlError(f"--grad-cache-chunk (grad_cache_chunk): expected a number of texts >= 1, got {chunk!r}",
                             hint="leave it unset to encode each micro-batch at once")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def plan_steps(config: TrainConfig, n_examples: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    global_batch = config.batch_size * config.world_size
    per_epoch = math.ceil(micro_batches_per_epoch(n_examples, global_batch) / config.grad_accum)
    total = config.max_steps if config.max_steps is not None else per_epoch * config.epochs
    return per_epoch, total


class _PairEncoder(torch.nn.Module):
    """Everything encoded before one backward in one forward call, the unit DistributedDataParallel expects:
    `forward(ids, mask, ids, mask, ...)` → one representation per (ids, mask) pair. A plain step passes queries and
    documents together; gradient caching passes one chunk of texts at a time."""

    def __init__(self, encoder: SpladeEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, *pairs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.encoder(ids, mask) for ids, mask in zip(pairs[::2], pairs[1::2]))


class Trainer:
    """Owns one run: build everything from the config, then `fit()`.

    `world` is this process's place in a distributed run (see distributed.py); its process group must already be
    started (`distributed.start`). Only rank 0 logs, shows progress and writes files.
    """

    def __init__(self, config: TrainConfig, examples: Sequence[Example], *, pm, log: Callable[[str], None] = print,
                 eval_fn: Callable[[SpladeEncoder], dict[str, float]] | None = None, progress: bool = True,
                 world: World | None = None):
        if not examples:
            raise SpladectlError("the training data holds no examples")
        collapse.check_policy(config.on_collapse)
        if config.on_nan not in ON_NAN:
            raise SpladectlError(f"--on-nan {config.on_nan!r}: expected one of {', '.join(ON_NAN)}")
        self.nan_rollbacks = 0
        self.world = world or World()
        if config.world_size != self.world.world_size:
            raise SpladectlError(f"world_size: the configuration says {config.world_size} process(es), and this run "
                                 f"has {self.world.world_size}")
        _check_grad_cache(config)
        if config.memory_efficient:
            config.gradient_checkpointing = True
        self.config = config
        self.examples = examples
        self.pm = pm
        self.log = log if self.world.is_main else (lambda message: None)
        self.eval_fn = eval_fn
        self.progress = progress and self.world.is_main
        self.output_dir = Path(config.output_dir)
        self.device = distributed.device_for(self.world, torch.device(config.device).type) \
            if self.world.distributed else torch.device(config.device)
        set_tf32(self.device.type, config.tf32)

        seed_everything(config.seed)
        model = SpladeEncoder.from_pretrained(
            config.model, memory_efficient_head=config.memory_efficient_head,
            gradient_checkpointing=config.gradient_checkpointing,
        ).to(self.device)
        if self.device.type == "cpu":
            model.use_cpu_dropout()
        # Loading leaves a model in eval mode (no dropout); a Trainer's model trains from the start, so that step()
        # called on its own (spladectl bench, the benchmarks) runs the step fit() runs.
        model.train()
        if config.compile:
            problem = model.compile_encoder()
            if problem is not None:
                self.log(f"note: --compile: torch cannot compile on this machine ({problem}); training uncompiled")
        if self.world.distributed:
            # Every process starts from the same weights (DDP also broadcasts rank 0's); dropout draws its own masks.
            seed_everything(config.seed + 7919 * self.world.rank)
        model.max_query_length, model.max_doc_length = config.max_query_length, config.max_doc_length
        fewest = min_negatives(examples)
        if config.n_negatives > fewest:
            # The documents tensor must be rectangular; cycling a single negative would only repeat it.
            self.log(f"note: using {fewest} hard negative(s) per example (the data has no more for some rows)")
            config.n_negatives = fewest
        texts = config.batch_size * (1 + config.n_negatives)
        if config.memory_efficient and config.grad_cache_chunk is None and texts > MEMORY_EFFICIENT_CHUNK:
            config.grad_cache_chunk = MEMORY_EFFICIENT_CHUNK
        if config.grad_cache_chunk is not None and config.grad_cache_chunk >= texts:
            self.log(f"note: --grad-cache-chunk {config.grad_cache_chunk} is not below the {texts} documents of a "
                     f"micro-batch: every text is encoded twice and no memory is saved")
        self.collator = Collator(model.tokenizer, n_negatives=config.n_negatives, seed=config.seed,
                                 max_query_length=config.max_query_length, max_doc_length=config.max_doc_length)
        steps_per_epoch, total = plan_steps(config, len(examples))
        self.state = TrainState(config=config, output_dir=self.output_dir, model=model, device=self.device,
                                total_steps=total, steps_per_epoch=steps_per_epoch, rank=self.world.rank,
                                world_size=self.world.world_size)
        self.encoder: torch.nn.Module = _PairEncoder(model)
        if self.world.distributed:
            self.encoder = distributed.wrap_model(self.encoder, self.device)
        # Teacher scores are gathered only when every example has them, so that all processes agree to gather.
        self._gather_teacher = all_have_teacher_scores(examples)
        self.state.optimizer = pm.hook.make_optimizer(model=model, state=self.state)
        self.state.scheduler = pm.hook.make_lr_scheduler(optimizer=self.state.optimizer, total_steps=total,
                                                         state=self.state)
        self.state.scaler = torch.amp.GradScaler(self.device.type, enabled=(config.precision == "16-mixed"))
        dtype = autocast_dtype(config.precision)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else nullcontext
        self.low_precision_matmuls = lambda: low_precision_matmuls(self.device.type, dtype)  # forward and backward
        self._batches = None
        self._pending: list[MicroBatch] | None = None  # this step's micro-batches, until it is done
        self._throughput: list[tuple[int, float]] = []  # (examples, seconds) of recent steps
        self._last_evaluation: tuple[int, dict[str, float]] | None = None  # (step, metrics) of --eval-every's last
        self._loss_terms: set[str] = set()  # the names of the loss's terms, for the final metrics
        # An LR warm-up starting near zero leaves the model near where it started, possibly near chance level.
        self.detector = collapse.CollapseDetector(config.collapse_patience,
                                                  chance_after=int(round(config.warmup_ratio * total)))
        self.collapse: collapse.Collapse | None = None  # the last collapse detected
        self.collapse_events: list[str] = []  # what the policy did about each, for the run's record
        self.backoffs = 0
        # (state, self.backoffs when taken) at the end of windows of collapse_patience healthy steps, the newest two:
        # a backoff goes to the older one, whose next window was healthy too, since a decline can begin before its
        # signals do.
        self._snapshots: list[tuple[ckpt.Snapshot, int]] = []

    # ----------------------------------------------------------------------------------------------- resume
    def resume(self, path: Path) -> None:
        state = ckpt.load_training_state(path)
        saved = {"world_size": 1, **state.get("config", {})}  # older checkpoints are all single-process ones
        for key in ("model", "batch_size", "grad_accum", "world_size", "n_negatives", "seed"):
            if key in saved and saved[key] != getattr(self.config, key):
                raise SpladectlError(
                    f"{path}: checkpoint was written with {key}={saved[key]!r}, this run has {getattr(self.config, key)!r}",
                    hint="resume with the same settings, or start a new output directory",
                )
        # Through transformers, which knows the checkpoint's key names (it may write legacy names back).
        saved_model = SpladeEncoder.from_pretrained(str(path), memory_efficient_head=False).model
        try:
            self.state.model.model.load_state_dict(saved_model.state_dict())
        except RuntimeError as exc:
            raise SpladectlError(f"{path}: model weights do not match {self.config.model} ({exc})") from exc
        try:
            self.state.optimizer.load_state_dict(state["optimizer"])
            self.state.scheduler.load_state_dict(state["scheduler"])
            self.state.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise SpladectlError(f"{path}: optimizer/scheduler state does not match this run ({exc})") from exc
        s = self.state
        s.step, s.epoch, s.position = state["step"], state["epoch"], state["position"]
        s.skipped_steps, s.examples_seen = state["skipped_steps"], state["examples_seen"]
        s.best_metric, s.split_factor = state.get("best_metric"), state.get("split_factor", 1)
        s.best_step, self.backoffs = state.get("best_step"), state.get("collapse_backoffs", 0)
        self.nan_rollbacks = state.get("nan_rollbacks", 0)
        per_rank = state.get("rng_per_rank")
        ckpt.set_rng_state(per_rank[self.world.rank] if per_rank else state["rng"])
        self.log(f"resumed from {path} at step {s.step} (epoch {s.epoch}, micro-batch {s.position})")

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint (rank 0; the others hand it their RNG states, so every process is called); its path."""
        s = self.state
        rng = s.all_gather_object(ckpt.rng_state())
        if not s.is_main_process:
            return None
        payload = {
            "epoch": s.epoch, "position": s.position, "skipped_steps": s.skipped_steps,
            "examples_seen": s.examples_seen, "best_metric": s.best_metric, "split_factor": s.split_factor,
            "best_step": s.best_step, "collapse_backoffs": self.backoffs, "nan_rollbacks": self.nan_rollbacks,
            "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
            "scaler": s.scaler.state_dict(), "rng": rng[0], "config": self.config.to_dict(),
        }
        if len(rng) > 1:  # each process resumes its own dropout stream
            payload["rng_per_rank"] = rng
        path = ckpt.save_checkpoint(self.output_dir / "checkpoints", s.step, encoder=s.model, state=payload,
                                    keep_last=self.config.keep_last)
        return path

    # ----------------------------------------------------------------------------------------------- data
    def _next_micro_batch(self) -> MicroBatch:
        with record_function(PHASE_DATA):
            return self._next_micro_batch_now()

    def _next_micro_batch_now(self) -> MicroBatch:
        s, c = self.state, self.config
        while True:
            if self._batches is None:
                self._batches = micro_batches(self.examples, self.collator, batch_size=c.batch_size, seed=c.seed,
                                              epoch=s.epoch, start=s.position, workers=c.dataloader_workers,
                                              world_size=self.world.world_size, rank=self.world.rank,
                                              prefetch=tokenizes_ahead(self.device.type),
                                              pin_memory=self.device.type == "cuda")
            batch = next(self._batches, None)
            if batch is not None:
                s.position += 1
                return batch
            self._close_batches()
            s.epoch, s.position = s.epoch + 1, 0

    def _close_batches(self) -> None:
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()
        self._batches = None

    def _step_micro_batches(self) -> list[MicroBatch]:
        # An epoch's last optimizer step may have fewer micro-batches; the loss is divided by how many it has.
        s, c = self.state, self.config
        per_epoch = micro_batches_per_epoch(len(self.examples), c.batch_size * self.world.world_size)
        left_in_epoch = per_epoch - s.position
        if left_in_epoch == 0:
            left_in_epoch = per_epoch
        return [self._next_micro_batch() for _ in range(min(c.grad_accum, left_in_epoch))]

    # ----------------------------------------------------------------------------------------------- the step
    def train_step(self, state: TrainState) -> dict[str, Any]:
        """One optimizer step, top to bottom: each micro-batch forward and backward, then clip and update.

        Runs inside plugins' `train_step` wrappers (`fit` calls it through them). Gradient caching replaces the plain
        forward and backward of a micro-batch with `_cached_backward`, which computes the same gradient.
        """
        s, c, optimizer, scaler = state, self.config, state.optimizer, state.scaler
        started = time.perf_counter()
        pieces = self._step_pieces()
        share = self.world.world_size / len(pieces)  # each piece's share of the loss; the world size: see above
        totals: dict[str, torch.Tensor] = {}
        with self.low_precision_matmuls():
            for i, batch in enumerate(pieces):
                batch, sync = batch.to(self.device), i == len(pieces) - 1  # DDP all-reduces on the last piece only
                if c.grad_cache_chunk:
                    inputs, loss, terms = self._cached_backward(batch, share=share, sync=sync)
                else:
                    with distributed.synchronising(self.encoder, sync=sync):
                        with self.autocast(), record_function(PHASE_FORWARD):
                            query, docs = self.encoder(batch.query_ids, batch.query_mask, batch.doc_ids,
                                                       batch.doc_mask)
                        with record_function(PHASE_LOSS):
                            inputs = self._loss_inputs(query.float(), docs.float(), batch)
                            loss, terms = self._loss(inputs)
                        with record_function(PHASE_BACKWARD):
                            scaler.scale(loss * share).backward()
                self._add_to_step_metrics(totals, inputs, loss, terms, share=1 / len(pieces))

        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), c.max_grad_norm)
        # 16-mixed leaves a non-finite step to its loss scaler (an overflow is what it exists for); elsewhere --on-nan.
        bad = [] if scaler.is_enabled() else _non_finite({**totals, "gradient": grad_norm})
        if bad and c.on_nan == "stop":
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"step {s.step + 1}: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not finite; no update was "
                "made and training stopped (--on-nan stop)",
                hint="--on-nan skip drops such steps and counts them, --on-nan rollback goes back to the last "
                     f"checkpoint with half the learning rate; a lower --lr (now {c.lr:g}) often cures it")
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        if not bad:
            scaler.step(optimizer)  # skipped by the scaler when a gradient overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]
        s.scheduler.step()

        skipped = (scaler.is_enabled() and scaler.get_scale() < scale) or bool(bad)
        examples = sum(piece.size for piece in pieces) * self.world.world_size
        s.step, s.skipped_steps, s.examples_seen = s.step + 1, s.skipped_steps + int(skipped), s.examples_seen + examples
        self._pending = None  # the step is done: the next one takes new micro-batches
        seconds = time.perf_counter() - started
        self._throughput = (self._throughput + [(examples, seconds)])[-20:]  # recent steps: the first is slow
        metrics = {name: float(v) for name, v in totals.items()}  # the one host sync per step
        metrics.update({
            "step": s.step, "epoch": s.epoch, "lr": lr, "grad_norm": float(grad_norm), "loss_scale": scale,
            "skipped": bool(skipped), "skipped_steps": s.skipped_steps, "micro_batch": pieces[0].size,
            "examples": examples, "step_seconds": seconds,
            "examples_per_s": sum(e for e, _ in self._throughput) / max(sum(t for _, t in self._throughput), 1e-9),
        })
        if bad:
            metrics["non_finite"] = bad
        return metrics

    def step(self) -> dict[str, Any]:
        """One optimizer step inside plugins' `train_step` wrappers, as `fit` runs each (for callers that step a
        Trainer themselves, such as `spladectl bench`)."""
        return self.pm.hook.train_step.call_extra([self.train_step], {"state": self.state})

    def _step_pieces(self) -> list[MicroBatch]:
        """This step's micro-batches, each split in `split_factor` pieces; the same ones again when the step is
        redone after running out of memory."""
        if self._pending is None:
            self._pending = self._step_micro_batches()
        return [piece for batch in self._pending for piece in batch.split(self.state.split_factor)]

    def _add_to_step_metrics(self, totals: dict[str, torch.Tensor], inputs: LossInputs, loss: torch.Tensor,
                             terms: dict[str, torch.Tensor], *, share: float) -> None:
        """Average the loss, its terms and the sparsity over the step's pieces, on device (no host sync)."""
        chance, candidates = chance_loss(inputs, **self._ranking_options())
        self._loss_terms.update(terms)
        logged = {"loss": loss, **terms, "query_dims": _active(inputs.query), "doc_dims": _active(inputs.documents),
                  "chance_loss": chance, "candidates": candidates}
        for name, value in logged.items():
            totals[name] = totals.get(name, 0.0) + value.detach() * share

    def _cached_backward(self, batch: MicroBatch, *, share: float, sync: bool):
        """The gradient of the plain forward and backward in `train_step`, with the activations of one chunk of texts
        alive at a time (gradient caching, Gao et al. 2021).

        Why: the plain step keeps every text's activations until its backward, so its memory grows with the
        micro-batch, and splitting the micro-batch (accumulation) takes in-batch negatives away. The loss needs only
        the representations (B × V each), not the activations behind them: so they are computed chunk by chunk
        without a graph, the full loss over them is back-propagated only as far as them, and then each chunk is
        encoded again with its graph and back-propagated with its slice of those gradients. Activation memory then
        scales with the chunk, not the batch, for one extra forward pass. Dropout must draw the same masks in both
        passes, so each chunk's second pass starts from the random state its first pass started from.
        """
        chunk = self.config.grad_cache_chunk
        pieces = [*zip(batch.query_ids.split(chunk), batch.query_mask.split(chunk)),
                  *zip(batch.doc_ids.split(chunk), batch.doc_mask.split(chunk))]
        rng_states, reps = [], []
        # Straight to the model, not through DDP: a pass without a graph has no gradients to synchronise.
        with torch.no_grad(), self.autocast():
            for ids, mask in pieces:
                rng_states.append(_rng_state(self.device))
                reps.append(self.state.model(ids, mask).float())
        n_query = -(-batch.query_ids.shape[0] // chunk)
        query, docs = torch.cat(reps[:n_query]).requires_grad_(), torch.cat(reps[n_query:]).requires_grad_()
        reps.clear()  # one copy of the batch's representations is enough
        inputs = self._loss_inputs(query, docs, batch)  # in a distributed run, only the local rows are these leaves
        loss, terms = self._loss(inputs)
        # Scaled as the plain step scales its loss, so 16-mixed sees the same (scaled) gradients.
        query_grad, docs_grad = torch.autograd.grad(self.state.scaler.scale(loss * share), (query, docs),
                                                    allow_unused=True, materialize_grads=True)
        grads = [*query_grad.split(chunk), *docs_grad.split(chunk)]
        last = len(pieces) - 1
        for k, ((ids, mask), rng, grad) in enumerate(zip(pieces, rng_states, grads)):
            # DDP accumulates locally until the step's very last re-encoding, whose backward all-reduces the sum.
            with distributed.synchronising(self.encoder, sync=sync and k == last):
                _set_rng_state(self.device, rng)
                with self.autocast():
                    (rep,) = self.encoder(ids, mask)
                torch.autograd.backward(rep.float(), grad)
        return inputs, loss, terms

    def _loss(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's loss and its named terms: the ranking loss and every plugin's terms."""
        terms = {"ranking": contrastive_loss(inputs, **self._ranking_options())}
        for plugin_terms in self.pm.hook.loss_terms(inputs=inputs, state=self.state):
            for name, value in (plugin_terms or {}).items():
                terms[name] = terms[name] + value if name in terms else value
        return sum(terms.values()), terms

    def _ranking_options(self) -> dict[str, Any]:
        """Which documents a query is ranked against: in-batch or its own, across devices or within its own."""
        groups = 1 if self.config.cross_device_negatives else self.world.world_size
        return {"in_batch": self.config.in_batch_negatives, "groups": groups}

    def _loss_inputs(self, query: torch.Tensor, docs: torch.Tensor, batch: MicroBatch) -> LossInputs:
        """The loss's view of a micro-batch: this process's examples, or in a distributed run every process's."""
        teacher, query_keys, doc_keys = batch.teacher_scores, batch.query_keys, batch.doc_keys
        local_rows = None
        if self.world.distributed:
            query, docs = distributed.gather(query), distributed.gather(docs)
            teacher = distributed.gather(teacher) if self._gather_teacher else None
            query_keys, doc_keys = distributed.gather(query_keys), distributed.gather(doc_keys)
            local_rows = slice(self.world.rank * batch.size, (self.world.rank + 1) * batch.size)
        return LossInputs.build(query, docs.view(query.shape[0], -1, docs.shape[-1]), teacher, local_rows,
                                query_keys=query_keys, doc_keys=doc_keys)

    def _recover_from_oom(self, micro_batch: int, exc: BaseException) -> None:
        """Halve the micro-batch and double the accumulation (same effective batch), or stop at micro-batch 1."""
        s = self.state
        s.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.world.distributed:
            # The other processes are waiting in this step's collectives; a retry with other shapes would not match.
            raise SpladectlError(
                f"out of memory on rank {self.world.rank} ({self.device}) at micro-batch {micro_batch} per device "
                f"({str(exc).splitlines()[0]})",
                hint="lower --batch-size (it is per device) and raise --grad-accum to keep the effective batch, or "
                     "add --memory-efficient",
            ) from exc
        if micro_batch <= 1:
            raise SpladectlError(
                f"out of memory at micro-batch 1 on {self.device} ({str(exc).splitlines()[0]})",
                hint="lower --max-doc-length, add --memory-efficient, or use a device with more memory",
            ) from exc
        s.split_factor *= 2
        smaller = -(-micro_batch // 2)
        self.log(f"out of memory at micro-batch {micro_batch}: retrying step {s.step + 1} with micro-batch "
                 f"{smaller} and {self.config.grad_accum * s.split_factor} accumulation steps")

    # ----------------------------------------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train to the end, then evaluate the model training ended with; plugins' `train` wrappers run around it."""
        self.state.model.train()  # before the wrappers: one may want the model otherwise (dropout off in a test)
        return self.pm.hook.train.call_extra([self._fit], {"state": self.state})

    def _fit(self, state: TrainState) -> dict[str, Any]:
        s, c = state, self.config
        main = s.is_main_process
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if not s.step:  # a fresh run in a reused directory must not inherit old evaluations
                (self.output_dir / "eval.jsonl").unlink(missing_ok=True)
            elif (self.output_dir / "eval.jsonl").exists():  # a resumed run redoes what came after its checkpoint
                _keep_lines_until(self.output_dir / "eval.jsonl", s.step)
            ckpt.remove_partial(self.output_dir / "checkpoints")  # what a killed run was writing
            for model_dir in ("best", "final"):
                recover_staged(self.output_dir / model_dir)
        metrics_file = _open_metrics(self.output_dir / "metrics.jsonl", resumed_at=s.step) if main else None
        if c.on_collapse == "backoff":
            self._snapshots = [(ckpt.Snapshot.take(s), self.backoffs)]
        if c.on_nan == "rollback":
            self._start = ckpt.Snapshot.take(s)  # where a rollback goes when no checkpoint has been written yet
        patience_left = c.early_stopping_patience
        started = time.perf_counter()
        bar = _progress(s.total_steps, s.step, enabled=self.progress)
        try:
            while s.step < s.total_steps:
                try:
                    metrics = self.pm.hook.train_step.call_extra([self.train_step], {"state": s})
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    self._recover_from_oom(self._step_pieces()[0].size, exc)
                    continue
                s.last_metrics = metrics
                if metrics_file is not None:
                    metrics_file.write(json.dumps(metrics) + "\n")
                    metrics_file.flush()
                if metrics.get("non_finite") and c.on_nan == "rollback":
                    self._roll_back(metrics)
                    metrics_file = self._rewind_outputs(metrics_file)
                    bar.n = s.step
                    continue
                if self._watch_collapse(metrics):
                    metrics_file = self._rewind_outputs(metrics_file)
                    bar.n = s.step
                    continue
                bar.update(1)
                bar.set_postfix(_postfix(metrics), refresh=False)
                if c.eval_every and self.eval_fn and s.step % c.eval_every == 0:
                    stop = False
                    if main:  # the others wait for rank 0's verdict in the broadcast below
                        improved = self._evaluate()
                        if patience_left is not None:
                            patience_left = c.early_stopping_patience if improved else patience_left - 1
                            stop = patience_left <= 0
                            if stop:
                                self.log(f"early stopping at step {s.step}: no {c.eval_metric} gain in "
                                         f"{c.early_stopping_patience} evaluations")
                        if s.stop_requested and not stop:
                            stop = True
                            self.log(f"stopping at step {s.step}: {s.stop_requested}")
                    if self.world.distributed:
                        stop = distributed.broadcast_object(stop)
                    if stop:
                        break
                if c.save_every and s.step % c.save_every == 0 and s.step < s.total_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            # Shut the prefetch thread or the DataLoader's workers down now: a worker forked later (another Trainer
            # in this process) would inherit this iterator and fail noisily when it is garbage-collected there.
            self._close_batches()
            if metrics_file is not None:
                metrics_file.close()
        self.save_checkpoint()
        final = self.output_dir / "final"
        if main:
            with staged_directory(final) as staging:  # never a half-written final model, even if killed
                s.model.save_pretrained(staging, extra_metadata={"steps": s.step, "precision": c.precision})
        seconds = round(time.perf_counter() - started, 2)  # training alone, not the evaluation that follows
        evaluation = self._evaluate_final() if main and self.eval_fn else None
        final_metrics = {k: v for k, v in s.last_metrics.items() if k in ("loss", "query_dims", "doc_dims")
                         or k in self._loss_terms}
        final_metrics.update({k: v for k, v in ((evaluation or {}).get("metrics") or {}).items()
                              if "@" in k or k in ("avg_query_dims", "avg_doc_dims", "avg_flops")})
        return {"status": "finished", "steps": s.step, "skipped_steps": s.skipped_steps, "final": str(final),
                "best": self.best_model(), "collapsed": self.collapse.describe() if self.detector.collapsed else None,
                "collapse_events": list(self.collapse_events), "last_metrics": s.last_metrics,
                "evaluation": evaluation, "final_metrics": final_metrics, "summary": [], "train_seconds": seconds,
                "stopped": s.stop_requested}

    def _evaluate(self) -> bool:
        """Evaluate during training (--eval-every); True when the model is the best so far (saved to OUTPUT/best)."""
        s, c = self.state, self.config
        s.model.eval()
        metrics = self.eval_fn(s.model)
        s.model.train()
        self._last_evaluation = (s.step, metrics)
        self.pm.hook.on_evaluate(state=s, metrics=metrics, final=False)
        value = metrics.get(c.eval_metric)
        self.log(f"step {s.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        collapsed = self.detector.collapsed  # only with --on-collapse warn does a collapsed run get this far
        with open(self.output_dir / "eval.jsonl", "a") as fh:
            fh.write(json.dumps({"step": s.step, **metrics, **({"collapsed": True} if collapsed else {})}) + "\n")
        if value is None or collapsed or (s.best_metric is not None and value <= s.best_metric):
            return False
        s.best_metric, s.best_step = value, s.step
        with staged_directory(self.output_dir / "best") as staging:
            s.model.save_pretrained(staging, extra_metadata={"step": s.step, c.eval_metric: value})
        return True

    def _evaluate_final(self) -> dict[str, Any]:
        """{"model": "final" | "best" | None, "metrics"}: the quality of the model training ended with, or of the best
        one when that one collapsed (--on-collapse warn); nothing when it collapsed and there is no best one."""
        s = self.state
        if not self.detector.collapsed:
            model, which = s.model, "final"
            self.log("held-out quality after training …")
        elif s.best_step is not None:
            model, which = SpladeEncoder.from_pretrained(str(self.output_dir / "best")), "best"
            model.max_query_length, model.max_doc_length = s.model.max_query_length, s.model.max_doc_length
            self.log(f"held-out quality after training, of the best model (step {s.best_step}; the final one "
                     "collapsed) …")
        else:
            self.log("held-out quality after training: not measured, the final model is a collapsed one")
            return {"model": None, "metrics": None}
        if which == "final" and self._last_evaluation is not None and self._last_evaluation[0] == s.step:
            metrics = self._last_evaluation[1]  # --eval-every has just measured this very model
        else:
            was_training = model.training
            model.eval()
            metrics = self.eval_fn(model)
            model.train(was_training)
        self.pm.hook.on_evaluate(state=s, metrics=metrics, final=True)
        return {"model": which, "metrics": metrics}

    def best_model(self) -> dict[str, Any] | None:
        """{"path", "step", "metric", "value"} of OUTPUT/best, the best model the evaluations found; None without."""
        s = self.state
        if s.best_step is None:
            return None
        return {"path": str(self.output_dir / "best"), "step": s.best_step, "metric": self.config.eval_metric,
                "value": s.best_metric}

    # ----------------------------------------------------------------------------------------------- collapse
    def _watch_collapse(self, metrics: dict[str, Any]) -> bool:
        """Apply --on-collapse to this step; True when the run went back to an earlier step (backoff)."""
        c = self.config
        found = self.detector.update(metrics)
        if c.on_collapse == "warn":
            if found is not None:
                self.collapse = found
                if not self.collapse_events:
                    self.collapse_events.append(found.describe())
                    self.log(f"warning: {found.describe()}; training goes on (--on-collapse warn)")
            return False
        # Every process computes the same global metrics, yet all must take the same turn here: rank 0 decides.
        found, healthy = distributed.broadcast_object((found, self.detector.healthy))
        if found is None:
            if c.on_collapse == "backoff" and healthy and healthy % c.collapse_patience == 0:
                self._snapshots = [*self._snapshots, (ckpt.Snapshot.take(self.state), self.backoffs)][-2:]
            return False
        self.collapse = found
        if c.on_collapse == "backoff" and self.backoffs < collapse.MAX_BACKOFFS:
            self._back_off(found)
            return True
        raise self._collapse_error(found)

    def _back_off(self, found: collapse.Collapse) -> None:
        s, c = self.state, self.config
        self.backoffs += 1
        self._snapshots = self._snapshots[:1]  # the newer one belongs to the steps being abandoned
        snapshot, backoffs_then = self._snapshots[0]
        snapshot.restore(s)
        self._went_back(found.describe(), 0.5 ** (self.backoffs - backoffs_then),
                        f"backoff {self.backoffs} of {collapse.MAX_BACKOFFS}", 0.5 ** self.backoffs)

    def _roll_back(self, metrics: dict[str, Any]) -> None:
        """--on-nan rollback: back to the newest checkpoint (the run's start without one), half the learning rate."""
        s, c = self.state, self.config
        self.nan_rollbacks += 1
        what = f"step {metrics['step']}: {', '.join(metrics['non_finite'])} not finite"
        if self.nan_rollbacks > collapse.MAX_BACKOFFS:
            raise NonFiniteError(f"{what} again after {collapse.MAX_BACKOFFS} rollbacks with a halved learning rate; "
                                 "training stopped", hint=f"lower --lr (now {c.lr:g}) or look for the cause in the data")
        rollbacks, found = self.nan_rollbacks, ckpt.step_dirs(self.output_dir / "checkpoints")
        if found:
            self.resume(found[-1][1])  # its learning rate already carries the rollbacks before it was written
        else:
            self._start.restore(s)
            self.nan_rollbacks = 0
        then, self.nan_rollbacks = self.nan_rollbacks, rollbacks
        self._went_back(what, 0.5 ** (rollbacks - then), f"rollback {rollbacks} of {collapse.MAX_BACKOFFS}",
                        0.5 ** rollbacks)

    def _went_back(self, why: str, factor: float, count: str, peak_factor: float) -> None:
        """The rest of going back to an earlier state: the learning rate times `factor`, fresh detector and data."""
        s = self.state
        _scale_learning_rate(s.optimizer, s.scheduler, factor)
        self.detector.reset()
        self._close_batches()  # the data position went back with the rest
        message = (f"{why}; back to step {s.step} with the learning rate halved (peak "
                   f"{self.config.lr * peak_factor:.3g}), {count}")
        self.collapse_events.append(message)
        self.log(f"warning: {message}")

    def _rewind_outputs(self, metrics_file):
        """After a backoff: the metrics lines and checkpoints of the abandoned steps go; those steps are redone."""
        if metrics_file is None:
            return None
        metrics_file.close()
        ckpt.drop_after(self.output_dir / "checkpoints", self.state.step)
        return _open_metrics(self.output_dir / "metrics.jsonl", resumed_at=self.state.step)

    def _collapse_error(self, found: collapse.Collapse) -> CollapseError:
        c = self.config
        tried = f" after {self.backoffs} backoff(s) with a halved learning rate" if self.backoffs else ""
        message = f"{found.describe()}{tried}; no final model was written"
        best = self.best_model()
        if best is not None:
            message += (f"; the best model (step {best['step']}, {best['metric']} {best['value']:.4f}) is in "
                        f"{best['path']}")
        hint = (f"lower --lr (now {c.lr:g}), lower --lambda-q/--lambda-d (now {c.lambda_q:g}/{c.lambda_d:g}), or "
                f"lengthen --flops-warmup-steps (now {flops_warmup_steps(c.flops_warmup_steps, self.state.total_steps)})")
        if c.on_collapse == "stop":
            hint += "; --on-collapse backoff goes back to the last healthy step with half the learning rate"
        return CollapseError(message, hint=hint)


def _non_finite(values: dict[str, torch.Tensor]) -> list[str]:
    """The names of the values that are NaN or infinite, at the cost of one host sync."""
    names = list(values)
    tensors = [torch.as_tensor(values[n]).detach().float().reshape(()) for n in names]
    finite = torch.isfinite(torch.stack([t.to(tensors[0].device) for t in tensors])).tolist()
    return [name for name, ok in zip(names, finite) if not ok]


ON_NAN = ("stop", "skip", "rollback")


def _scale_learning_rate(optimizer: torch.optim.Optimizer, scheduler: Any, factor: float) -> None:
    """Multiply the learning rate now and for the rest of the schedule: schedulers derive it from `base_lrs`."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generators dropout draws from on `device`: the CPU's, and the accelerator's own on CUDA or MPS."""
    accelerator = getattr(torch, device.type) if device.type in ("cuda", "mps") else None
    return torch.get_rng_state(), accelerator.get_rng_state(device) if accelerator is not None else None


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    cpu, own = state
    torch.set_rng_state(cpu)
    if own is not None:
        getattr(torch, device.type).set_rng_state(own, device)


def _active(reps: torch.Tensor) -> torch.Tensor:
    """Average non-zero dimensions per representation, kept on device (no host sync inside the step)."""
    return (reps.reshape(-1, reps.shape[-1]) > 0).sum(-1).float().mean()


def is_out_of_memory(exc: BaseException) -> bool:
    # CUDA raises torch.OutOfMemoryError; CPU and MPS allocators raise RuntimeErrors with these words.
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
    )


def _open_metrics(path: Path, *, resumed_at: int):
    """metrics.jsonl for appending; on resume, drop the lines of steps after the checkpoint (they will be redone)."""
    if resumed_at and path.exists():
        _keep_lines_until(path, resumed_at)
    return open(path, "a" if resumed_at else "w")


def _keep_lines_until(path: Path, step: int) -> None:
    """Rewrite a JSON-lines log (whole or not at all) with the lines of steps up to `step`. Its last line may be cut
    short by a kill in the middle of a write: that one is dropped; a broken line before it is a corrupt file."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                continue
            raise SpladectlError(f"{path}:{number}: not a JSON line; this run's log is damaged",
                                 hint="fix or remove that line, then resume again") from None
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    write_atomically(path, lambda handle: handle.write("".join(line + "\n" for line in kept).encode()))


def _progress(total: int, initial: int, *, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


def _postfix(m: dict[str, Any]) -> dict[str, str]:
    out = {"loss": f"{m['loss']:.4f}", "lr": f"{m['lr']:.2e}", "ex/s": f"{m['examples_per_s']:.1f}"}
    if m.get("loss_scale", 1.0) != 1.0:
        out["scale"] = f"{m['loss_scale']:.0f}"
    if "memory_gb" in m:
        out["mem"] = f"{m['memory_gb']:.2f}G"
    return out
