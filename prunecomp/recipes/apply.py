"""Replay a recipe's edits on a model in memory: remove the recorded layers and fold exactly what the run folded
(scales, ``lsq`` gap maps, reconstructed layers, refinement gains), so the tensors come out bit-identical to the
run that made the recipe. The layer-streamed model replays through
:meth:`prunecomp.engine.streamed.StreamedModel.apply`, with :func:`check_applicable` and :func:`apply_layers` from here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from prunecomp.errors import PrunecompError
from prunecomp.method.compensation import compensate
from prunecomp.method.lsq import GapFit, apply_gap_map
from prunecomp.models.adapters import get_adapter, resolve
from prunecomp.models.pruning import original_indices, remove_layer
from prunecomp.recipes.recipe import Recipe, RefineEdit

__all__ = ["apply_layers", "apply_recipe", "apply_refine", "check_applicable"]


def check_applicable(recipe: Recipe, *, architecture: str, num_layers: int, kept: list[int] | None = None,
                     start: int = 0) -> None:
    """Refuse a recipe for another architecture or depth, or one that does not continue from ``kept``."""
    want_arch = recipe.source.get("architecture")
    if want_arch and want_arch != architecture:
        raise PrunecompError(f"recipe is for {want_arch}, the model is {architecture}")
    if int(recipe.source.get("num_layers", num_layers)) != num_layers:
        raise PrunecompError(f"recipe is for a model of {recipe.source['num_layers']} decoder layers, the source has "
                             f"{num_layers}")
    if kept is not None:
        expect = list(range(num_layers))
        for s in recipe.steps[:start]:
            del expect[expect.index(s.removed)]
        if expect != kept:
            raise PrunecompError(f"the model's layers {kept} are not where the recipe's first {start} steps leave "
                                 f"them ({expect})")


@torch.no_grad()
def apply_recipe(model: nn.Module, recipe: Recipe, *, start: int = 0, refined: bool = False) -> nn.Module:
    """Replay ``recipe`` (from step ``start``; the model must already be at that point) on ``model`` in place.

    ``refined``: the refinement that followed step ``start`` is already folded too (a progressive run's state
    after its fit; :meth:`Recipe.prefix` states are not refined, so the same recipe continues from them).

    Same calls, same order, same numbers as :func:`prunecomp.engine.loop.prune_and_compensate`: the tensors come out
    bit-identical to the run that made the recipe. The source's content hash is not checked here (the model may
    have been loaded from anywhere); callers that know it compare it with ``recipe.source["content_hash"]``.
    """
    from prunecomp.method.planning import source_num_layers

    get_adapter(model)
    check_applicable(recipe, architecture=type(model).__name__, num_layers=source_num_layers(model),
                     kept=original_indices(model), start=start)
    if start and not refined and recipe.steps[start - 1].refine is not None:
        apply_refine(model, recipe.steps[start - 1].refine)
    for i, s in enumerate(recipe.steps[start:], start=start):
        orig = original_indices(model)
        if not 0 <= s.current < len(orig) or orig[s.current] != s.removed:
            raise PrunecompError(f"recipe step {i}: layer {s.removed} is not at index {s.current} of the model")
        remove_layer(model, s.current)
        if s.scale is not None and s.scale != 1.0:  # as the loop: a scale of 1 folds nothing
            compensate(model, s.current, s.scale)
        if s.gap_map is not None:
            apply_gap_map(model, s.current, GapFit(t=s.gap_map, error_before=0.0, error_after=0.0))
        if s.layers is not None:
            apply_layers(model, s.layers)
        if s.refine is not None:
            apply_refine(model, s.refine)
    if recipe.refine is not None and not (refined and start == len(recipe.steps)):
        apply_refine(model, recipe.refine)
    return model


def apply_layers(model: nn.Module, weights: Mapping[str, Tensor]) -> None:
    """Set the parameters block reconstruction fitted, by name (exactly the values the fit left); one tensor read
    at a time from a lazy record."""
    params = dict(model.named_parameters())
    for name in sorted(weights):
        t = weights[name]
        p = params.get(name)
        if p is None:
            raise PrunecompError(f"recipe reconstruction names parameter {name!r}, which the model does not have")
        if p.shape != t.shape:
            raise PrunecompError(f"recipe weights for {name!r} have shape {tuple(t.shape)}, the model's "
                                 f"{tuple(p.shape)}")
        p.copy_(t.to(device=p.device, dtype=p.dtype))


def apply_refine(model: nn.Module, edit: RefineEdit) -> None:
    """Fold refinement gains by module path (exactly :func:`prunecomp.method.refine.fold_gains`)."""
    from prunecomp.method.refine import Gain, fold_gains

    items = []
    for path, (kind, offset, g) in sorted(edit.gains.items()):
        try:
            module = resolve(model, path)
        except AttributeError as exc:
            raise PrunecompError(f"recipe refinement names module {path!r}, which the model does not have") from exc
        if not isinstance(module, nn.Module) or not isinstance(getattr(module, "weight", None), Tensor):
            raise PrunecompError(f"recipe refinement names {path!r}, which is not a module with a weight (gains are "
                                 "recorded by module path, e.g. 'model.layers.0.input_layernorm')")
        if kind not in ("norm", "linear") or g.ndim != 1:
            raise PrunecompError(f"recipe gains for {path!r} must be one vector of kind 'norm' or 'linear', got "
                                 f"kind {kind!r} with shape {tuple(g.shape)}")
        if module.weight.shape[0] != g.shape[0]:
            raise PrunecompError(f"recipe gains for {path!r} have {g.shape[0]} channels, the module "
                                 f"{module.weight.shape[0]}")
        items.append(Gain(module, nn.Parameter(g.clone(), requires_grad=False), kind, offset))  # type: ignore[arg-type]
    fold_gains(items)
