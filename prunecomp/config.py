"""Typed, validated configuration: what to prune, how to calibrate, how to evaluate; and the named presets.

Validated once at the edge (CLI, flow parameters, notebooks) with ``extra="forbid"`` so a typo is an error, not a
silently ignored option.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prunecomp.errors import PrunecompError
from prunecomp.guard import DEFAULT_EXPONENTS
from prunecomp.scoring import Metric

__all__ = ["PRESETS", "CalibrationConfig", "EvalConfig", "Preset", "PruneConfig", "default_preset_name"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationConfig(_Frozen):
    """Calibration windows: ``n_samples`` random windows of ``seq_len`` tokens of ``source``, seeded.

    ``held_out`` more windows of the same source, disjoint from those, are the final check's (did what the run
    folded beat plain removal of the same layers? see :mod:`prunecomp.final_check`); 0 skips the check."""

    source: str = "c4"
    n_samples: int = Field(32, gt=0)
    seq_len: int = Field(512, ge=2)
    seed: int = 0
    batch_size: int = Field(4, gt=0)
    held_out: int = Field(8, ge=0)


class EvalConfig(_Frozen):
    """Perplexity evaluation: contiguous windows of ``seq_len``; ``max_windows=None`` means the whole split."""

    datasets: tuple[str, ...] = ("wikitext2", "c4", "ptb")
    seq_len: int = Field(2048, ge=2)
    max_windows: int | None = Field(None, gt=0)
    batch_size: int = Field(1, gt=0)


class PruneConfig(_Frozen):
    """What to remove and how.

    ``n_layers`` or ``fraction`` (of the source model's layers) says how many layers go. ``protect`` lists ORIGINAL
    layer indices that are never removed (negative = from the end); ``None`` means the metric's default: the last
    layer, plus the first four and last two for Taylor+ / Mag+ (the "+" of Shortened LLaMA).

    ``compensation``: ``guarded`` (the default: the paper's scale ``s`` folded only as far as it lowers the
    calibration loss; ``s ** a`` for the best ``a`` of ``guard_exponents``, which always include 0 = no compensation
    and 1 = the paper's; see :mod:`prunecomp.guard`), ``magnitude`` (the paper, bit for bit), ``none`` (naive), or
    ``lsq`` (the guarded scale plus a least-squares gap map folded into the last linear writer before the gap,
    ridge ``lsq_ridge``, kept only when it lowers the calibration loss; see :mod:`prunecomp.fitting`).
    ``selection``: ``score`` removes the lowest-scoring layer; ``loss`` tries the ``selection_pool`` lowest-scoring
    ones with compensation applied and removes the one with the lowest calibration loss (iterative mode; see
    :mod:`prunecomp.selection`).
    ``refine``: after the last removal (wired by the caller: :func:`prunecomp.compress.compress`, the CLI, the
    pipeline's refine task; :func:`prunecomp.loop.prune_and_compensate` alone does not refine), distil the dense
    model's predictions on the calibration windows into per-channel gains folded into the norms (``norms``), also
    the residual writers (``norms+writers``), also every other linear of the layers (``channels``):
    ``refine_steps`` Adam steps at ``refine_lr`` on ``refine_batch`` windows, teacher kept as top-``refine_topk``
    log-probs and fitted to them by ``refine_loss`` (``tail``: the KL over those tokens and one bucket for the rest;
    ``topk``: renormalised over the top ones, which rewards overconfidence; see :func:`prunecomp.refine.distill_loss`),
    on ``refine_samples`` windows of the calibration source (same seed
    and length, so a superset of the scoring windows; None = the scoring windows themselves). Still zero run-time
    cost. ``none`` is the paper's method. ``refine_at``: ``end`` fits once, after the last removal; ``each`` fits
    ``refine_steps`` after EVERY removal and re-scores the refined model before choosing the next layer
    (progressive refinement: k times the fitting, and on the quality protocol it recovers more of the damage
    than the same total steps at the end; iterative mode; with ``lsq`` each step's gap map is folded before that
    step's fit, and the final check undoes maps and gains in fold order).
    ``reconstruct``: after every removal, fine-tune every weight of the layer ``before`` the gap, the one
    ``after`` it, or ``both``, in place, so that fed the pruned model's stream they write the stream the model had
    there before the removal (block reconstruction, see :mod:`prunecomp.reconstruct`; beside the first or last
    layer, where a side has no layer, the other neighbour is fitted): ``reconstruct_steps`` Adam
    steps at ``reconstruct_lr``, ``reconstruct_batch`` windows a step, on the fitting windows (``refine_samples``
    windows when given, else the scoring windows). Still zero run-time cost; not with ``lsq`` (a gap map changes
    the stream the fit reads). ``none`` (the default) fits nothing.
    ``refit``: ``sequential`` refits, after the last removal and before the end refinement, every layer from the
    first gap on, in order, to the dense model's stream after the same original layer (see
    :mod:`prunecomp.refit`): ``refit_steps`` Adam steps per layer at ``refit_lr``, ``reconstruct_batch`` windows a
    step, on the fitting windows. Needs the dense source's layers (the job reads them one at a time); not with
    ``lsq`` nor progressive refinement (``refine_at="each"`` fits after the last removal, where the refit runs).
    ``scoring``: ``incremental`` re-runs only the layers after each gap from cached activations (same choices,
    scores equal within float rounding; see :mod:`prunecomp.incremental`); ``exact`` recomputes everything.
    """

    metric: Metric = "bi"
    n_layers: int | None = Field(None, gt=0)
    fraction: float | None = Field(None, gt=0.0, lt=1.0)
    mode: Literal["iterative", "one-shot"] = "iterative"
    compensation: Literal["guarded", "magnitude", "none", "lsq"] = "guarded"
    guard_exponents: tuple[float, ...] = DEFAULT_EXPONENTS
    protect: tuple[int, ...] | None = None
    lsq_ridge: float = Field(1e-3, ge=0.0)
    selection: Literal["score", "loss"] = "score"
    selection_pool: int = Field(4, ge=1)
    scoring: Literal["incremental", "exact"] = "incremental"
    refine: Literal["none", "norms", "norms+writers", "channels"] = "none"
    refine_steps: int = Field(80, ge=1)
    refine_lr: float = Field(3e-3, gt=0.0)
    refine_batch: int = Field(2, ge=1)
    refine_topk: int = Field(256, ge=1)
    refine_loss: Literal["tail", "topk"] = "tail"
    refine_samples: int | None = Field(None, gt=0)
    refine_at: Literal["end", "each"] = "end"
    reconstruct: Literal["none", "before", "after", "both"] = "none"
    reconstruct_steps: int = Field(200, ge=1)
    reconstruct_lr: float = Field(1e-3, gt=0.0)
    reconstruct_batch: int = Field(4, ge=1)
    refit: Literal["none", "sequential"] = "none"
    refit_steps: int = Field(50, ge=1)
    refit_lr: float = Field(1e-3, gt=0.0)

    @model_validator(mode="after")
    def _count(self) -> PruneConfig:
        if self.n_layers is not None and self.fraction is not None:
            raise ValueError("give n_layers or fraction, not both")
        if 0.0 not in self.guard_exponents or 1.0 not in self.guard_exponents:
            raise ValueError("guard_exponents must include 0 (no compensation) and 1 (the paper's scale)")
        if any(not -4.0 <= a <= 4.0 for a in self.guard_exponents):
            raise ValueError("guard_exponents must lie in [-4, 4]")
        if self.refine_at == "each" and self.refine != "none" and self.mode != "iterative":
            raise ValueError("refine_at='each' re-scores the refined model after every removal: it needs "
                             "mode='iterative'")
        if self.reconstruct != "none" and self.compensation == "lsq":
            raise ValueError("reconstruct fits the layers beside the gap to the stream before the removal, which an "
                             "lsq gap map changes: use compensation 'guarded', 'magnitude' or 'none' with it")
        if self.refit != "none" and self.compensation == "lsq":
            raise ValueError("refit is not supported with lsq gap maps yet: use compensation 'guarded', 'magnitude' "
                             "or 'none' with it")
        if self.refit != "none" and self.refine != "none" and self.refine_at == "each":
            raise ValueError("refit runs after the last removal, where progressive refinement (refine_at='each') "
                             "fits too: use refine_at='end' with it")
        return self

    @property
    def guarded(self) -> bool:
        """Whether the scale folded at each step is chosen by the guard (``guarded`` and ``lsq``)."""
        return self.compensation in ("guarded", "lsq")

    @property
    def compensates(self) -> bool:
        """Whether any scale is folded (everything but ``none``)."""
        return self.compensation != "none"

    def layers_to_remove(self, source_num_layers: int) -> int:
        """How many layers go from a model that had ``source_num_layers`` originally."""
        k = self.n_layers if self.n_layers is not None else round((self.fraction or 0.0) * source_num_layers)
        if self.n_layers is None and self.fraction is None:
            raise PrunecompError("say how many layers to remove: n_layers (--layers) or fraction (--fraction)")
        if not 0 < k < source_num_layers:
            raise PrunecompError(
                f"layers to remove must be between 1 and {source_num_layers - 1} for a model with "
                f"{source_num_layers} decoder layers, got {k}"
            )
        return k

    def protected(self, source_num_layers: int) -> set[int]:
        """Original indices that may never be removed."""
        n = source_num_layers
        spec = self.protect
        if spec is None:
            spec = (0, 1, 2, 3, -2, -1) if self.metric in ("taylor", "mag") else (-1,)
        out = set()
        for i in spec:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise PrunecompError(f"protected layer {i} is out of range for a model with {n} layers")
            out.add(j)
        return out


class Preset(_Frozen):
    """A named pair of calibration and evaluation settings."""

    calibration: CalibrationConfig
    evaluation: EvalConfig
    why: str


PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        calibration=CalibrationConfig(n_samples=32, seq_len=256, batch_size=8),
        evaluation=EvalConfig(seq_len=512, max_windows=20, batch_size=4),
        why="fits a 2-core CPU (about 1 s per 512-token forward of a 135M model): the main job prunes 5 layers of "
        "SmolLM2-135M in a few minutes; perplexity on the first 20 x 512 tokens of each corpus",
    ),
    "paper": Preset(
        calibration=CalibrationConfig(n_samples=128, seq_len=2048, batch_size=1),
        evaluation=EvalConfig(seq_len=2048, max_windows=None),
        why="the paper's protocol: 128 x 2048 calibration tokens, full test splits in 2048-token windows",
    ),
}


def default_preset_name() -> str:
    """``paper`` on a GPU, ``cpu`` otherwise."""
    return "paper" if torch.cuda.is_available() else "cpu"
