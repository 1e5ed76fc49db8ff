"""What a run decided, as data: one :class:`StepRecord` per removal and the :class:`PruneReport` of a run.

Plain dataclasses, JSON-able through ``to_dict``; the tensors a run folded (``lsq`` maps, refinement gains) ride
along outside the JSON and end up in the run's recipe (:meth:`PruneReport.recipe`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from prunecomp.recipes.recipe import Recipe, recipe_from_report

if TYPE_CHECKING:
    from prunecomp.method.refine import RefineReport

__all__ = ["PruneReport", "StepRecord"]


@dataclass
class StepRecord:
    """One removal. Layer indices are ORIGINAL indices unless named ``*_current``."""

    step: int
    metric: str
    scores: dict[int, float]
    candidates: list[int]
    chosen: int
    chosen_current: int
    measured_scale: float
    applied_scale: float
    layers_after: int
    seconds: float
    layer_forwards: int = 0
    gap_fit: dict[str, float] | None = None
    selection_losses: dict[int, float] | None = None
    # Guarded compensation: what was measured and folded (see prunecomp.method.guard.GuardResult.to_dict).
    guard: dict[str, Any] | None = None
    # The lsq map folded at this step (the recipe's sidecar tensor; not part of the JSON record).
    gap_map: Tensor | None = field(default=None, repr=False, compare=False)
    # Progressive refinement (refine_at="each"): what the fit right after this removal did, and its gains by
    # module path (the recipe's sidecar, not part of the JSON record).
    refine: dict[str, Any] | None = None
    refine_edit: dict[str, tuple[str, float, Tensor]] | None = field(default=None, repr=False, compare=False)
    # Block reconstruction (config.reconstruct): what the local fit after this removal did, and the fitted layers'
    # parameters by name in the model as it was then (the recipe's sidecar, not part of the JSON record).
    reconstruct: dict[str, Any] | None = None
    layer_weights: Mapping[str, Tensor] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: string layer keys, non-finite scores as ``None``, no tensors."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("gap_map", "refine_edit", "layer_weights")}
        out["scores"] = {str(k): (v if math.isfinite(v) else None) for k, v in self.scores.items()}
        if self.selection_losses is not None:
            out["selection_losses"] = dict(self.selection_losses)
        return out


@dataclass
class PruneReport:
    """Everything a run decided, in JSON-able form."""

    config: dict[str, Any]
    source_num_layers: int
    steps: list[StepRecord] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    scoring: str = "exact"
    refine: dict[str, Any] | None = None
    # Refinement's folded gains by module path (the recipe's sidecar; not part of the JSON report).
    refine_edit: dict[str, tuple[str, float, Tensor]] | None = field(default=None, repr=False)
    # The sequential refit after the last removal (config.refit; prunecomp.method.refit.RefitReport.to_dict).
    refit: dict[str, Any] | None = None

    @property
    def removed(self) -> list[int]:
        return [s.chosen for s in self.steps]

    def add_refine(self, done: RefineReport, step: StepRecord | None = None) -> None:
        """Record a refinement run (its summary, and its gains for the recipe): after the last removal, or right
        after ``step`` (progressive refinement)."""
        if step is not None:
            step.refine, step.refine_edit = done.to_dict(), done.folded
            return
        self.refine = done.to_dict()
        self.refine_edit = done.folded

    def add_refit(self, done: dict[str, Any], weights: dict[str, Tensor]) -> None:
        """Record the sequential refit (``done``: its report as a dict) and the refitted layers' parameters. They
        join the last step's ``layer_weights``: the refit runs right after that step's folds and before the end
        refinement, which is exactly where a recipe step's layers are set on replay."""
        self.refit = done
        if weights:
            if not self.steps:
                raise ValueError("a refit with no removal: nothing to attach its layers to")
            last = self.steps[-1]
            last.layer_weights = {**(last.layer_weights or {}), **weights}

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("steps", "refine_edit")}
        out["config"], out["calibration"] = dict(self.config), dict(self.calibration)
        out["steps"] = [s.to_dict() for s in self.steps]
        out["removed"] = self.removed
        return out

    def recipe(self, source: dict[str, Any]) -> Recipe:
        """This run as a :class:`~prunecomp.recipes.recipe.Recipe` of ``source`` (a model's provenance dict)."""
        return recipe_from_report(self, source)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
