"""Layer-at-a-time forward machinery: run decoder layers one by one over all calibration batches.

The sparsegpt / llm-compressor sequential pattern. One cheap "catch" forward (every decoder layer replaced by a
pass-through stub) records the residual stream entering layer 0 and the keyword arguments each layer receives
(attention mask, rotary position embeddings, ...: they depend on the layer's position, e.g. Gemma's sliding vs
global layers). After that a layer can be run on its own from any cached stream, which is what makes incremental
re-scoring (start after the gap) and layer-streamed models (load one layer from disk at a time) possible.

Nothing here knows about metrics; callers pass the layers and look at the streams.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunecomp.models.adapters import ArchAdapter, decoder_layers, get_adapter, resolve
from prunecomp.models.hooks import _hidden_out

__all__ = ["HEAD_CHUNK_ELEMENTS", "LayerInputs", "catch_layer_inputs", "head_nll", "run_layer"]


class _Stop(Exception):
    """Raised by the last stub: nothing after the decoder layers is needed by the catch pass."""


class _Catcher(nn.Module):
    """Stands in for decoder layer ``index``: records its input and kwargs, returns the input unchanged."""

    def __init__(self, index: int, original: nn.Module, sink: list[dict], last: bool) -> None:
        super().__init__()
        self.index = index
        self.sink = sink
        self.last = last
        for attr in ("attention_type", "layer_type", "is_sliding"):  # read by some families' model.forward
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, hidden_states: Tensor, *args: object, **kwargs: object) -> Tensor:
        if args:
            raise TypeError("decoder layers are expected to take everything but hidden_states by keyword")
        self.sink.append({"hidden": hidden_states, "kwargs": kwargs})
        if self.last:
            raise _Stop
        return hidden_states


@dataclass
class LayerInputs:
    """Residual stream entering layer 0 (one tensor per calibration batch) and, per batch, each layer's kwargs."""

    hidden: list[Tensor]
    kwargs: list[list[dict]]  # kwargs[batch][layer]


@contextmanager
def _stubbed(layers: nn.ModuleList, sink: list[dict]) -> Iterator[None]:
    originals = list(layers)
    try:
        for i, layer in enumerate(originals):
            layers[i] = _Catcher(i, layer, sink, last=i == len(originals) - 1)
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


@torch.no_grad()
def catch_layer_inputs(model: nn.Module, ids: Tensor, batch_size: int) -> LayerInputs:
    """Embeddings and per-layer kwargs of every calibration batch, at the cost of the embedding lookups.

    Works on a model whose decoder layers are not materialized (meta tensors): they are never called.
    """
    layers = decoder_layers(model)
    device = _model_device(model)
    hidden: list[Tensor] = []
    kwargs: list[list[dict]] = []
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size].to(device)
        sink: list[dict] = []
        with _stubbed(layers, sink), suppress(_Stop):
            model(input_ids=batch, use_cache=False)
        if len(sink) != len(layers):
            raise RuntimeError(f"catch pass saw {len(sink)} of {len(layers)} decoder layers")
        hidden.append(sink[0]["hidden"])
        kwargs.append([entry["kwargs"] for entry in sink])
    return LayerInputs(hidden=hidden, kwargs=kwargs)


@torch.no_grad()
def run_layer(layer: nn.Module, xs: Sequence[Tensor], kwargs: Sequence[dict]) -> list[Tensor]:
    """``layer`` applied to every batch of a cached stream (``kwargs``: that layer's kwargs per batch)."""
    return [_hidden_out(layer(x, **kw)) for x, kw in zip(xs, kwargs, strict=True)]


HEAD_CHUNK_ELEMENTS = 1 << 24
"""Logits computed at a time by :func:`head_nll` (64 MiB of fp32): a 128k-262k vocabulary would otherwise
materialize ``tokens x vocab`` fp32 logits at once (2 GiB for 2048 tokens of a 262k vocabulary)."""


@torch.no_grad()
def head_nll(model: nn.Module, x: Tensor, ids: Tensor, adapter: ArchAdapter | None = None, *,
             stride: int = 1) -> tuple[float, int]:
    """Summed next-token NLL and token count of the model's head (final norm, lm_head) on a final stream ``x``.

    Matches ``model(input_ids=ids, labels=ids).loss * count`` (including Gemma's final logit soft-capping). The
    logits are computed a chunk of tokens at a time (:data:`HEAD_CHUNK_ELEMENTS`), so memory does not grow with
    the vocabulary times the batch; the FLOPs are the same. ``stride``: score every ``stride``-th position only
    (the head costs as much per token as several decoder layers; a sample of positions is what a loss
    *difference* needs, see :mod:`prunecomp.method.guard`).
    """
    adapter = adapter or get_adapter(model)
    norm = resolve(model, adapter.final_norm)
    head = resolve(model, adapter.lm_head)
    cap = getattr(model.config, "final_logit_softcapping", None)
    h = norm(x[:, :-1][:, ::stride]).reshape(-1, x.shape[-1])
    labels = ids.to(x.device)[:, 1:][:, ::stride].reshape(-1)
    step = max(1, HEAD_CHUNK_ELEMENTS // int(head.weight.shape[0]))
    total = 0.0
    for start in range(0, h.shape[0], step):
        logits = head(h[start : start + step]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        total += float(torch.nn.functional.cross_entropy(logits, labels[start : start + step], reduction="sum"))
    return total, labels.numel()


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


LayerSource = Callable[[int], nn.Module]
"""Gives decoder layer ``i`` ready to run (in memory already, or loaded from disk on demand)."""
