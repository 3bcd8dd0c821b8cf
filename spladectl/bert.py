"""BERT with its masked-LM head in plain torch, read from and written as a transformers checkpoint.

splade-tiny and most SPLADE models are `BertForMaskedLM`s. This module is that model with the same parameter names
and the same outputs, for two reasons measured on splade-tiny (2-core Xeon with AMX, bf16-mixed, batch 16):

- Memory. Importing transformers' modeling code brings sympy, scipy.optimize and torch.distributed.tensor with it:
  about 125 MB resident, which a training process never uses.
- Passes over memory. Each of transformers' query, key and value projections casts the float32 residual stream to
  bf16 on its own and saves its own copy; here one projection of three times the width does it once. Its attention
  saves the probabilities before and after dropout; `_CpuAttention` saves them once and recomputes the rest.

`load` takes a checkpoint only when it describes it exactly (model type, activation, position embeddings, every
weight present in float32); anything else is left to transformers by the caller. `save_pretrained` writes what
transformers reads back (config.json and model.safetensors with its key names).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from spladectl.dropout import fast_dropout, keep_mask

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Keys a pre-training checkpoint has and a masked-LM model ignores, as transformers does.
_IGNORED_PREFIXES = ("bert.pooler.", "cls.seq_relationship.")
# Keys that are other names of tied parameters: the decoder is the word embeddings and the head's bias.
_TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


@dataclass(frozen=True)
class BertShape:
    """What the model's config.json says about its shape; attribute names as transformers spells them."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_dropout_prob: float
    attention_probs_dropout_prob: float


def shape_of(config: dict[str, Any]) -> BertShape | None:
    """The shape of a config.json this module implements exactly, or None (then transformers loads the model)."""
    plain = (config.get("model_type") == "bert"
             and config.get("architectures") in (None, ["BertForMaskedLM"])
             and config.get("hidden_act", "gelu") == "gelu"
             and config.get("position_embedding_type", "absolute") == "absolute"
             and not config.get("is_decoder") and not config.get("add_cross_attention")
             and config.get("tie_word_embeddings", True)
             and config.get("dtype", config.get("torch_dtype", "float32")) in ("float32", None))
    if not plain:
        return None
    try:
        shape = BertShape(**{name: type(default)(config[name]) for name, default in _DEFAULTS.items()})
    except (KeyError, TypeError, ValueError):
        return None
    return shape if shape.hidden_size % shape.num_attention_heads == 0 else None


_DEFAULTS = {"vocab_size": 0, "hidden_size": 0, "num_hidden_layers": 0, "num_attention_heads": 0,
             "intermediate_size": 0, "max_position_embeddings": 0, "type_vocab_size": 0, "layer_norm_eps": 0.0,
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


# -- attention ---------------------------------------------------------------------------------------------------------


class _CpuAttention(torch.autograd.Function):
    """softmax(q·kᵀ·scale + padding) with dropout, times v, for training on CPU.

    Saves q, k, v, the probabilities (in the operands' dtype) and the dropout's bool mask; backward recomputes the
    dropped probabilities from those two, where autograd would have saved them as a third T × T tensor.
    """

    @staticmethod
    def forward(ctx, q, k, v, keys_valid, p: float, scale: float):
        scores = torch.matmul(q * scale, k.transpose(-1, -2))
        scores.masked_fill_(keys_valid.logical_not(), torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        del scores
        keep = keep_mask(probs.shape, p, probs.device)
        out = torch.matmul(probs * keep.view(torch.uint8), v).mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(q, k, v, probs, keep)
        ctx.p, ctx.scale = p, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs, keep = ctx.saved_tensors
        grad_out = grad_out.to(v.dtype) * (1.0 / (1.0 - ctx.p))
        mask = keep.view(torch.uint8)
        grad_v = torch.matmul((probs * mask).transpose(-1, -2), grad_out)
        grad_probs = torch.matmul(grad_out, v.transpose(-1, -2)).mul_(mask)
        # Padded keys have probability exactly 0, so their scores get no gradient.
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q).mul_(ctx.scale)
        return grad_q, grad_k, grad_v, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys_valid: torch.Tensor, p: float) -> torch.Tensor:
    """(B, heads, T, d) query, key and value, `keys_valid` (B, 1, 1, T) bool → (B, heads, T, d); dropout p on the
    attention probabilities. SDPA wherever it is fused (no dropout, or not on CPU)."""
    scale = q.shape[-1] ** -0.5
    if p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keys_valid, dropout_p=p, scale=scale)
    return _CpuAttention.apply(q, k, v, keys_valid, p, scale)


# -- layers, named as transformers names them ---------------------------------------------------------------------------


class _Embeddings(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        self.word_embeddings = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.position_embeddings = nn.Embedding(shape.max_position_embeddings, shape.hidden_size)
        self.token_type_embeddings = nn.Embedding(shape.type_vocab_size, shape.hidden_size)
        self.LayerNorm = nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps)
        self.p = shape.hidden_dropout_prob

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        if token_type_ids is None:  # every token of type 0: one row, broadcast
            types = self.token_type_embeddings.weight[0]
        else:
            types = self.token_type_embeddings(token_type_ids)
        x = self.word_embeddings(input_ids) + types
        x = x + self.position_embeddings.weight[: input_ids.shape[1]]
        return fast_dropout(self.LayerNorm(x), self.p, self.training)


class _SelfAttention(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        self.query = nn.Linear(shape.hidden_size, shape.hidden_size)
        self.key = nn.Linear(shape.hidden_size, shape.hidden_size)
        self.value = nn.Linear(shape.hidden_size, shape.hidden_size)
        self.heads = shape.num_attention_heads
        self.p = shape.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, keys_valid: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        # One product for the three projections: the input is read (and cast under autocast) once.
        weight = torch.cat((self.query.weight, self.key.weight, self.value.weight))
        bias = torch.cat((self.query.bias, self.key.bias, self.value.bias))
        qkv = F.linear(x, weight, bias).view(B, T, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], keys_valid, self.p if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, T, H)


class _Output(nn.Module):
    """dense → dropout → LayerNorm(· + residual): the end of both halves of a layer."""

    def __init__(self, width: int, shape: BertShape):
        super().__init__()
        self.dense = nn.Linear(width, shape.hidden_size)
        self.LayerNorm = nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps)
        self.p = shape.hidden_dropout_prob

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(fast_dropout(self.dense(x), self.p, self.training) + residual)


class _AttentionBlock(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        self.self = _SelfAttention(shape)
        self.output = _Output(shape.hidden_size, shape)


class _Intermediate(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        self.dense = nn.Linear(shape.hidden_size, shape.intermediate_size)


class _Layer(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        self.attention = _AttentionBlock(shape)
        self.intermediate = _Intermediate(shape)
        self.output = _Output(shape.intermediate_size, shape)

    def forward(self, x: torch.Tensor, keys_valid: torch.Tensor) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, keys_valid), x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _Encoder(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(shape) for _ in range(shape.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, keys_valid: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, keys_valid, use_reentrant=False)
            else:
                x = layer(x, keys_valid)
        return x


class BertBody(nn.Module):
    """Embeddings and transformer layers: (B, T) ids and mask → (B, T, hidden) states."""

    def __init__(self, shape: BertShape):
        super().__init__()
        self.embeddings = _Embeddings(shape)
        self.encoder = _Encoder(shape)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keys_valid = attention_mask.bool()[:, None, None, :]
        return self.encoder(self.embeddings(input_ids, token_type_ids), keys_valid)


class _Transform(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        self.dense = nn.Linear(shape.hidden_size, shape.hidden_size)
        self.LayerNorm = nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class _Predictions(nn.Module):
    def __init__(self, shape: BertShape, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = _Transform(shape)
        self.bias = nn.Parameter(torch.zeros(shape.vocab_size))
        self.decoder = nn.Linear(shape.hidden_size, shape.vocab_size)
        self.decoder.weight = word_embeddings.weight  # tied, as in the checkpoint
        self.decoder.bias = self.bias


class _Head(nn.Module):
    def __init__(self, shape: BertShape, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = _Predictions(shape, word_embeddings)


class BertMaskedLM(nn.Module):
    """transformers' `BertForMaskedLM` as far as spladectl uses it: `bert` (= `base_model`), `cls.predictions`,
    `get_input_embeddings()`, `get_output_embeddings()`, `config`, `forward(...).logits`, `save_pretrained`."""

    native = True

    def __init__(self, shape: BertShape, config: dict[str, Any]):
        super().__init__()
        self.bert = BertBody(shape)
        self.cls = _Head(shape, self.bert.embeddings.word_embeddings)
        self.config = SimpleNamespace(**config)
        self._config_dict = dict(config)

    @property
    def base_model(self) -> BertBody:
        return self.bert

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each layer's activations in backward (non-reentrant checkpointing)."""
        self.bert.encoder.gradient_checkpointing = enabled

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.bert.encoder.gradient_checkpointing

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> SimpleNamespace:
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        return SimpleNamespace(logits=self.get_output_embeddings()(self.cls.predictions.transform(hidden)))

    def save_pretrained(self, path: str | Path) -> None:
        """config.json and model.safetensors in directory `path`, which transformers' BertForMaskedLM loads."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {key: value.detach().to("cpu").contiguous()
                   for key, value in self.state_dict().items() if key not in _TIED}
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        (path / CONFIG_NAME).write_text(json.dumps(self._config_dict, indent=2, sort_keys=True) + "\n")


def load(path: str | Path) -> BertMaskedLM | None:
    """The model in local directory `path` when this module implements it exactly, else None."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    shape = shape_of(config) if isinstance(config, dict) else None
    if shape is None or not (path / WEIGHTS_NAME).is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        saved = load_file(str(path / WEIGHTS_NAME))
    except (OSError, SafetensorError):
        return None
    weights = {_modern_name(key): value for key, value in saved.items() if not key.startswith(_IGNORED_PREFIXES)}
    # Built on the CPU, not the meta device: under torch.device("meta") nn.init goes through torch._refs, which
    # imports torch._dynamo and sympy, the very imports this module avoids. The initial values are overwritten, so
    # drawing them must not move the seeded generator that dropout draws from next.
    with torch.random.fork_rng(devices=[]):
        model = BertMaskedLM(shape, config)
    expected = {key for key in model.state_dict() if key not in _TIED}
    if set(weights) - set(_TIED) != expected or any(value.dtype != torch.float32 for value in weights.values()):
        return None
    for key in _TIED:
        weights.pop(key, None)
    if any(tuple(weights[key].shape) != tuple(param.shape) for key, param in model.state_dict().items()
           if key in weights):
        return None
    model.load_state_dict(weights, strict=False)  # the tied keys are the only ones left out
    return model.train(False)


def _modern_name(key: str) -> str:
    """LayerNorm weights by today's names: older checkpoints (splade-tiny's among them) call them gamma and beta."""
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key
