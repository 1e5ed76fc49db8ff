"""The layer-streamed backend: a :class:`~prunecomp.engine.streamed.StreamedModel` (one decoder layer in memory at a
time) behind the loop's :class:`~prunecomp.engine.backends.Backend` protocol. What it cannot run is declared in
:data:`prunecomp.engine.backends.STREAMED` and refused before any work; the methods that raise here are the backstop.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from prunecomp.config import PruneConfig
from prunecomp.engine.backends import STREAMED, Capabilities
from prunecomp.engine.streamed import StreamedModel
from prunecomp.errors import PrunecompError
from prunecomp.method.guard import GuardResult
from prunecomp.method.reconstruct import GapStreams, ReconstructReport, capture_gap, reconstruct_layers
from prunecomp.method.scoring import LayerScan
from prunecomp.models.pruning import original_indices
from prunecomp.recipes.recipe import Recipe

__all__ = ["Streamed"]


class Streamed:
    """The layer-streamed :class:`~prunecomp.engine.backends.Backend`: ``sm`` on calibration windows ``ids``. Scoring is
    one layer-by-layer pass per step (nothing cached); the guard runs the layers after the gap in groups that
    fit the memory budget; block reconstruction loads the layer pair beside the gap for the fit and keeps a fit
    in the spill folder (:meth:`StreamedModel.keep_layer`), recorded lazily."""

    capabilities: Capabilities = STREAMED
    scoring = "streamed"

    def __init__(self, sm: StreamedModel, ids: Tensor, *, batch_size: int) -> None:
        self.sm, self.model, self.ids, self.batch_size = sm, sm.model, ids, batch_size
        self.sourced = sm.sourced

    def scan(self, metric: str, *, block_size: int, candidates: Sequence[int]) -> LayerScan:
        return self.sm.scan(self.ids, metric, batch_size=self.batch_size)

    def guard(self, current: int, s: float, exponents: Sequence[float]) -> GuardResult:
        return self.sm.guard(self.ids, current, s, exponents, batch_size=self.batch_size)

    def capture_gap(self, current: int, ids: Tensor, side: str, *, batch_size: int,
                    check: Tensor | None = None) -> GapStreams | None:
        return capture_gap(self.model, current, ids, side, batch_size=batch_size, check=check,
                           layer_at=self.sm.load_layer, release=self.sm.free)

    def fit_layers(self, gap: GapStreams, scale: float, *, steps: int, lr: float, seed: int, removed: int
                   ) -> tuple[ReconstructReport, Mapping[str, Tensor] | None]:
        """The in-memory fit (:func:`~prunecomp.method.reconstruct.reconstruct_layers`: same streams, same seed) on the
        loaded pair; a kept fit goes to the spill folder (one file per step: ``seed`` is the step)."""
        layers = [self.sm.load_layer(j) for j in gap.fitted()]
        try:
            done = reconstruct_layers(layers, gap, scale, steps=steps, lr=lr, seed=seed, removed=removed,
                                      originals=original_indices(self.model))
            weights = None
            if done.kept:
                weights = ChainMap(*(self.sm.keep_layer(j, layer, tag=f"step{seed}")
                                     for j, layer in zip(gap.fitted(), layers, strict=True)))
        finally:
            for layer in layers:
                self.sm.free(layer)
        return done, weights

    def remove(self, current: int, scale: float) -> None:
        self.sm.remove(current, scale)

    def changed(self, first_layer: int | None) -> None:
        return None  # nothing is cached between passes

    def mean_nll(self, ids: Tensor) -> float:
        return self.sm.mean_nll(ids, batch_size=self.batch_size)

    def replay(self, recipe: Recipe, *, start: int = 0, refined: bool = False) -> None:
        """Removals and magnitude folds pending, reconstructed layers to spill files
        (:meth:`StreamedModel.apply`: it starts where the model is, so ``start`` is implied)."""
        self.sm.apply(recipe)

    def _refused(self, what: str) -> PrunecompError:  # refusal() says so before any work; this is the backstop
        return PrunecompError(f"layer streaming cannot run {what}; run it in memory")

    def with_scores(self, metric: str, scores: Mapping[int, float], candidates: Sequence[int]) -> LayerScan:
        raise self._refused("precomputed per-candidate scores")

    def select_by_loss(self, scan: LayerScan, candidates: list[int], config: PruneConfig
                       ) -> tuple[int, dict[int, float], GuardResult | None]:
        raise self._refused("selection by loss")

    def fit_gap_map(self, current: int, scale: float, *, ridge: float) -> Any:
        raise self._refused("the lsq gap map")

    def keep_gap_map(self, current: int, fit: Any, guard: GuardResult) -> bool:
        raise self._refused("the lsq gap map")
