"""Layer-importance metrics and the magnitude-gap scale, as pure functions over tensors.

Convention: every score is an *importance*; the layer with the LOWEST score is pruned first.
Hidden states are ``[batch, tokens, channels]``; statistics are computed in float32 whatever the model dtype.
Streaming: the per-batch functions return sums and counts, which :func:`accumulate` adds to a running
``(sum, count)`` state, so calibration activations never need to be stored.

References: Block Influence (ShortGPT, Men et al. 2024); angular distance (Gromov et al. 2024); contiguous-block
cosine (LLM-Streamline, Chen et al. 2024, the hidden-dimension form); Taylor+ / Mag+ (Shortened LLaMA, Kim et al.
2024: first-order Taylor and weight magnitude, "+" = first four and last two blocks kept); PPL-on-skip (SLEB, Song
et al. 2024); magnitude gap (Prune&Comp, arXiv 2507.18212).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "LayerStats",
    "Running",
    "accumulate",
    "accumulate_layer",
    "angular_distance_sum",
    "block_influence_sum",
    "gap_scale",
    "layer_scale",
    "layer_score",
    "magnitude_importance",
    "magnitude_ratio",
    "mean",
    "taylor_importance",
    "token_cosine",
]

Running = tuple[Tensor, int]
"""A running ``(sum, count)``; ``sum`` may be a scalar or a vector."""


def accumulate(state: Running | None, total: Tensor, count: int) -> Running:
    """Add a batch's ``total`` (sum over ``count`` items) to a running state."""
    total = total.detach().to(torch.float64)
    if state is None:
        return total, count
    return state[0] + total, state[1] + count


def mean(state: Running) -> Tensor:
    """The mean of a running state."""
    return state[0] / max(state[1], 1)


def token_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity over channels for every token: ``[B, T, C] x [B, T, C] -> [B, T]`` (float32)."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


def block_influence_sum(x_in: Tensor, x_out: Tensor) -> tuple[Tensor, int]:
    """Sum over tokens of ``1 - cos(x_in, x_out)`` and the token count (BI = sum / count).

    With ``x_out`` the output of layer ``i + n - 1`` and ``x_in`` the input of layer ``i`` this is the
    contiguous-block cosine distance of LLM-Streamline for a block of ``n`` layers.
    """
    cos = token_cosine(x_in, x_out)
    return (1.0 - cos).sum(), cos.numel()


def angular_distance_sum(x_in: Tensor, x_out: Tensor) -> tuple[Tensor, int]:
    """Sum over tokens of ``arccos(cos(x_in, x_out)) / pi`` and the token count."""
    cos = token_cosine(x_in, x_out).clamp(-1.0, 1.0)
    return (torch.arccos(cos) / torch.pi).sum(), cos.numel()


def magnitude_ratio(x_in: Tensor, x_out: Tensor, eps: float = 1e-12) -> Tensor:
    """Per sample and channel, ``mean_t |x_out| / mean_t |x_in|``: ``[B, T, C] -> [B, C]`` (float32).

    This is the inner part of Prune&Comp's magnitude gap; ``eps`` only guards a channel that is exactly zero.
    """
    num = x_out.float().abs().mean(dim=1)
    den = x_in.float().abs().mean(dim=1)
    return num / den.clamp_min(eps)


def gap_scale(ratio_sum_per_channel: Tensor, n_samples: int) -> float:
    """``s = mean_c mean_n ratio[n, c]`` from the per-channel sum over samples (see :func:`magnitude_ratio`)."""
    if n_samples <= 0:
        raise ValueError("gap_scale needs at least one calibration sample")
    return float((ratio_sum_per_channel / n_samples).mean())


def taylor_importance(weights_and_grads: Iterable[tuple[Tensor, Tensor]]) -> float:
    """First-order Taylor importance of a block: ``sum |w * dL/dw|`` over its weights."""
    return float(sum((w.detach().double() * g.detach().double()).abs().sum() for w, g in weights_and_grads))


def magnitude_importance(weights: Iterable[Tensor], folded: Iterable[Tensor] = (), scale: float = 1.0) -> float:
    """Weight-magnitude importance of a block: ``sum |w|`` (L1) over its weights.

    ``folded`` weights had a compensation scale ``scale`` multiplied into them; they count as ``sum |w| / scale``,
    i.e. as they were before the fold, so compensation never changes the ranking.
    """
    plain = sum(w.detach().double().abs().sum() for w in weights)
    return float(plain + sum(w.detach().double().abs().sum() for w in folded) / scale)


LayerStats = dict[str, Running]
"""One layer's streamed statistics: ``"ratio"`` (per-channel magnitude-ratio sums, for the gap scale) and the
token distances asked for (``"bi"``, ``"angular"``)."""


def accumulate_layer(state: LayerStats | None, x_in: Tensor, x_out: Tensor,
                     distances: Sequence[str] = ()) -> LayerStats:
    """State in, state out: one batch of a layer's input/output added to its statistics. Every scanner (exact,
    incremental, layer-streamed) accumulates through this one function, so they agree by construction."""
    out = dict(state or {})
    r = magnitude_ratio(x_in, x_out)
    out["ratio"] = accumulate(out.get("ratio"), r.sum(dim=0), r.shape[0])
    for name in distances:
        fn = block_influence_sum if name == "bi" else angular_distance_sum
        out[name] = accumulate(out.get(name), *fn(x_in, x_out))
    return out


def layer_scale(state: LayerStats) -> float:
    """The gap scale ``s`` of a layer from its statistics."""
    return gap_scale(*state["ratio"])


def layer_score(state: LayerStats, distance: str) -> float:
    """A layer's mean token distance (``"bi"`` or ``"angular"``) from its statistics."""
    return float(mean(state[distance]))
