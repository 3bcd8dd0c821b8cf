"""spladectl's own BERT (spladectl.bert) against transformers' BertForMaskedLM on splade-tiny: the same outputs and
gradients, checkpoints each reads from the other, and transformers for every checkpoint it does not implement."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from spladectl import bert
from spladectl.dropout import keep_mask
from spladectl.engine import Trainer
from spladectl.model import SpladeEncoder, resolve_model_path
from spladectl.plugin_loading import load_plugins

from tiny import config, examples

TEXTS = ["sparse retrieval with learned term weights", "a short one",
         "bm25 ranks documents by term statistics and document length normalisation"]


@pytest.fixture(scope="module")
def pair():
    """(transformers, spladectl.bert) encoders of splade-tiny, both with the CPU dropout, which draws its masks in
    the same order in both: with one seed, they drop the same elements."""
    theirs = SpladeEncoder.from_pretrained("splade-tiny", native=False)
    ours = SpladeEncoder.from_pretrained("splade-tiny")
    assert not theirs.native and ours.native
    assert theirs.use_cpu_dropout() and ours.use_cpu_dropout()
    return theirs, ours


def _step(encoder: SpladeEncoder, batch, dtype: torch.dtype | None, seed: int = 0):
    """(representations, gradient of every named parameter) of one forward and backward in training mode."""
    encoder.train()
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        reps = encoder(**batch)
    weights = torch.linspace(0.0, 1.0, reps.shape[1])
    (reps * weights).sum().backward()
    return reps.detach(), {name: p.grad.clone() for name, p in encoder.model.named_parameters()}


def test_evaluation_logits_equal_transformers(pair):
    theirs, ours = pair
    batch = theirs.tokenize(TEXTS, 32)
    theirs.eval(), ours.eval()
    with torch.no_grad():
        expected = theirs.model(**batch).logits
        got = ours.model(**batch).logits
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(**batch), theirs(**batch), rtol=1e-5, atol=1e-5)


def test_training_step_in_float32_equals_transformers(pair):
    theirs, ours = pair
    batch = theirs.tokenize(TEXTS, 32)
    reps_theirs, grads_theirs = _step(theirs, batch, None)
    reps_ours, grads_ours = _step(ours, batch, None)
    torch.testing.assert_close(reps_ours, reps_theirs, rtol=1e-5, atol=1e-6)
    assert grads_ours.keys() == grads_theirs.keys()
    for name, grad in grads_theirs.items():
        torch.testing.assert_close(grads_ours[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    # A different seed drops other elements: the equality above is not that of two dropout-free runs.
    assert not torch.equal(_step(ours, batch, None, seed=1)[0], reps_ours)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_precision_step_is_as_close_to_float32_as_transformers(pair, dtype):
    theirs, ours = pair
    batch = theirs.tokenize(TEXTS, 32)
    reps_ref, grads_ref = _step(ours, batch, None)
    reps_theirs, grads_theirs = _step(theirs, batch, dtype)
    reps_ours, grads_ours = _step(ours, batch, dtype)

    def error(x, ref):
        return ((x.float() - ref).norm() / ref.norm()).item()

    assert error(reps_ours, reps_ref) <= 1.5 * error(reps_theirs, reps_ref) + 1e-6
    total_ours = sum(error(grads_ours[n], g) for n, g in grads_ref.items() if g.norm() > 0)
    total_theirs = sum(error(grads_theirs[n], g) for n, g in grads_ref.items() if g.norm() > 0)
    assert total_ours <= 1.5 * total_theirs, (total_ours, total_theirs)


def test_attention_equals_the_written_out_formula():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    keys_valid = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    keys_valid[1, ..., 4:] = False
    p = 0.25
    torch.manual_seed(5)
    ours = bert.attention(q, k, v, keys_valid, p)
    grad = torch.randn_like(ours)
    got = torch.autograd.grad(ours, (q, k, v), grad)

    torch.manual_seed(5)
    keep = keep_mask((2, 3, 7, 7), p)
    scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    probs = torch.softmax(scores.masked_fill(~keys_valid, float("-inf")), dim=-1)
    expected = (torch.where(keep, probs, 0.0) / (1 - p)) @ v
    torch.testing.assert_close(ours, expected)
    for g, e in zip(got, torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(g, e)
    assert not keep.all() and keep.any()


def test_gradient_checkpointing_keeps_values_and_gradients(pair):
    _, ours = pair
    batch = ours.tokenize(TEXTS, 32)
    plain = _step(ours, batch, None)
    ours.model.set_gradient_checkpointing(True)
    try:
        checkpointed = _step(ours, batch, None)
    finally:
        ours.model.set_gradient_checkpointing(False)
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    for name, grad in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_saved_checkpoint_is_read_by_transformers_and_back(pair, tmp_path):
    from transformers import AutoModelForMaskedLM

    _, ours = pair
    with torch.no_grad():  # a trained model: weights away from the checkpoint's
        for param in ours.model.parameters():
            param.add_(torch.randn_like(param) * 1e-3)
    try:
        ours.save_pretrained(tmp_path)
        loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
        again = bert.load(tmp_path)
        assert again is not None
        batch = ours.tokenize(TEXTS, 32)
        ours.eval()
        with torch.no_grad():
            expected = ours.model(**batch).logits
            torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(again(**batch).logits, expected, rtol=0, atol=0)
        assert again.get_output_embeddings().weight is again.bert.embeddings.word_embeddings.weight
    finally:
        fresh = bert.load(resolve_model_path("splade-tiny"))
        ours.model.load_state_dict(fresh.state_dict())


def _copy_tiny(tmp_path, edit_config=None, edit_weights=None):
    src = resolve_model_path("splade-tiny")
    out = tmp_path / "model"
    shutil.copytree(src, out)
    if edit_config:
        config = json.loads((out / "config.json").read_text())
        edit_config(config)
        (out / "config.json").write_text(json.dumps(config))
    if edit_weights:
        weights = load_file(str(out / "model.safetensors"))
        edit_weights(weights)
        save_file(weights, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("case", ["relu", "relative positions", "missing weight", "bf16 weights", "not bert"])
def test_checkpoints_it_does_not_implement_go_to_transformers(tmp_path, case):
    edits = {
        "relu": ({"hidden_act": "relu"}, None),
        "relative positions": ({"position_embedding_type": "relative_key"}, None),
        "missing weight": (None, lambda w: w.pop("cls.predictions.transform.dense.bias")),
        "bf16 weights": (None, lambda w: w.update({k: v.bfloat16() for k, v in w.items()})),
        "not bert": ({"model_type": "roberta", "architectures": ["RobertaForMaskedLM"]}, None),
    }
    config_edit, weights_edit = edits[case]
    path = _copy_tiny(tmp_path, edit_config=(lambda c: c.update(config_edit)) if config_edit else None,
                      edit_weights=weights_edit)
    assert bert.load(path) is None
    if case in ("relu", "missing weight"):  # transformers itself loads these; the encoder then runs on it
        encoder = SpladeEncoder.from_pretrained(str(path))
        assert not encoder.native


def test_training_does_not_import_transformers_modeling_code():
    # The memory this saves is the point of spladectl.bert: sympy, scipy and torch.distributed.tensor come with it.
    script = (
        "import sys\n"
        "from spladectl.model import SpladeEncoder\n"
        "e = SpladeEncoder.from_pretrained('splade-tiny'); e.use_cpu_dropout(); e.train()\n"
        "e(**e.tokenize(['a query', 'a document'], 16)).sum().backward()\n"
        "print(sorted(m for m in ('transformers.modeling_utils', 'sympy', 'scipy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr[-2000:]


def test_a_training_run_gives_the_losses_of_transformers(tmp_path, monkeypatch):
    losses = {}
    for which in ("spladectl.bert", "transformers"):
        if which == "transformers":
            monkeypatch.setattr(bert, "load", lambda path: None)
        out = tmp_path / which
        trainer = Trainer(config(out), examples(), pm=load_plugins(), progress=False)
        assert trainer.state.model.native == (which == "spladectl.bert")
        trainer.fit()
        rows = [json.loads(line) for line in (out / "out" / "metrics.jsonl").read_text().splitlines()]
        losses[which] = [row["loss"] for row in rows]
    # Same initial weights, same dropout masks (loading draws nothing from the seeded generator), float32.
    assert len(losses["transformers"]) >= 2
    assert losses["spladectl.bert"] == pytest.approx(losses["transformers"], rel=1e-5)
