"""Gradient caching (--grad-cache-chunk): the step of the plain path, in two passes over chunks of texts.

Real steps on splade-tiny, batch 8 (8 queries, 16 documents) in chunks of 2. With dropout on, no chunked computation
can match the plain step exactly: dropout draws one mask per forward call, so a batch of 8 and four chunks of 2 see
different masks. The reference there is the plain step whose encoder runs the same chunks inside one graph (the same
masks); with dropout off, it is the unmodified plain step.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from spladectl.engine import Trainer
from spladectl.errors import SpladectlError
from spladectl.hookspecs import hookimpl
from spladectl.plugin_loading import load_plugins

from tiny import config, examples, write_jsonl

CHUNK = 2
# (relative, of the tensor's largest gradient). fp32: the same computation with float sums in another order. Mixed
# precision: the cached path rounds each chunk's weight gradient to bf16/fp16 and adds them in fp32, one graph adds
# them at the weight's shared low-precision copy; they agree to the dtype's precision (2^-8, 2^-11), not better.
# (rtol, atol as a fraction of the tensor's largest gradient, noise floor as a fraction of the model's largest).
# Gradients that are zero but for rounding (the attention key biases: softmax ignores a shift shared by a row) are
# compared against the noise floor. In bf16 that rounding noise depends on the CPU's kernels: with AMX a key bias
# gradient came out near 2e-5 of the largest gradient, the two paths 1e-6 apart.
TOLERANCE = {"32-true": (1e-5, 1e-6, 1e-9), "bf16-mixed": (2e-2, 2e-2, 1e-5), "16-mixed": (3e-3, 3e-3, 1e-7)}




STEP_ONLY = {"step", "epoch", "lr", "grad_norm", "loss_scale", "skipped", "skipped_steps", "micro_batch", "examples",
             "step_seconds", "examples_per_s"}


def step_gradients(trainer: Trainer, batches) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One `train_step` over these micro-batches that leaves the weights and the step count as they were: its loss
    terms, and its gradients as the optimizer receives them (unscaled; clipping is off in these tests)."""
    s, grads = trainer.state, {}
    optimizer = torch.optim.SGD(s.model.parameters(), lr=0.0)
    optimizer.register_step_pre_hook(lambda *_: grads.update(
        {name: p.grad.clone() for name, p in s.model.named_parameters() if p.grad is not None}))
    s.optimizer, step, trainer._pending = optimizer, s.step, list(batches)
    s.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    trainer.config.max_grad_norm = 1e30
    metrics = trainer.train_step(s)
    s.step = step
    return {k: v for k, v in metrics.items() if k not in STEP_ONLY}, grads


class ChunksInOneGraph(torch.nn.Module):
    """The plain step's encoder, running each side in chunks of `chunk` texts in one graph: in the order gradient
    caching encodes them, so dropout draws the same masks."""

    def __init__(self, encoder, chunk: int):
        super().__init__()
        self.encoder, self.chunk = encoder, chunk

    def forward(self, *pairs):
        return tuple(torch.cat([self.encoder(i, m) for i, m in zip(ids.split(self.chunk), mask.split(self.chunk))])
                     for ids, mask in zip(pairs[::2], pairs[1::2]))


def with_teacher(rows):
    return [replace(e, teacher_scores=[12.0 - i, 4.0 + 0.5 * i]) for i, e in enumerate(rows)]


TERMS = {"ranking": {}, "flops+distillation": dict(flops_schedule="constant", lambda_q=5e-3, lambda_d=3e-3)}


@pytest.fixture(scope="module")
def stepper(tmp_path_factory):
    """`stepper(precision, terms, **settings)` → step(chunk, dropout, graph_chunks=False): (logged terms, gradients)
    of one forward and backward of the same batch of 8 from the same random state. One Trainer per setting (loading
    one takes seconds), switched between the plain and the cached path."""
    trainers = {}

    def get(precision: str, terms: str, **settings):
        key = (precision, terms, *sorted(settings.items()))
        if key not in trainers:
            data = with_teacher(examples()) if terms == "flops+distillation" else examples()
            trainer = Trainer(config(tmp_path_factory.mktemp("run"), batch_size=8, precision=precision,
                                     **TERMS[terms], **settings), data, pm=load_plugins(), progress=False)
            if precision == "16-mixed":
                # At the initial 65536 these fp16 gradients overflow (a real run skips that step and halves the
                # scale); a finite scale still shows that both paths scale the loss the same way.
                trainer.state.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
            batches = trainer._step_micro_batches()
            trainer._close_batches()
            trainers[key] = trainer, batches
        trainer, batches = trainers[key]
        plain_encoder = trainer.encoder

        def step(chunk: int | None, *, dropout: bool, graph_chunks: bool = False):
            trainer.config.grad_cache_chunk = chunk
            trainer.encoder = ChunksInOneGraph(trainer.state.model, CHUNK) if graph_chunks else plain_encoder
            trainer.state.model.train(dropout)
            trainer.state.model.zero_grad(set_to_none=True)
            torch.manual_seed(123)
            return step_gradients(trainer, batches)

        step.trainer = trainer
        return step

    return get


def assert_close_step(cached, plain, rtol: float, of_largest: float, noise_floor: float) -> None:
    (cached_terms, cached_grads), (plain_terms, plain_grads) = cached, plain
    assert cached_terms.keys() == plain_terms.keys()
    for name, value in plain_terms.items():
        assert cached_terms[name] == pytest.approx(value, rel=rtol), name
    assert cached_grads.keys() == plain_grads.keys()
    assert all(torch.isfinite(g).all() for g in plain_grads.values())
    assert sum(float(g.abs().sum()) for g in plain_grads.values()) > 0
    largest = max(float(g.abs().max()) for g in plain_grads.values())
    for name, grad in plain_grads.items():
        atol = max(of_largest * float(grad.abs().max()), noise_floor * largest)
        torch.testing.assert_close(cached_grads[name], grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("terms", ["ranking", "flops+distillation"])
def test_one_step_gives_the_loss_and_gradients_of_the_plain_step_with_dropout(stepper, precision, terms):
    step = stepper(precision, terms)
    assert step.trainer.state.model.memory_efficient_head  # SpladeMaxHead, under no_grad and with its graph
    plain = step(None, dropout=True, graph_chunks=True)
    cached = step(CHUNK, dropout=True)
    assert_close_step(cached, plain, *TOLERANCE[precision])
    if terms == "flops+distillation":
        assert {"flops_q", "flops_d", "margin-mse"} <= cached[0].keys()
        assert cached[0]["flops_q"] > 0 and cached[0]["margin-mse"] > 0


def test_with_activation_checkpointing_and_the_full_logits_head(stepper):
    # Both heads (the test above runs the memory-efficient one) and recomputed activations, in both passes.
    step = stepper("32-true", "flops+distillation", memory_efficient_head=False, gradient_checkpointing=True)
    plain = step(None, dropout=True, graph_chunks=True)
    cached = step(CHUNK, dropout=True)
    assert_close_step(cached, plain, *TOLERANCE["32-true"])


def test_dropout_is_really_on_in_these_steps(stepper):
    # Otherwise the test above would not show that both passes draw the same masks.
    step = stepper("32-true", "ranking")
    in_chunks, whole = step(None, dropout=True, graph_chunks=True), step(None, dropout=True)
    assert whole[0]["loss"] != pytest.approx(in_chunks[0]["loss"], rel=1e-4)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_without_dropout_it_matches_the_unchanged_plain_step(stepper, precision):
    step = stepper(precision, "flops+distillation")
    plain, cached = step(None, dropout=False), step(CHUNK, dropout=False)
    assert_close_step(cached, plain, *TOLERANCE[precision])


class NoDropout:
    @hookimpl(wrapper=True)
    def train(self, state):
        state.model.eval()
        return (yield)


class PlainSGD:
    """SGD, whose update is the (clipped) gradient itself. Adam's first steps are about the sign of each gradient
    element, which turns rounding noise in gradients that are zero but for rounding into full-size differences."""

    @hookimpl
    def make_optimizer(self, model, state):
        return torch.optim.SGD(model.parameters(), lr=0.05)


@pytest.mark.parametrize("dropout", [True, False])
def test_three_optimizer_steps_leave_the_weights_of_the_plain_path(tmp_path, pm, registered, dropout):
    registered(PlainSGD())
    if not dropout:
        registered(NoDropout())  # fit() turns dropout on; this plugin turns it off again

    def run(path, chunk):
        settings = dict(batch_size=8, max_steps=3, grad_cache_chunk=chunk, **TERMS["flops+distillation"])
        trainer = Trainer(config(path, **settings), examples(), pm=pm, progress=False)
        if chunk is None and dropout:
            trainer.encoder = ChunksInOneGraph(trainer.state.model, CHUNK)
        initial = {k: v.detach().clone() for k, v in trainer.state.model.state_dict().items()}
        trainer.fit()
        rows = [json.loads(line) for line in (path / "out" / "metrics.jsonl").read_text().splitlines()]
        return initial, {k: v.detach().clone() for k, v in trainer.state.model.state_dict().items()}, rows

    (initial, plain, plain_rows), (_, cached, cached_rows) = run(tmp_path / "plain", None), run(tmp_path / "c", CHUNK)
    assert [r["step"] for r in cached_rows] == [1, 2, 3]
    for mine, reference in zip(cached_rows, plain_rows):
        for key in ("loss", "ranking", "flops_q", "flops_d", "query_dims", "doc_dims", "grad_norm"):
            assert mine[key] == pytest.approx(reference[key], rel=1e-5), (mine["step"], key)
    moved = max(float((plain[k] - initial[k]).abs().max()) for k in plain if plain[k].is_floating_point())
    assert moved > 1e-3  # three real updates, far above the tolerance below
    for name, tensor in plain.items():
        torch.testing.assert_close(cached[name], tensor, rtol=1e-5, atol=1e-7, msg=name)


def saved_activation_bytes(trainer: Trainer, batches) -> list[int]:
    """Bytes of activations autograd saves in each forward call of the trainer's encoder (parameters left out)."""
    params = {p.data_ptr() for p in trainer.state.model.parameters()}
    per_call: list[int] = []
    seen: set[int] = set()

    def pack(tensor):
        if tensor.data_ptr() not in params and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            per_call[-1] += tensor.numel() * tensor.element_size()
        return tensor

    encoder = trainer.encoder
    original = encoder.forward

    def counted(*pairs):
        per_call.append(0)
        seen.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            return original(*pairs)

    encoder.forward = counted
    try:
        step_gradients(trainer, batches)
    finally:
        encoder.forward = original
    return per_call


def test_the_graph_is_held_for_one_chunk_not_the_whole_batch(tmp_path, pm):
    # Memory claims live in benchmarks/grad_cache.py; this counts what autograd keeps alive, which timing cannot blur.
    trainer = Trainer(config(tmp_path, batch_size=8), examples(), pm=pm, progress=False)
    trainer.state.model.train()
    batches = trainer._step_micro_batches()
    trainer._close_batches()
    plain = saved_activation_bytes(trainer, batches)
    trainer.config.grad_cache_chunk = CHUNK
    cached = saved_activation_bytes(trainer, batches)
    assert len(plain) == 1 and len(cached) == 8 // CHUNK + 16 // CHUNK  # one graph per chunk of queries or documents
    # 2 documents of 32 tokens against 8 queries of 16 and 16 documents of 32: a tenth of the tokens.
    assert max(cached) * 5 < plain[0]


def test_a_chunk_below_one_is_an_error_naming_the_option(tmp_path, pm):
    for bad in (0, -3, 1.5):
        with pytest.raises(SpladectlError, match="--grad-cache-chunk"):
            Trainer(config(tmp_path, grad_cache_chunk=bad), examples(), pm=pm, progress=False)


def test_a_chunk_as_large_as_the_batch_says_it_saves_nothing(tmp_path, pm):
    said = []
    Trainer(config(tmp_path, batch_size=4, grad_cache_chunk=8), examples(), pm=pm, progress=False, log=said.append)
    assert any("--grad-cache-chunk 8" in line and "no memory is saved" in line for line in said)


def test_the_cli_and_experiment_files_take_the_option(cli, tmp_path):
    from spladectl.cli.train import train_command
    from spladectl.runs import options
    from spladectl.runs.experiment import load_experiment

    data = write_jsonl(tmp_path / "triples.jsonl")
    result = cli("train", "--data", str(data), "-o", str(tmp_path / "run"), "--grad-cache-chunk", "0", "--max-steps",
                 "1", "--no-progress")
    assert result.exit_code == 2 and "--grad-cache-chunk" in result.output, result.output
    command = train_command()
    path = tmp_path / "exp.toml"
    path.write_text("[base]\nbatch-size = 128\n[grid]\ngrad-cache-chunk = [16, 32]\n")
    exp = load_experiment(path, command)
    assert [p.settings["grad_cache_chunk"] for p in exp.points] == [16, 32]
    assert options.argv_for(command, exp.points[0].settings) == ["--batch-size", "128", "--grad-cache-chunk", "16"]


def test_memory_efficient_caches_gradients_only_past_one_chunk(tmp_path, pm):
    # --memory-efficient: checkpointing always, gradient caching in chunks of 32 texts once a micro-batch has more
    # documents than that (below, caching would only encode every text twice); an explicit chunk is kept. The engine
    # decides once the data is known: asking for more negatives than the data has must not turn caching on.
    from spladectl.engine import MEMORY_EFFICIENT_CHUNK
    from spladectl.request import TrainRequest, make_config

    def trained_as(batch_size, n_negatives=1, **given):
        request = TrainRequest(memory_efficient=True, n_negatives=n_negatives, **given)
        resolved = make_config(request, {"batch_size": batch_size}, profile="cpu")
        resolved.output_dir = str(tmp_path / "out")
        said = []
        config = Trainer(resolved, examples(), pm=pm, progress=False, log=said.append).config
        return config, said

    small, _ = trained_as(MEMORY_EFFICIENT_CHUNK // 2)  # exactly one chunk of documents
    assert small.gradient_checkpointing and small.grad_cache_chunk is None
    large, said = trained_as(MEMORY_EFFICIENT_CHUNK // 2 + 1)
    assert large.gradient_checkpointing and large.grad_cache_chunk == MEMORY_EFFICIENT_CHUNK
    assert not any("--grad-cache-chunk" in line for line in said), said
    assert trained_as(64, grad_cache_chunk=8)[0].grad_cache_chunk == 8
    # 16 × (1 + 3) documents asked for, but the data has one negative per example: 32 documents, one chunk.
    fewer, said = trained_as(MEMORY_EFFICIENT_CHUNK // 2, n_negatives=3)
    assert fewer.n_negatives == 1 and fewer.grad_cache_chunk is None
    assert not any("--grad-cache-chunk" in line for line in said), said
    plain = make_config(TrainRequest(n_negatives=1), {"batch_size": 64}, profile="cpu")
    plain.output_dir = str(tmp_path / "plain")
    assert Trainer(plain, examples(), pm=pm, progress=False).config.grad_cache_chunk is None


def test_memory_efficient_training_runs_with_cached_gradients(cli, tmp_path):
    # A real run past the threshold: 17 examples and one negative each are 34 documents, in chunks of 32.
    out = tmp_path / "run"
    result = cli("train", "--max-steps", "1", "--batch-size", "17", "--memory-efficient", "--no-progress",
                 "--output-dir", str(out), "--runs-root", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    config = (out / "config.toml").read_text()
    assert "grad_cache_chunk = 32" in config and "gradient_checkpointing = true" in config
