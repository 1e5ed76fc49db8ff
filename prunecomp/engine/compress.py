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
from prunecomp.engine.dense import DenseSource, as_dense
from prunecomp.engine.loop import prune_and_compensate, source_num_layers
from prunecomp.engine.stages import Finish, Gains, finishing_stages
from prunecomp.errors import PrunecompError
from prunecomp.method.refine import RefineReport, TeacherTargets, teacher_targets
from prunecomp.method.refit import RefitReport, sequential_refit
from prunecomp.models.adapters import decoder_layers
from prunecomp.recipes.report import PruneReport, StepRecord

__all__ = ["compress", "refine_as_configured", "refit_as_configured", "teacher_for"]


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
                         config: PruneConfig, check: TokenWindows | Tensor | None = None) -> RefineReport:
    """One gains fit with the refine stage's settings of ``config`` (:class:`~prunecomp.engine.stages.Gains`),
    kept only if it lowers the NLL on the held-out ``check`` windows when given."""
    return Gains(config.stage("refine")).fit(model, _ids(windows), targets, None if check is None else _ids(check))


def refit_as_configured(model: nn.Module, windows: TokenWindows | Tensor, config: PruneConfig,
                        dense: DenseSource | None) -> tuple[RefitReport, dict[str, Tensor]]:
    """The sequential refit with the refit stage's settings of ``config`` (``reconstruct_batch`` windows a step)
    against ``dense`` (see :data:`~prunecomp.engine.dense.DenseSource`), returning what it fitted."""
    return sequential_refit(model, _ids(windows), as_dense(dense), steps=config.refit_steps, lr=config.refit_lr,
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
    check_windows: TokenWindows | Tensor | None = None,
) -> PruneReport:
    """:func:`prunecomp.engine.loop.prune_and_compensate`, then (``config.refine`` not ``none``) refinement on
    ``refine_windows`` (default: ``calibration``) against the dense model's predictions, taken before the first
    removal (see :func:`teacher_for`). ``on_step`` sees each removal before refinement, ``on_refine(done, step,
    model)`` each fit after it is folded (``step``: the removal it followed with ``refine_at="each"``, else None);
    ``config.reconstruct``'s local fits after each removal run on ``refine_windows`` too;
    the report carries what refinement did (``report.refine``) and what it folded (``report.refine_edit``, for the
    recipe).

    ``check_windows``: held-out windows on which every gains fit must lower the next-token NLL to be folded (see
    :func:`prunecomp.method.refine.refine`) and every block reconstruction its stream error to be kept (see
    :func:`prunecomp.method.reconstruct.fit_layers`); None: decided on the fitting windows alone.

    ``config.refit="sequential"``: after the last removal and before the end refinement, every layer after the
    first gap is refitted to ``dense``'s streams (the dense source; see :data:`~prunecomp.engine.dense.DenseSource`) on
    ``refine_windows``; ``on_refit`` sees its report, ``report.refit`` keeps it and the recipe the layers.

    ``config.refine_at="each"`` (progressive): after every removal, refine ``config.refine_steps`` steps, then
    score the refined model for the next removal; each fit is recorded on its step (``StepRecord.refine``). The
    loop is called once per removal, so each scoring starts from a fresh scanner: refinement changed every layer,
    and cached activations would be stale."""
    fit_on = calibration if refine_windows is None else refine_windows
    targets = teacher_for(model, fit_on, config, batch_size=batch_size, teacher=teacher)
    loop = partial(prune_and_compensate, model, calibration, batch_size=batch_size, on_step=on_step,
                   on_batch=on_batch, calibration_config=calibration_config, cache_budget_bytes=cache_budget_bytes,
                   fit_windows=refine_windows, check_windows=check_windows)
    if config.refit != "none" and dense is None:
        as_dense(dense)  # refused before any work: the refit needs the dense source
    if targets is None or config.refine_at == "end":
        report = loop(config)
        finish = Finish(model, _ids(fit_on), report, targets=targets, dense=dense, on_refit=on_refit,
                        on_refine=on_refine, check=None if check_windows is None else _ids(check_windows))
        for stage in finishing_stages(config):  # the refit, then the gains (registered in prunecomp.engine.stages)
            stage.finish(finish)
        return report
    gains = Gains(config.stage("refine"))
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
        done = gains.fit(model, _ids(fit_on), targets, None if check_windows is None else _ids(check_windows))
        report.add_refine(done, step=report.steps[-1])
        if on_refine is not None:
            on_refine(done, report.steps[-1], model)
    if report is None:  # nothing left to remove: the loop's own report of that
        return loop(config)
    report.seconds = time.perf_counter() - t0
    return report
