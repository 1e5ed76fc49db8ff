"""The in-memory backend: a whole ``nn.Module`` the loop edits in place (:class:`~prunecomp.engine.backends.Backend`).

Scoring goes through a :class:`~prunecomp.engine.scanners.Scanner` (incremental within the memory budget, else exact),
which this backend tells about every edit: a removal and its upstream rescale (:meth:`InMemory.remove`), a fold
that changes layer outputs beyond a rescale (:meth:`InMemory.changed`). The guard reads the scanner's cached
stream at the gap when it is up to date, so only the layers after the gap run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from prunecomp.config import PruneConfig
from prunecomp.engine.backends import IN_MEMORY, Capabilities
from prunecomp.engine.incremental import PER_CANDIDATE_METRICS, IncrementalScanner
from prunecomp.engine.scanners import Scanner, exact_scanner
from prunecomp.errors import PrunecompError
from prunecomp.evaluation.perplexity import mean_nll
from prunecomp.method.compensation import compensate
from prunecomp.method.guard import GuardResult, guard_in_memory
from prunecomp.method.lsq import GapFit, apply_gap_map, fit_gap_map, gap_map_tensors
from prunecomp.method.reconstruct import GapStreams, ReconstructReport, capture_gap, layer_tensors, reconstruct
from prunecomp.method.scoring import LayerScan, scan_layers
from prunecomp.method.selection import select_by_guard, select_by_loss
from prunecomp.models.hooks import restored
from prunecomp.models.pruning import original_indices, remove_layer
from prunecomp.recipes.apply import apply_recipe
from prunecomp.recipes.recipe import Recipe

__all__ = ["InMemory"]


class InMemory:
    """``model`` (edited in place) on calibration windows ``ids``, scored by ``scanner``."""

    capabilities: Capabilities = IN_MEMORY
    sourced = None  # the final check swaps the source's weights in itself (uncompensated_view's originals)

    def __init__(self, model: nn.Module, ids: Tensor, *, batch_size: int, scanner: Scanner | None = None,
                 on_batch: Callable[[], None] | None = None) -> None:
        self.model, self.ids, self.batch_size = model, ids, batch_size
        self.scanner = scanner or exact_scanner(model, ids, batch_size=batch_size, on_batch=on_batch)
        self.scoring = "incremental" if isinstance(self.scanner, IncrementalScanner) else "exact"

    def scan(self, metric: str, *, block_size: int, candidates: Sequence[int]) -> LayerScan:
        return self.scanner.scan(metric, block_size=block_size, candidates=candidates)

    def with_scores(self, metric: str, scores: Mapping[int, float], candidates: Sequence[int]) -> LayerScan:
        if metric not in PER_CANDIDATE_METRICS:
            raise PrunecompError(f"precomputed scores are for per-candidate metrics {sorted(PER_CANDIDATE_METRICS)}, "
                                 f"not {metric!r}")
        orig = original_indices(self.model)
        missing = [orig[i] for i in candidates if orig[i] not in scores]
        if missing:
            raise PrunecompError(f"precomputed scores lack candidate layers {missing}")
        scan = scan_layers(self.model, self.ids, "bi", batch_size=self.batch_size)  # one pass: the gap scales
        return LayerScan(scores=[float(scores.get(o, float("inf"))) for o in orig], scales=scan.scales,
                         layer_forwards=scan.layer_forwards)

    def guard(self, current: int, s: float, exponents: Sequence[float]) -> GuardResult:
        return guard_in_memory(self.model, self.ids, current, s, exponents, batch_size=self.batch_size,
                               cached=self.scanner.boundary(current))

    def select_by_loss(self, scan: LayerScan, candidates: list[int], config: PruneConfig
                       ) -> tuple[int, dict[int, float], GuardResult | None]:
        if config.compensation == "guarded":
            return select_by_guard(self.model, self.ids, config, scan.scores, scan.scales, candidates,
                                   self.batch_size, self.scanner.boundary)
        current, trials = select_by_loss(self.model, self.ids, config, scan.scores, scan.scales, candidates,
                                         self.batch_size)
        return current, trials, None

    def fit_gap_map(self, current: int, scale: float, *, ridge: float) -> GapFit:
        return fit_gap_map(self.model, self.ids, current, scale, ridge=ridge, batch_size=self.batch_size)

    def keep_gap_map(self, current: int, fit: Any, guard: GuardResult) -> bool:
        """Both sides measured by the same full forward; the comparison is recorded on ``guard``."""
        without = mean_nll(self.model, self.ids, batch_size=self.batch_size)
        with restored(gap_map_tensors(self.model, current)) as keep:
            apply_gap_map(self.model, current, fit)
            guard.map_loss = mean_nll(self.model, self.ids, batch_size=self.batch_size)
            guard.map_kept = guard.map_loss < without
            keep(guard.map_kept)
        return guard.map_kept

    def capture_gap(self, current: int, ids: Tensor, side: str, *, batch_size: int,
                    check: Tensor | None = None) -> GapStreams | None:
        return capture_gap(self.model, current, ids, side, batch_size=batch_size, check=check)

    def fit_layers(self, gap: GapStreams, scale: float, *, steps: int, lr: float, seed: int, removed: int
                   ) -> tuple[ReconstructReport, Mapping[str, Tensor] | None]:
        done = reconstruct(self.model, gap, scale, steps=steps, lr=lr, seed=seed, removed=removed,
                           originals=original_indices(self.model))
        return done, layer_tensors(self.model, gap.fitted()) if done.kept else None

    def remove(self, current: int, scale: float) -> None:
        remove_layer(self.model, current)
        if scale != 1.0:  # a scale of 1 folds nothing (and (1 + w) * 1 - 1 could round a Gemma norm weight)
            compensate(self.model, current, scale)
        self.scanner.removed(current, scale)

    def changed(self, first_layer: int | None) -> None:
        self.scanner.invalidate(first_layer)

    def mean_nll(self, ids: Tensor) -> float:
        return mean_nll(self.model, ids, batch_size=self.batch_size)

    def replay(self, recipe: Recipe, *, start: int = 0, refined: bool = False) -> None:
        apply_recipe(self.model, recipe, start=start, refined=refined)
