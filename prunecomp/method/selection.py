"""Compensation-aware selection: among the few lowest-scoring layers, remove the one whose removal *after
compensation* costs the least calibration loss.

A metric like BI scores a layer as if nothing were done about its absence; compensation changes which removal is
cheapest. Each trial skips the candidate, applies the configured compensation, measures the calibration NLL and
restores every touched tensor exactly (clones of the tensors that compensation writes, not of the whole model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from prunecomp.config import PruneConfig
from prunecomp.evaluation.perplexity import mean_nll
from prunecomp.method.compensation import compensate
from prunecomp.method.guard import GuardResult, guard_in_memory
from prunecomp.method.lsq import apply_gap_map, fit_gap_map
from prunecomp.models.adapters import decoder_layers, get_adapter, resolve
from prunecomp.models.pruning import skip_layer

__all__ = ["select_by_guard", "select_by_loss", "trial_removal"]


def _touched(model: nn.Module, current: int) -> list[Tensor]:
    """Every tensor that compensating a gap at ``current`` may write."""
    adapter = get_adapter(model)
    layers = decoder_layers(model, adapter)
    mods = [resolve(model, adapter.embed), resolve(model, adapter.final_norm)]
    for layer in layers[: current + 1]:
        mods += [resolve(layer, p) for p in adapter.residual_writers]
    return [p for m in mods for p in m.parameters(recurse=False)]


@contextmanager
def trial_removal(model: nn.Module, current: int, config: PruneConfig, s: float, ids: Tensor,
                  batch_size: int) -> Iterator[None]:
    """Inside the block the model behaves as if layer ``current`` were removed and compensated."""
    fit = None
    if config.compensation == "lsq":
        fit = fit_gap_map(model, ids, current, s, ridge=config.lsq_ridge, batch_size=batch_size)
    saved = [(p, p.detach().clone()) for p in _touched(model, current)]
    try:
        with skip_layer(model, current):
            if config.compensation in ("magnitude", "lsq"):
                compensate(model, current, s)
            if fit is not None:
                apply_gap_map(model, current, fit)
            yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


def select_by_loss(model: nn.Module, ids: Tensor, config: PruneConfig, scores: list[float], scales: list[float],
                   cands: list[int], batch_size: int) -> tuple[int, dict[int, float]]:
    """The candidate (current index) with the lowest compensated calibration NLL among the
    ``config.selection_pool`` lowest-scoring ones, and the NLL of each trial."""
    pool = sorted(cands, key=lambda i: (scores[i], i))[: config.selection_pool]
    losses: dict[int, float] = {}
    for i in pool:
        with trial_removal(model, i, config, scales[i], ids, batch_size):
            losses[i] = mean_nll(model, ids, batch_size=batch_size)
    return min(pool, key=lambda i: (losses[i], i)), losses


def select_by_guard(model: nn.Module, ids: Tensor, config: PruneConfig, scores: list[float], scales: list[float],
                    cands: list[int], batch_size: int,
                    cached: Callable[[int], tuple[list[Tensor], list[list[dict]]] | None]
                    ) -> tuple[int, dict[int, float], GuardResult]:
    """Selection by loss under guarded compensation: the guard's grid for each of the ``config.selection_pool``
    lowest-scoring candidates (from the cached stream at each gap, so only the layers after it run); the candidate
    whose best compensated calibration NLL is lowest, every trial's NLL, and the winner's guard measurement."""
    pool = sorted(cands, key=lambda i: (scores[i], i))[: config.selection_pool]
    results = {i: guard_in_memory(model, ids, i, scales[i], config.guard_exponents, batch_size=batch_size,
                                  cached=cached(i)) for i in pool}
    losses = {i: r.loss for i, r in results.items()}
    best = min(pool, key=lambda i: (losses[i], i))
    return best, losses, results[best]
