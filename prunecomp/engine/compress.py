"""What ``prunecomp prune`` does in memory: the dense model's predictions (when refinement is asked for), the
Prune&Comp loop, then refinement. One call for the CLI's job and notebooks.

Why a module of its own: the loop (:mod:`prunecomp.engine.loop`) removes and folds, one layer at a time, and knows
nothing of refinement; refinement (:mod:`prunecomp.method.refine`) fits gains on any pruned model. Only the caller knows
that the teacher must be computed before the first removal and the fit must run after the last one, and which
windows it fits on. The pipeline wires the same pieces as separate cached tasks (``tasks/refine.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

from torch import Tensor, nn

from prunecomp.config import CalibrationConfig, PruneConfig
from prunecomp.corpora.calibration import TokenWindows
from prunecomp.engine.loop import prune_and_compensate, source_num_layers
from prunecomp.errors import PrunecompError
from prunecomp.method.refine import RefineReport, TeacherTargets, refine, teacher_targets
from prunecomp.method.refit import DenseLayers, InMemoryDense, RefitReport, sequential_refit
from prunecomp.models.adapters import decoder_layers
from prunecomp.recipes.report import PruneReport, StepRecord

__all__ = ["DenseSource", "compress", "refine_as_configured", "refit_as_configured", "teacher_for"]


def _ids(windows: TokenWindows | Tensor) -> Tensor:
    return windows.ids if isinstance(windows, TokenWindows) else windows


def teacher_for(model: nn.Module, windows: TokenWindows | Tensor, config: PruneConfig, *, batch_size: int = 4,
                teacher: TeacherTargets | nn.Module | None = None) -> TeacherTargets | None:
    """The dense model's top-k predictions on ``windows`` when ``config.refine`` asks for refinement, else None.

    ``teacher``: the targets themselves, or the dense model to compute them from; by default ``model``, which must
    then still have all its layers (a pruned model is no teacher)."""
    if config.refine == "none":
        return None
    if isinstance(teacher, TeacherTargets):
        return teacher
    if teacher is None:
        already = source_num_layers(model) - len(decoder_layers(model))
        if already:
            raise PrunecompError(
                f"refine={config.refine!r} needs the dense model's predictions, but this model already has "
                f"{already} layers removed: pass teacher= (the dense model or its TeacherTargets)")
        teacher = model
    return teacher_targets(teacher, _ids(windows), topk=config.refine_topk, batch_size=batch_size)


def refine_as_configured(model: nn.Module, windows: TokenWindows | Tensor, targets: TeacherTargets,
                         config: PruneConfig) -> RefineReport:
    """:func:`prunecomp.method.refine.refine` with the ``refine_*`` settings of ``config``."""
    return refine(model, _ids(windows), targets, mode=config.refine, steps=config.refine_steps, lr=config.refine_lr,
                  batch_size=config.refine_batch, loss=config.refine_loss)


DenseSource = DenseLayers | nn.Module | Callable[[], DenseLayers | nn.Module]
"""The dense source of a refit: its layers (:class:`~prunecomp.method.refit.DenseLayers`), the dense model in memory,
or a function that opens one of them (called when the refit runs, so nothing is held while the layers are pruned)."""

_NO_DENSE = ("refit='sequential' fits to the dense model's streams: pass dense= (the dense model, a "
             "prunecomp.engine.streamed.StreamedModel of its folder, or a function returning one)")


def _as_dense(dense: DenseSource | None) -> DenseLayers:
    if dense is None:
        raise PrunecompError(_NO_DENSE)
    if isinstance(dense, nn.Module):
        return InMemoryDense(dense)
    if hasattr(dense, "load_layer"):
        return dense  # type: ignore[return-value]
    return _as_dense(dense())  # type: ignore[operator]


def refit_as_configured(model: nn.Module, windows: TokenWindows | Tensor, config: PruneConfig,
                        dense: DenseSource | None) -> tuple[RefitReport, dict[str, Tensor]]:
    """:func:`prunecomp.method.refit.sequential_refit` with the ``refit_*`` settings of ``config``
    (``reconstruct_batch`` windows a step) against ``dense`` (see :data:`DenseSource`)."""
    return sequential_refit(model, _ids(windows), _as_dense(dense), steps=config.refit_steps, lr=config.refit_lr,
                            batch_size=config.reconstruct_batch)


def compress(
    model: nn.Module,
    calibration: TokenWindows | Tensor,
    config: PruneConfig,
    *,
    batch_size: int = 4,
    on_step: Callable[[StepRecord, nn.Module], None] | None = None,
    on_batch: Callable[[], None] | None = None,
    calibration_config: CalibrationConfig | None = None,
    cache_budget_bytes: int | None = None,
    teacher: TeacherTargets | nn.Module | None = None,
    refine_windows: TokenWindows | Tensor | None = None,
    on_refine: Callable[[RefineReport, StepRecord | None, nn.Module], None] | None = None,
    dense: DenseSource | None = None,
    on_refit: Callable[[RefitReport], None] | None = None,
) -> PruneReport:
    """:func:`prunecomp.engine.loop.prune_and_compensate`, then (``config.refine`` not ``none``) refinement on
    ``refine_windows`` (default: ``calibration``) against the dense model's predictions, taken before the first
    removal (see :func:`teacher_for`). ``on_step`` sees each removal before refinement, ``on_refine(done, step,
    model)`` each fit after it is folded (``step``: the removal it followed with ``refine_at="each"``, else None);
    ``config.reconstruct``'s local fits after each removal run on ``refine_windows`` too;
    the report carries what refinement did (``report.refine``) and what it folded (``report.refine_edit``, for the
    recipe).

    ``config.refit="sequential"``: after the last removal and before the end refinement, every layer after the
    first gap is refitted to ``dense``'s streams (the dense source; see :func:`refit_as_configured`) on
    ``refine_windows``; ``on_refit`` sees its report, ``report.refit`` keeps it and the recipe the layers.

    ``config.refine_at="each"`` (progressive): after every removal, refine ``config.refine_steps`` steps, then
    score the refined model for the next removal; each fit is recorded on its step (``StepRecord.refine``). The
    loop is called once per removal, so each scoring starts from a fresh scanner: refinement changed every layer,
    and cached activations would be stale."""
    fit_on = calibration if refine_windows is None else refine_windows
    targets = teacher_for(model, fit_on, config, batch_size=batch_size, teacher=teacher)
    loop = partial(prune_and_compensate, model, calibration, batch_size=batch_size, on_step=on_step,
                   on_batch=on_batch, calibration_config=calibration_config, cache_budget_bytes=cache_budget_bytes,
                   fit_windows=refine_windows)
    if config.refit != "none" and dense is None:  # before any work
        raise PrunecompError(_NO_DENSE)
    if targets is None or config.refine_at == "end":
        report = loop(config)
        if config.refit != "none":
            done, weights = refit_as_configured(model, fit_on, config, dense)
            report.add_refit(done.to_dict(), weights)
            if on_refit is not None:
                on_refit(done)
        if targets is not None:
            done = refine_as_configured(model, fit_on, targets, config)
            report.add_refine(done)
            if on_refine is not None:
                on_refine(done, None, model)
        return report
    t0 = time.perf_counter()
    n_src = source_num_layers(model)
    k = config.layers_to_remove(n_src)
    report = None
    for n in range(n_src - len(decoder_layers(model)) + 1, k + 1):
        one = loop(config.model_copy(update={"n_layers": n, "fraction": None}))
        if report is None:
            report = one
            report.config = config.model_dump(mode="json")
        else:
            report.steps.extend(one.steps)
        done = refine_as_configured(model, fit_on, targets, config)
        report.add_refine(done, step=report.steps[-1])
        if on_refine is not None:
            on_refine(done, report.steps[-1], model)
    if report is None:  # nothing left to remove: the loop's own report of that
        return loop(config)
    report.seconds = time.perf_counter() - t0
    return report
