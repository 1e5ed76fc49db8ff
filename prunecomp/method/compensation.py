"""Fold the magnitude-gap scale into the weights upstream of a pruned layer (zero run-time cost).

The math is three one-line tensor functions; :func:`compensate` only decides which tensors they apply to, from
the architecture's adapter. After ``compensate(model, upstream=g, s)`` the residual stream leaving layer ``g-1``
(i.e. reaching the gap) is exactly ``s`` times what it was, every pre-norm sub-layer upstream computes the same
(``RMSNorm(s x) = RMSNorm(x)`` up to eps), and the logits are unchanged when nothing was pruned.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prunecomp.errors import PrunecompError
from prunecomp.models.adapters import ArchAdapter, decoder_layers, get_adapter, resolve

__all__ = ["compensate", "folded_scales", "is_tied", "scale_layer_writers", "scale_linear_weight", "scale_norm_weight"]


def scale_linear_weight(weight: Tensor, s: float) -> Tensor:
    """A linear map (or its bias, or an embedding table) whose output is ``s`` times larger."""
    return weight * s


def scale_norm_weight(weight: Tensor, s: float, offset: float = 0.0) -> Tensor:
    """The weight of a norm computing ``x_hat * (offset + w)`` whose output is ``s`` times larger."""
    return (weight.float() * s + offset * (s - 1.0)).to(weight.dtype)


def folded_scales(model: nn.Module) -> list[float]:
    """Per current decoder layer, the product of every compensation scale folded into its residual writers.

    Recorded in ``config.prunecomp["folded_scale"]`` (it travels with saved checkpoints, so a resumed run knows
    it too). Weight-magnitude scores divide it back out: compensation is a rescaling that keeps what each upstream
    layer computes, so it must not make those layers look more important (see ``scoring.magnitude_scores``).
    """
    n = len(decoder_layers(model))
    info = getattr(model.config, "prunecomp", None)
    scales = info.get("folded_scale") if isinstance(info, dict) else None
    if not scales:
        return [1.0] * n
    if len(scales) != n:
        raise PrunecompError(f"config.prunecomp.folded_scale has {len(scales)} entries for {n} decoder layers")
    return [float(v) for v in scales]


def is_tied(model: nn.Module, adapter: ArchAdapter) -> bool:
    """True when the output head shares its weight tensor with the token embedding."""
    head = resolve(model, adapter.lm_head)
    embed = resolve(model, adapter.embed)
    return head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()


@torch.no_grad()
def scale_layer_writers(layer: nn.Module, s: float, adapter: ArchAdapter) -> None:
    """Make one decoder layer's contributions to the residual stream ``s`` times larger, in place."""
    for path in adapter.residual_writers:
        module = resolve(layer, path)
        if adapter.writers_are_norms:
            module.weight.copy_(scale_norm_weight(module.weight, s, adapter.norm_offset))
        else:
            module.weight.copy_(scale_linear_weight(module.weight, s))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(scale_linear_weight(module.bias, s))


@torch.no_grad()
def compensate(model: nn.Module, upstream: int, s: float, adapter: ArchAdapter | None = None) -> None:
    """Scale every residual-stream writer of layers ``[0, upstream)`` and the token embedding by ``s``, in place.

    ``upstream`` is the index, in the already-pruned model, of the first layer after the gap. With tied
    embeddings the output head is scaled too; the final norm's weight is divided by ``s`` so the logits stay
    exactly the same.
    """
    adapter = adapter or get_adapter(model)
    layers = decoder_layers(model, adapter)
    if not 0 <= upstream <= len(layers):
        raise PrunecompError(f"compensation gap {upstream} outside 0..{len(layers)}")
    if not (s > 0 and s == s and s != float("inf")):
        raise PrunecompError(f"compensation scale must be a finite positive number, got {s}")
    tied = is_tied(model, adapter)
    embed = resolve(model, adapter.embed)
    embed.weight.copy_(scale_linear_weight(embed.weight, s))
    for layer in layers[:upstream]:
        scale_layer_writers(layer, s, adapter)
    if tied:
        norm = resolve(model, adapter.final_norm)
        norm.weight.copy_(scale_norm_weight(norm.weight, 1.0 / s, adapter.norm_offset))
    folded = folded_scales(model)
    info = dict(getattr(model.config, "prunecomp", None) or {})
    info["folded_scale"] = [v * s if i < upstream else v for i, v in enumerate(folded)]
    model.config.prunecomp = info
