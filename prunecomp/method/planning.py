"""Planning a removal: how deep the source was, which layers may go now, which one (or which block) goes.

Pure decisions over scores and the model's bookkeeping (``config.prunecomp``); no forward passes. The in-memory
loop, the layer-streamed loop and the pipeline all decide through these functions.
"""

from __future__ import annotations

import math

from torch import nn

from prunecomp.config import PruneConfig
from prunecomp.errors import PrunecompError
from prunecomp.method.scoring import LayerScan
from prunecomp.models.adapters import decoder_layers, get_adapter
from prunecomp.models.pruning import original_indices

__all__ = ["candidates", "check_finite", "check_plan", "choose", "one_shot_choice", "source_num_layers"]


def source_num_layers(model: nn.Module) -> int:
    """Number of decoder layers the model had before prunecomp touched it."""
    info = getattr(model.config, "prunecomp", None)
    if isinstance(info, dict) and "source_num_layers" in info:
        return int(info["source_num_layers"])
    return len(decoder_layers(model))


def candidates(model: nn.Module, config: PruneConfig, remaining: int) -> list[int]:
    """Current indices that may be removed now; errors early when protection leaves too few."""
    n_src = source_num_layers(model)
    protected = config.protected(n_src)
    orig = original_indices(model)
    cands = [i for i, o in enumerate(orig) if o not in protected]
    if len(cands) < remaining:
        raise PrunecompError(
            f"protected layers {sorted(protected)} leave {len(cands)} removable layers, but {remaining} must be "
            "removed: protect fewer layers or remove fewer"
        )
    return cands


def check_plan(model: nn.Module, config: PruneConfig) -> int:
    """Validate ``config`` against ``model`` (layer count, protection) before any compute; returns k."""
    get_adapter(model)
    k = config.layers_to_remove(source_num_layers(model))
    remaining = k - (source_num_layers(model) - len(decoder_layers(model)))
    if remaining > 0:
        candidates(model, config, remaining)
    return k


def check_finite(scan: LayerScan, cands: list[int], orig: list[int]) -> None:
    """Stop on a NaN score or gap scale: non-finite weights or activations, named by original layer index."""
    for i in cands:
        score, scale = scan.scores[i], scan.scales[i]
        if math.isnan(score) or not math.isfinite(scale):
            raise PrunecompError(f"layer {orig[i]} scored {score} with gap scale {scale}: non-finite activations or "
                                 "weights (check the model's weights for NaN/inf, or use float32)")


def choose(scan: LayerScan, cands: list[int], metric: str, block: int) -> int:
    """The scan index that goes now: the lowest score (ties: the lowest index), or the start of the best block."""
    if metric == "block":
        allowed = set(cands)
        starts = [i for i in cands if all(j in allowed for j in range(i, i + block))]
        starts = [i for i in starts if math.isfinite(scan.scores[i])]
        if not starts:
            raise PrunecompError(f"no contiguous block of {block} removable layers is left")
        return min(starts, key=lambda i: (scan.scores[i], i))
    return min(cands, key=lambda i: (scan.scores[i], i))


def one_shot_choice(scan: LayerScan, cands: list[int], metric: str, k: int) -> list[int]:
    """The ``k`` scan indices one-shot mode removes from one scan: the whole best block of ``k`` for ``block``,
    else the ``k`` lowest scores (ties: the lowest index). Ascending."""
    if metric == "block":
        start = choose(scan, cands, "block", k)
        return list(range(start, start + k))
    return sorted(sorted(cands, key=lambda i: (scan.scores[i], i))[:k])
