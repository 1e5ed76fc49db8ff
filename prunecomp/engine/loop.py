"""The one Prune&Comp loop: score -> remove the least important layer -> fold the gap scale -> re-score.

The CLI (through :func:`prunecomp.engine.compress.compress`, which adds refinement around it), the Prefect tasks and
notebooks all call :func:`prune_and_compensate` (or :func:`prune_step`, one iteration, for orchestrators that
checkpoint between steps), with an in-memory model or a layer-streamed one: the loop runs against the
:class:`~prunecomp.engine.backends.Backend` protocol, the layer is picked by the configured selection and everything
done around its removal is a stage (:mod:`prunecomp.engine.stages`). Observers hook in through ``on_step``; nothing here
knows about Prefect, MLflow, files or refinement.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor, nn

from prunecomp.config import CalibrationConfig, PruneConfig
from prunecomp.corpora.calibration import TokenWindows
from prunecomp.engine.backends import Backend
from prunecomp.engine.memory_backend import InMemory
from prunecomp.engine.scanners import Scanner, make_scanner
from prunecomp.engine.stages import SELECTIONS, Gap, active_stages, refusal
from prunecomp.errors import PrunecompError
from prunecomp.method.planning import candidates, check_finite, check_plan, one_shot_choice, source_num_layers
from prunecomp.method.scoring import LayerScan
from prunecomp.models.adapters import decoder_layers, get_adapter
from prunecomp.models.pruning import original_indices
from prunecomp.recipes.recipe import Recipe
from prunecomp.recipes.report import PruneReport, StepRecord

if TYPE_CHECKING:
    from prunecomp.engine.streamed import StreamedModel

__all__ = [
    "PruneReport",
    "StepRecord",
    "backend_for",
    "check_plan",
    "check_runs",
    "make_scanner",
    "prune_and_compensate",
    "prune_step",
    "replay",
    "source_num_layers",
]

log = logging.getLogger(__name__)

Target = Union[nn.Module, "StreamedModel"]
"""What the loop prunes: an in-memory ``nn.Module`` or a :class:`~prunecomp.engine.streamed.StreamedModel`."""


def _windows(calibration: TokenWindows | Tensor) -> Tensor:
    return calibration.ids if isinstance(calibration, TokenWindows) else calibration


def _is_streamed(target: Target) -> bool:
    return not isinstance(target, nn.Module)


def _source_layers(target: Target) -> int:
    return int(target.source_layers) if _is_streamed(target) else source_num_layers(target)


def backend_for(target: Target, calibration: TokenWindows | Tensor | None = None,
                config: PruneConfig | None = None, *, batch_size: int = 4, scanner: Scanner | None = None,
                on_batch: Callable[[], None] | None = None, cache_budget_bytes: int | None = None,
                cache: bool = True) -> Backend:
    """The backend ``target`` runs on: the layer-streamed one, or the in-memory model scored by ``scanner``
    (default: :func:`make_scanner`'s choice for ``config`` with ``cache``, else exact scoring). Without
    ``calibration`` the backend measures and replays only (the final check, recipe replay)."""
    ids = torch.empty(0, 0, dtype=torch.long) if calibration is None else _windows(calibration)
    if _is_streamed(target):
        from prunecomp.engine.streamed_backend import Streamed

        return Streamed(target, ids, batch_size=batch_size)  # type: ignore[arg-type]
    get_adapter(target)
    if scanner is None and cache and config is not None and calibration is not None:
        scanner = make_scanner(target, calibration, config, batch_size=batch_size, on_batch=on_batch,
                               cache_budget_bytes=cache_budget_bytes)
    return InMemory(target, ids, batch_size=batch_size, scanner=scanner, on_batch=on_batch)


def replay(target: Target, recipe: Recipe, *, start: int = 0, refined: bool = False) -> None:
    """Replay ``recipe`` on ``target`` (in memory or layer-streamed) from step ``start``: the same removals and
    folds, with the run's numbers (:meth:`~prunecomp.engine.backends.Backend.replay`)."""
    backend_for(target).replay(recipe, start=start, refined=refined)


def check_runs(target: Target, config: PruneConfig) -> None:
    """Everything the loop would refuse about ``config`` on ``target``, before any compute: the backend's
    capabilities (:func:`prunecomp.engine.stages.refusal`), the number of layers and the protected ones."""
    if _is_streamed(target):
        from prunecomp.engine.backends import STREAMED

        why = refusal(STREAMED, config)
        if why is not None:
            raise PrunecompError(why)
        candidates(target.model, config, config.layers_to_remove(target.source_layers))
    else:
        check_plan(target, config)  # type: ignore[arg-type]


def prune_step(
    model: Target,
    calibration: TokenWindows | Tensor,
    config: PruneConfig,
    *,
    step: int,
    batch_size: int = 4,
    on_batch: Callable[[], None] | None = None,
    scanner: Scanner | None = None,
    scores: Mapping[int, float] | None = None,
    fit_windows: TokenWindows | Tensor | None = None,
    check_windows: TokenWindows | Tensor | None = None,
) -> StepRecord:
    """One iteration on ``model`` (in place; an ``nn.Module`` or a layer-streamed model): score all layers, remove
    one, run the configured stages. ``step`` counts from 0.

    ``scanner`` (see :func:`make_scanner`) carries cached activations from the previous step of the same model;
    without it the step scores from scratch. ``scores`` (ORIGINAL layer index -> score) are a per-candidate
    metric's scores computed elsewhere (fanned out over workers, see
    :func:`prunecomp.engine.incremental.candidate_scores`); the step then only runs the one pass that measures the gap
    scales. ``fit_windows``: the windows of the local fits (``config.reconstruct``; default: ``calibration``);
    ``check_windows``: held-out windows on which a local fit must lower its error too to be kept (None: decided
    on the fitting windows alone).
    """
    check_runs(model, config)
    backend = backend_for(model, calibration, config, batch_size=batch_size, on_batch=on_batch, scanner=scanner,
                          cache=False)
    return _step(backend, config, step=step, scores=scores, fit_ids=_fit_ids(calibration, fit_windows),
                 check_ids=_check_ids(check_windows))


def _fit_ids(calibration: TokenWindows | Tensor, fit_windows: TokenWindows | Tensor | None) -> Tensor:
    return _windows(calibration if fit_windows is None else fit_windows)


def _check_ids(check_windows: TokenWindows | Tensor | None) -> Tensor | None:
    return None if check_windows is None else _windows(check_windows)


def _step(backend: Backend, config: PruneConfig, *, step: int, fit_ids: Tensor, check_ids: Tensor | None = None,
          scores: Mapping[int, float] | None = None) -> StepRecord:
    """Score, select, remove: one removal of an iterative run."""
    t0 = time.perf_counter()
    model = backend.model
    n_src = source_num_layers(model)
    k = config.layers_to_remove(n_src)
    already = n_src - len(decoder_layers(model))
    remaining = k - already
    if remaining <= 0:
        raise PrunecompError(f"the model already has {already} of {k} layers removed: nothing left to do")
    cands = candidates(model, config, remaining)
    block = remaining if config.metric == "block" else 1
    scan = (backend.scan(config.metric, block_size=block, candidates=cands) if scores is None
            else backend.with_scores(config.metric, scores, cands))
    orig = original_indices(model)
    check_finite(scan, cands, orig)
    choose, _needs = SELECTIONS[config.selection]
    picked = choose(backend, scan, cands, config, block)
    record = _remove(backend, config, scan, orig, cands, picked.current, step, t0, fit_ids=fit_ids,
                     check_ids=check_ids, guard=picked.guard)
    if picked.trials is not None:  # compensated calibration NLL of every trial, by original index, for the audit
        record.selection_losses = {orig[i]: v for i, v in picked.trials.items()}
    return record


def _remove(backend: Backend, config: PruneConfig, scan: LayerScan, orig: list[int], cands: list[int],
            current: int, step: int, t0: float, *, fit_ids: Tensor, check_ids: Tensor | None = None,
            forwards: int | None = None, guard: Any = None) -> StepRecord:
    """Remove scan-index ``current`` (also its current index: layers above it may be gone, none below), with
    every configured stage around the removal (:mod:`prunecomp.engine.stages`)."""
    gap = Gap(backend=backend, ids=backend.ids, fit_ids=fit_ids, batch_size=backend.batch_size, step=step,
              current=current, chosen=orig[current], measured=scan.scales[current], guard=guard, check_ids=check_ids)
    stages = active_stages(config)
    for stage in stages:
        stage.before(gap)
    backend.remove(current, gap.scale)
    for stage in stages:
        stage.after(gap)
    return StepRecord(
        step=step,
        metric=config.metric,
        scores={orig[i]: scan.scores[i] for i in range(len(orig))},
        candidates=[orig[i] for i in cands],
        chosen=gap.chosen,
        chosen_current=current,
        measured_scale=gap.measured,
        applied_scale=gap.scale,
        layers_after=len(decoder_layers(backend.model)),
        seconds=time.perf_counter() - t0,
        layer_forwards=scan.layer_forwards if forwards is None else forwards,
        guard=None if gap.guard is None else gap.guard.to_dict(),
        **gap.record,
    )


def prune_and_compensate(
    model: Target,
    calibration: TokenWindows | Tensor,
    config: PruneConfig,
    *,
    batch_size: int = 4,
    on_step: Callable[[StepRecord, Any], None] | None = None,
    on_batch: Callable[[], None] | None = None,
    calibration_config: CalibrationConfig | None = None,
    cache_budget_bytes: int | None = None,
    fit_windows: TokenWindows | Tensor | None = None,
    check_windows: TokenWindows | Tensor | None = None,
) -> PruneReport:
    """Remove layers from ``model`` in place until the configured count is gone; return the report. ``model`` is an
    in-memory ``nn.Module`` or a layer-streamed :class:`~prunecomp.engine.streamed.StreamedModel`: one loop, two
    backends (:mod:`prunecomp.engine.backends`), refused up front when a stage needs what the backend cannot do.

    Iterative mode re-scores the compensated model after every removal (the paper's method). One-shot mode scores
    once and removes the chosen layers from the highest index down, each compensated with its own measured scale.
    ``on_step(record, model)`` runs after every removal, with the model in its new state.
    ``config.scoring="incremental"`` (default) keeps the residual stream of every layer boundary between steps
    and re-runs only the layers after each gap (:mod:`prunecomp.engine.incremental`), within ``cache_budget_bytes``
    (default: a quarter of physical memory; over it, exact scoring); a streamed model scores exactly.
    ``config.refine`` is not applied here: refinement needs the dense model's predictions from before the first
    removal and runs after the last one, so the caller wires it (:func:`prunecomp.engine.compress.compress` in memory,
    the pipeline's own refine task). ``fit_windows``: the windows of the local fits after each removal (default:
    ``calibration``); ``check_windows``: held-out windows on which each local fit must lower its error too to be
    kept (None: decided on the fitting windows alone).
    """
    t0 = time.perf_counter()
    check_runs(model, config)
    n_src = _source_layers(model)
    k = config.layers_to_remove(n_src)
    backend = backend_for(model, calibration, config, batch_size=batch_size, on_batch=on_batch,
                          cache_budget_bytes=cache_budget_bytes)
    report = PruneReport(config=config.model_dump(mode="json"), source_num_layers=n_src, scoring=backend.scoring)
    if isinstance(calibration, TokenWindows):
        report.calibration = {"origin": calibration.origin, "digest": calibration.digest,
                              "n_samples": calibration.n, "seq_len": calibration.seq_len}
    if calibration_config is not None:
        report.calibration["config"] = calibration_config.model_dump(mode="json")
    already = n_src - len(decoder_layers(backend.model))
    fit_ids, check_ids = _fit_ids(calibration, fit_windows), _check_ids(check_windows)
    if config.mode == "iterative":
        for step in range(already, k):
            record = _step(backend, config, step=step, fit_ids=fit_ids, check_ids=check_ids)
            report.steps.append(record)
            if on_step is not None:
                on_step(record, model)
    else:
        remaining = k - already
        cands = candidates(backend.model, config, remaining)
        block = remaining if config.metric == "block" else 1
        scan = backend.scan(config.metric, block_size=block, candidates=cands)
        orig = original_indices(backend.model)
        check_finite(scan, cands, orig)
        chosen = one_shot_choice(scan, cands, config.metric, remaining)
        # Highest index first, so the scan's indices of the layers still to remove stay valid.
        for n_done, current in enumerate(sorted(chosen, reverse=True)):
            record = _remove(backend, config, scan, orig, cands, current, already + n_done, time.perf_counter(),
                             fit_ids=fit_ids, check_ids=check_ids,
                             forwards=scan.layer_forwards if n_done == 0 else 0)
            report.steps.append(record)
            if on_step is not None:
                on_step(record, model)
    report.seconds = time.perf_counter() - t0
    return report
