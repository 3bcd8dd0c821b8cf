"""Real training steps on splade-tiny: every precision, the GradScaler's overflow handling, accumulation, resume."""

from __future__ import annotations

import json

import pytest
import torch

from spladectl.engine import Trainer
from spladectl.errors import CheckpointError
from spladectl.hookspecs import hookimpl

from tiny import config, examples




def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.state.model.state_dict().items()}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_short_run_in_each_precision(tmp_path, pm, precision):
    trainer = Trainer(config(tmp_path, precision=precision), examples(), pm=pm, progress=False)
    before = weights(trainer)
    result = trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert {"ranking", "lr", "grad_norm", "loss_scale", "query_dims", "doc_dims", "lambda_q", "lambda_d",
            "examples_per_s", "memory_gb"} <= set(rows[0])
    changed = [k for k, v in weights(trainer).items() if not torch.equal(v, before[k])]
    assert changed, "no parameter changed after two optimizer steps"
    # fp32 master weights whatever the precision
    assert all(p.dtype == torch.float32 for p in trainer.state.model.parameters())
    if precision == "16-mixed":
        assert rows[0]["loss_scale"] == 65536.0
    else:
        assert rows[0]["loss_scale"] == 1.0
    from transformers import AutoModelForMaskedLM

    reloaded = AutoModelForMaskedLM.from_pretrained(result["final"])
    assert reloaded.config.vocab_size == 30522


class InfGradientOnce:
    """Makes the first optimizer step's gradients overflow, as an fp16 overflow would."""

    def __init__(self):
        self.calls = 0

    @hookimpl
    def loss_terms(self, inputs, state):
        self.calls += 1
        if state.step == 0:
            return {"overflow": inputs.query.sum() * float("inf")}
        return None


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path, pm, registered):
    registered(InfGradientOnce())
    trainer = Trainer(config(tmp_path, precision="16-mixed", max_steps=3), examples(), pm=pm, progress=False)
    initial = weights(trainer)
    first_step_weights = {}

    class Snapshot:
        @hookimpl(wrapper=True)
        def train_step(self, state):
            metrics = yield
            if state.step == 1:
                first_step_weights.update(weights(trainer))
            return metrics

    registered(Snapshot())
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["skipped"] is True and rows[0]["loss_scale"] == 65536.0
    # Later steps may overflow for real in fp16 at this scale; each overflow halves the scale, nothing else moves it.
    for before, after in zip(rows, rows[1:]):
        assert after["loss_scale"] == before["loss_scale"] / (2 if before["skipped"] else 1)
    assert trainer.state.skipped_steps == sum(r["skipped"] for r in rows) == rows[-1]["skipped_steps"]
    assert all(torch.equal(first_step_weights[k], v) for k, v in initial.items()), "a skipped step changed weights"


class DropoutOffPlainSGD:
    """Dropout off so both runs see the same network; plain SGD so the update is the gradient itself (Adam's first
    step is nearly sign(gradient), which would turn rounding noise in tiny gradients into full-size differences)."""

    @hookimpl(wrapper=True)
    def train(self, state):
        state.model.eval()
        return (yield)

    @hookimpl
    def make_optimizer(self, model, state):
        return torch.optim.SGD(model.parameters(), lr=1.0)


def test_accumulation_matches_one_big_batch(tmp_path, pm, registered):
    # The in-batch loss and the FLOPS term couple the examples of a micro-batch; without them the loss is a mean of
    # per-example terms, so 4 × 1 and 2 × 2 must give the same update.
    registered(DropoutOffPlainSGD())
    common = dict(max_steps=1, in_batch_negatives=False, lambda_q=0.0, lambda_d=0.0, scheduler="constant",
                  max_grad_norm=1e9)
    one = Trainer(config(tmp_path / "a", batch_size=4, grad_accum=1, **common), examples(4), pm=pm, progress=False)
    initial = weights(one)
    one.fit()
    two = Trainer(config(tmp_path / "b", batch_size=2, grad_accum=2, **common), examples(4), pm=pm, progress=False)
    two.fit()
    a, b = weights(one), weights(two)
    update_a = torch.cat([(a[k] - initial[k]).flatten() for k in a])
    update_b = torch.cat([(b[k] - initial[k]).flatten() for k in a])
    assert update_a.abs().max() > 1e-3  # a real update, far above the tolerance below
    torch.testing.assert_close(update_b, update_a, rtol=1e-3, atol=1e-5)


class KilledAfterCheckpoint:
    """Stops the run right after its first checkpoint (save_every=3), as a kill -INT at that moment would."""

    @hookimpl(wrapper=True)
    def train_step(self, state):
        if state.step == 3 and (state.output_dir / "checkpoints").is_dir():
            raise KeyboardInterrupt
        return (yield)


def test_resume_is_bit_exact(tmp_path, pm, registered):
    # 6 steps at batch 2 over 8 examples crosses an epoch boundary, so the data position is exercised too.
    straight = Trainer(config(tmp_path / "s", max_steps=6, batch_size=2), examples(), pm=pm, progress=False)
    straight.fit()
    killer = registered(KilledAfterCheckpoint())
    first = Trainer(config(tmp_path / "r", max_steps=6, batch_size=2, save_every=3), examples(), pm=pm,
                    progress=False)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    pm.unregister(killer)
    from spladectl.checkpoint import find_checkpoint

    second = Trainer(config(tmp_path / "r", max_steps=6, batch_size=2), examples(), pm=pm, progress=False)
    second.resume(find_checkpoint("latest", tmp_path / "r" / "out"))
    assert second.state.step == 3
    second.fit()
    a, b = weights(straight), weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses_straight = [json.loads(x)["loss"] for x in (tmp_path / "s/out/metrics.jsonl").read_text().splitlines()]
    losses_resumed = [json.loads(x)["loss"] for x in (tmp_path / "r/out/metrics.jsonl").read_text().splitlines()]
    assert losses_straight == losses_resumed


class ExtraTerm:
    @hookimpl
    def loss_terms(self, inputs, state):
        return {"extra": 10.0 * inputs.query.abs().mean()}


def test_plugin_loss_term_changes_the_loss(tmp_path, pm, registered):
    base = Trainer(config(tmp_path / "a", max_steps=1), examples(), pm=pm, progress=False)
    base.fit()
    registered(ExtraTerm())
    extra = Trainer(config(tmp_path / "b", max_steps=1), examples(), pm=pm, progress=False)
    extra.fit()
    m_base, m_extra = base.state.last_metrics, extra.state.last_metrics
    assert "extra" in m_extra and "extra" not in m_base
    assert m_extra["ranking"] == pytest.approx(m_base["ranking"], rel=1e-6)
    assert m_extra["loss"] == pytest.approx(m_base["loss"] + m_extra["extra"], rel=1e-5)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, pm):
    from spladectl.checkpoint import STATE_FILE, find_checkpoint
    from spladectl.errors import CheckpointError

    trainer = Trainer(config(tmp_path, max_steps=1), examples(), pm=pm, progress=False)
    trainer.fit()
    path = find_checkpoint("latest", tmp_path / "out")
    (path / STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=STATE_FILE):
        Trainer(config(tmp_path, max_steps=2), examples(), pm=pm, progress=False).resume(path)


def test_checkpoint_mismatch_is_a_clear_error(tmp_path, pm):
    from spladectl.checkpoint import find_checkpoint
    from spladectl.errors import SpladectlError

    Trainer(config(tmp_path, max_steps=1), examples(), pm=pm, progress=False).fit()
    other = Trainer(config(tmp_path, max_steps=2, batch_size=2), examples(), pm=pm, progress=False)
    with pytest.raises(SpladectlError, match="batch_size"):
        other.resume(find_checkpoint("latest", tmp_path / "out"))


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, pm, monkeypatch):
    from spladectl import checkpoint

    trainer = Trainer(config(tmp_path, max_steps=1), examples(), pm=pm, progress=False)
    trainer.fit()
    good = checkpoint.find_checkpoint("latest", tmp_path / "out")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    trainer.state.step = 2
    with pytest.raises(CheckpointError, match=r"step-2: the checkpoint could not be written \(disk full\); the previous "
                                              r"checkpoint \(step-1\) is intact"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert checkpoint.find_checkpoint("latest", tmp_path / "out") == good
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step-1"]  # the partial one is gone
    assert checkpoint.load_training_state(good)["step"] == 1


class OutOfMemoryAbove:
    """Raises the allocator's out-of-memory error for micro-batches larger than `limit` (an injected OOM)."""

    def __init__(self, limit: int):
        self.limit = limit

    @hookimpl
    def loss_terms(self, inputs, state):
        if inputs.query.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"injected: out of memory for a micro-batch of {inputs.query.shape[0]}")
        return None


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(tmp_path, pm, registered):
    registered(OutOfMemoryAbove(limit=1))
    said = []
    trainer = Trainer(config(tmp_path, batch_size=4, max_steps=2), examples(), pm=pm, progress=False, log=said.append)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["micro_batch"] for r in rows] == [1, 1]
    assert [r["examples"] for r in rows] == [4, 4]
    assert trainer.state.split_factor == 4
    assert any("out of memory at micro-batch 4" in line for line in said)
    assert any("out of memory at micro-batch 2" in line for line in said)


def test_out_of_memory_at_micro_batch_one_stops_clearly(tmp_path, pm, registered):
    from spladectl.errors import SpladectlError

    registered(OutOfMemoryAbove(limit=0))
    trainer = Trainer(config(tmp_path, batch_size=2, max_steps=1), examples(), pm=pm, progress=False,
                      log=lambda _: None)
    with pytest.raises(SpladectlError, match="out of memory at micro-batch 1"):
        trainer.fit()


def test_a_trainer_steps_its_model_in_training_mode_without_fit(tmp_path, pm):
    # step() on its own is what spladectl bench and the benchmarks time; loading leaves a model in eval mode, where a
    # step would run without dropout and time a different step from fit()'s.
    trainer = Trainer(config(tmp_path, max_steps=2), examples(), pm=pm, progress=False)
    trainer.step()
    assert all(m.training for m in trainer.state.model.modules())


def test_on_a_cpu_device_batches_are_tokenized_in_the_training_thread(tmp_path, pm):
    # A prefetch thread competes with the step's own threads for the cores on a CPU device, which cost more than the
    # tokenizing it hid; accelerators keep it (tests/test_batches.py covers the thread itself).
    from spladectl.batches import Prefetcher

    trainer = Trainer(config(tmp_path, max_steps=2), examples(), pm=pm, progress=False)
    trainer.step()
    assert trainer._batches is not None and not isinstance(trainer._batches, Prefetcher)


def test_tf32_follows_the_profile_on_cuda_and_is_left_alone_elsewhere():
    # No GPU here: the device type is given, and the flags are torch's process-wide ones, which exist without CUDA.
    from spladectl.precision import set_tf32

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        set_tf32("cuda", True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32("cpu", False)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32("cuda", False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_adamw_is_fused_where_the_device_has_the_kernel_and_foreach_elsewhere(tmp_path, pm, monkeypatch):
    trainer = Trainer(config(tmp_path, max_steps=1), examples(), pm=pm, progress=False)
    assert trainer.state.optimizer.defaults["fused"]  # the CPU has a fused AdamW, as CUDA does
    # A device without a fused kernel cannot exist here: AdamW is made to refuse fused=True the way torch does.
    real = torch.optim.AdamW

    def without_fused(params, **kwargs):
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", without_fused)
    other = Trainer(config(tmp_path / "b", max_steps=1), examples(), pm=pm, progress=False)
    assert other.state.optimizer.defaults["foreach"] and not other.state.optimizer.defaults.get("fused")
    other.step()
