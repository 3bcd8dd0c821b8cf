"""`--compile`: torch.compile of the encoder, and training going on uncompiled where torch cannot compile."""

from __future__ import annotations

import json

import pytest
import torch

from spladectl.model import SpladeEncoder, compiler_problem


def _texts(encoder):
    batch = encoder.tokenize(["sparse retrieval with learned weights", "a query"], max_length=16)
    return batch["input_ids"], batch["attention_mask"]


@pytest.fixture
def no_compiler():
    # A real failure, not a stand-in: inductor is pointed at a C++ compiler that does not exist.
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        yield


def test_without_a_compiler_the_encoder_stays_as_it_was(no_compiler):
    assert "compiler" in compiler_problem("cpu").lower()
    encoder = SpladeEncoder.from_pretrained("splade-tiny")
    before = encoder(*_texts(encoder))
    problem = encoder.compile_encoder()
    assert problem is not None and "C++" in problem
    assert encoder.model.base_model._compiled_call_impl is None
    assert torch.equal(encoder(*_texts(encoder)), before)


def test_train_with_compile_and_no_compiler_trains_uncompiled_with_a_note(cli, tmp_path, no_compiler):
    out = tmp_path / "run"
    result = cli("train", "--max-steps", "2", "--batch-size", "2", "--compile", "--no-progress", "--json",
                 "--output-dir", str(out), "--runs-root", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    assert "--compile: torch cannot compile on this machine" in result.output
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.compiles
def test_compiled_encoder_trains_like_the_eager_one(tmp_path):
    # Compiling takes about a minute on a 2-core CPU: selected with `pytest -m compiles`. Inductor draws random
    # numbers its own way unless told to use torch's (fallback_random), which lets dropout match here.
    import torch._inductor.config as inductor_config

    eager = SpladeEncoder.from_pretrained("splade-tiny")
    compiled = SpladeEncoder.from_pretrained("splade-tiny")
    assert compiled.compile_encoder() is None
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their names
    ids, mask = _texts(eager)
    with inductor_config.patch({"fallback_random": True}):
        for training in (False, True):
            eager.train(training)
            compiled.train(training)
            torch.manual_seed(0)
            ref = eager(ids, mask)
            torch.manual_seed(0)
            out = compiled(ids, mask)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        ref.sum().backward()
        out.sum().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        if a.grad is not None:
            # Relative to the gradient's scale: sums run in another order, so tiny entries may differ more; the
            # floor covers gradients that are round-off around an exact zero (the attention's key biases).
            assert (b.grad - a.grad).abs().max() <= 1e-5 * a.grad.abs().max().clamp_min(0.1), name
    compiled.save_pretrained(tmp_path / "saved")
    reloaded = SpladeEncoder.from_pretrained(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "splade_config.json").read_text())["pooling"] == "max"
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), compiled.state_dict().values()))
