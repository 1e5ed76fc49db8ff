"""Top-1 agreement: how often the pruned model's greedy next token is the dense model's, on held-out text.

Why a measure beside perplexity: perplexity averages the log-probability the model gives the *reference* text, so
it moves with every shift of probability mass, including mass among tokens the model would never emit. What a user
sees from a greedy decoder is the argmax alone. A pruned model can keep most of its perplexity while its argmax
flips at many positions (the mass is redistributed among the top candidates), or lose perplexity on rare reference
tokens while emitting the same text as before. Agreement with the dense model's greedy choice, position by position
on the same held-out windows, measures that second thing: 100% means greedy decoding from any prefix of that text
starts with the same token as the dense model's. It needs no labels and no sampling, and each position is one
Bernoulli trial, so its standard error is known (``sqrt(p (1 - p) / total)``).

Why only the dense model's argmax ids are kept: full-vocabulary logits of the reference over every position would
cost ``positions x vocabulary x 4`` bytes (8 windows x 512 tokens x 49,152 x 4 bytes = 800 MB for SmolLM2 on one
corpus), while the argmax ids cost 8 bytes a position. They are computed once per protocol (:func:`greedy_tokens`)
and every pruned model is then compared batch by batch (:func:`agreement`), holding one batch's logits at a time.

The positions compared are the ones perplexity scores (:mod:`prunecomp.evaluation.perplexity`): every position of
every window except the last, whose next token lies outside the window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Agreement", "agreement", "greedy_tokens", "top1_agreement"]


def top1_agreement(dense_argmax: Tensor, pruned_logits: Tensor) -> tuple[int, int]:
    """``(matches, total)``: positions where ``pruned_logits``' argmax equals ``dense_argmax``, and positions.

    ``dense_argmax``: ``[...]`` integer token ids (the reference model's greedy choices); ``pruned_logits``:
    ``[..., vocabulary]``, the same positions. Counts rather than a rate, so that batches add up exactly: the rate
    of a whole corpus is ``sum(matches) / sum(total)`` whatever the batching. Ties among the pruned logits go to
    the lowest token id (``torch.argmax``), the rule the reference ids were taken with.
    """
    if pruned_logits.shape[:-1] != dense_argmax.shape:
        raise ValueError(f"positions differ: reference ids {tuple(dense_argmax.shape)} vs logits "
                         f"{tuple(pruned_logits.shape)} (the last dimension of the logits is the vocabulary)")
    chosen = pruned_logits.argmax(dim=-1)
    return int((chosen == dense_argmax.to(chosen.device)).sum()), dense_argmax.numel()


@dataclass(frozen=True)
class Agreement:
    """Matching positions out of ``total``; :attr:`rate` is their share, :attr:`standard_error` its binomial SE."""

    matches: int
    total: int

    @property
    def rate(self) -> float:
        return self.matches / self.total if self.total else float("nan")

    @property
    def standard_error(self) -> float:
        p = self.rate
        return math.sqrt(p * (1.0 - p) / self.total) if self.total else float("nan")

    def __add__(self, other: Agreement) -> Agreement:
        return Agreement(self.matches + other.matches, self.total + other.total)

    def to_dict(self) -> dict[str, float | int]:
        return {"matches": self.matches, "total": self.total, "rate": self.rate}


def _logits(model: nn.Module, batch: Tensor) -> Tensor:
    """Next-token logits of the positions that have a next token inside the window."""
    return model(input_ids=batch, use_cache=False).logits[:, :-1]


@torch.no_grad()
def greedy_tokens(model: nn.Module, ids: Tensor, *, batch_size: int = 1,
                  on_batch: Callable[[int], None] | None = None) -> Tensor:
    """The greedy next-token ids of ``model`` at every scored position of ``ids`` (``[n, T]`` -> ``[n, T - 1]``,
    int64 on the CPU): the reference :func:`agreement` compares a pruned model with. Batch by batch, so only one
    batch's logits are ever held."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)
            out.append(_logits(model, batch).argmax(dim=-1).cpu())
            if on_batch is not None:
                on_batch(batch.shape[0])
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, max(ids.shape[1] - 1, 0), dtype=torch.long)


@torch.no_grad()
def agreement(model: nn.Module, ids: Tensor, reference: Tensor, *, batch_size: int = 1,
              on_batch: Callable[[int], None] | None = None) -> Agreement:
    """Top-1 agreement of ``model`` with ``reference`` (:func:`greedy_tokens` of the dense model on the same
    ``ids``), streamed batch by batch (:func:`top1_agreement` per batch, counts summed)."""
    if reference.shape != (ids.shape[0], ids.shape[1] - 1):
        raise ValueError(f"reference ids {tuple(reference.shape)} do not belong to windows {tuple(ids.shape)}: "
                         "expected one id per scored position, [n, T - 1]")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = Agreement(0, 0)
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)
            total += Agreement(*top1_agreement(reference[start : start + batch_size], _logits(model, batch)))
            if on_batch is not None:
                on_batch(batch.shape[0])
    finally:
        model.train(was_training)
    return total
