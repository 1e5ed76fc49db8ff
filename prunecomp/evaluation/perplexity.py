"""Perplexity over token windows: ``exp`` of the mean next-token negative log-likelihood over all windows."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["mean_nll", "perplexity"]


@torch.no_grad()
def mean_nll(
    model: nn.Module,
    ids: Tensor,
    *,
    batch_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> float:
    """Mean NLL (nats/token) of ``ids`` (``[n, T]``), every window scored from its first token independently."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                              reduction="sum")
            total += float(nll)
            count += targets.numel()
            if on_batch is not None:
                on_batch(batch.shape[0])
    finally:
        model.train(was_training)
    return total / count


def perplexity(model: nn.Module, ids: Tensor, *, batch_size: int = 1,
               on_batch: Callable[[int], None] | None = None) -> float:
    """``exp(mean NLL)`` over ``ids``; see :func:`mean_nll`."""
    return float(torch.exp(torch.tensor(mean_nll(model, ids, batch_size=batch_size, on_batch=on_batch))))
