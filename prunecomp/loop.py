"""The one Prune&Comp loop: score -> remove the least important layer -> fold the gap scale -> re-score.

The CLI (through :func:`prunecomp.compress.compress`, which adds refinement around it), the Prefect tasks and
notebooks all call :func:`prune_and_compensate` (or :func:`prune_step`, one iteration, for orchestrators that
checkpoint between steps). Observers hook in through ``on_step``; nothing here knows about Prefect, MLflow, files
or refinement.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from torch import Tensor, nn

from prunecomp.adapters import decoder_layers, get_adapter
from prunecomp.calibration import TokenWindows
from prunecomp.compensation import compensate
from prunecomp.config import CalibrationConfig, PruneConfig
from prunecomp.errors import PrunecompError
from prunecomp.evaluation.perplexity import mean_nll
from prunecomp.guard import GuardResult, guard_in_memory
from prunecomp.hooks import restored
from prunecomp.incremental import PER_CANDIDATE_METRICS, IncrementalScanner
from prunecomp.lsq import GapFit, apply_gap_map, fit_gap_map, gap_map_tensors
from prunecomp.planning import candidates, check_finite, check_plan, choose, one_shot_choice, source_num_layers
from prunecomp.pruning import original_indices, remove_layer
from prunecomp.reconstruct import capture_gap, layer_tensors, reconstruct
from prunecomp.report import PruneReport, StepRecord
from prunecomp.scanners import Scanner, exact_scanner, make_scanner
from prunecomp.scoring import LayerScan, scan_layers
from prunecomp.selection import select_by_guard, select_by_loss

__all__ = [
    "PruneReport",
    "StepRecord",
    "check_plan",
    "make_scanner",
    "prune_and_compensate",
    "prune_step",
    "source_num_layers",
]

log = logging.getLogger(__name__)


def _windows(calibration: TokenWindows | Tensor) -> Tensor:
    return calibration.ids if isinstance(calibration, TokenWindows) else calibration


def _scan(model: nn.Module, ids: Tensor, config: PruneConfig, scanner: Scanner | None, *,
          batch_size: int, block: int, cands: list[int], on_batch: Callable[[], None] | None) -> LayerScan:
    scanner = scanner or exact_scanner(model, ids, batch_size=batch_size, on_batch=on_batch)
    return scanner.scan(config.metric, block_size=block, candidates=cands)


def _with_scores(model: nn.Module, ids: Tensor, config: PruneConfig, scores: Mapping[int, float], cands: list[int],
                 *, batch_size: int) -> LayerScan:
    """A scan whose scores come from ``scores`` (original indices) and whose gap scales are measured here."""
    if config.metric not in PER_CANDIDATE_METRICS:
        raise PrunecompError(f"precomputed scores are for per-candidate metrics {sorted(PER_CANDIDATE_METRICS)}, "
                             f"not {config.metric!r}")
    orig = original_indices(model)
    missing = [orig[i] for i in cands if orig[i] not in scores]
    if missing:
        raise PrunecompError(f"precomputed scores lack candidate layers {missing}")
    scan = scan_layers(model, ids, "bi", batch_size=batch_size)  # one pass: the gap scales
    return LayerScan(scores=[float(scores.get(o, float("inf"))) for o in orig], scales=scan.scales,
                     layer_forwards=scan.layer_forwards)


def prune_step(
    model: nn.Module,
    calibration: TokenWindows | Tensor,
    config: PruneConfig,
    *,
    step: int,
    batch_size: int = 4,
    on_batch: Callable[[], None] | None = None,
    scanner: Scanner | None = None,
    scores: Mapping[int, float] | None = None,
    fit_windows: TokenWindows | Tensor | None = None,
) -> StepRecord:
    """One iteration on ``model`` (in place): score all layers, remove one, compensate. ``step`` counts from 0.

    ``scanner`` (see :func:`make_scanner`) carries cached activations from the previous step of the same model;
    without it the step scores from scratch. ``scores`` (ORIGINAL layer index -> score) are a per-candidate
    metric's scores computed elsewhere (fanned out over workers, see :func:`prunecomp.incremental.candidate_scores`);
    the step then only runs the one pass that measures the gap scales. ``fit_windows``: the windows of
    ``config.reconstruct``'s local fit (default: ``calibration``).
    """
    t0 = time.perf_counter()
    get_adapter(model)
    n_src = source_num_layers(model)
    k = config.layers_to_remove(n_src)
    already = n_src - len(decoder_layers(model))
    remaining = k - already
    if remaining <= 0:
        raise PrunecompError(f"the model already has {already} of {k} layers removed: nothing left to do")
    cands = candidates(model, config, remaining)
    block = remaining if config.metric == "block" else 1
    if scores is None:
        scan = _scan(model, _windows(calibration), config, scanner, batch_size=batch_size, block=block, cands=cands,
                     on_batch=on_batch)
    else:
        scan = _with_scores(model, _windows(calibration), config, scores, cands, batch_size=batch_size)
    check_finite(scan, cands, original_indices(model))
    current = choose(scan, cands, config.metric, block)
    trials: dict[int, float] | None = None
    guard: GuardResult | None = None
    if config.selection == "loss" and config.metric != "block":
        if config.compensation == "guarded":
            current, trials, guard = select_by_guard(
                model, _windows(calibration), config, scan.scores, scan.scales, cands, batch_size,
                lambda i: scanner.boundary(i) if scanner is not None else None)
        else:
            current, trials = select_by_loss(model, _windows(calibration), config, scan.scores, scan.scales, cands,
                                             batch_size)
    orig = original_indices(model)
    record = _apply(model, config, scan, orig, cands, current, step, t0, ids=_windows(calibration),
                    batch_size=batch_size, scanner=scanner, guard=guard,
                    fit_ids=None if fit_windows is None else _windows(fit_windows))
    if trials is not None:  # compensated calibration NLL of every trial, by original index, for the audit trail
        record.selection_losses = {orig[i]: v for i, v in trials.items()}
    return record


def _apply(model: nn.Module, config: PruneConfig, scan: LayerScan, orig: list[int], cands: list[int],
           current: int, step: int, t0: float, *, ids: Tensor, batch_size: int,
           forwards: int | None = None, scanner: Scanner | None = None, guard: GuardResult | None = None,
           fit_ids: Tensor | None = None) -> StepRecord:
    """Remove scan-index ``current`` (also its current index: layers above it may be gone, none below).

    ``guard``: the guard's measurement for this layer when selection already made it. ``fit_ids``: the windows of
    the local fit (``config.reconstruct``; default ``ids``), whose streams are read before the removal."""
    chosen = orig[current]
    s = scan.scales[current]
    if config.guarded and guard is None:  # measured while the layer is still there, from the cached gap stream
        guard = guard_in_memory(model, ids, current, s, config.guard_exponents, batch_size=batch_size,
                                cached=scanner.boundary(current) if scanner is not None else None)
    applied = guard.scale if guard is not None else (s if config.compensation == "magnitude" else 1.0)
    fit = None
    if config.compensation == "lsq":  # fitted while the layer is still there: its output is the target
        fit = fit_gap_map(model, ids, current, applied, ridge=config.lsq_ridge, batch_size=batch_size)
    gap = None
    if config.reconstruct != "none":  # read while the layer is still there: the stream it (or the next) leaves
        gap = capture_gap(model, current, ids if fit_ids is None else fit_ids, config.reconstruct,
                          batch_size=config.reconstruct_batch)
        if gap is None:
            log.info("layer %d: no layer %s it to reconstruct", chosen, config.reconstruct)
    remove_layer(model, current)
    if applied != 1.0:  # a scale of 1 folds nothing (and (1 + w) * 1 - 1 could round a Gemma norm weight)
        compensate(model, current, applied)
    if fit is not None:
        assert guard is not None
        fit = _keep_if_better(model, ids, current, fit, guard, batch_size)
    local, weights, fitted = None, None, []
    if gap is not None:
        fitted = gap.fitted()
        done = reconstruct(model, gap, applied, steps=config.reconstruct_steps, lr=config.reconstruct_lr,
                           seed=step, removed=chosen, originals=original_indices(model))
        local, weights = done.to_dict(), layer_tensors(model, fitted) if done.kept else None
        log.info("layer %d: reconstructed layer(s) %s, error %.4f -> %.4f%s", chosen, done.layers, done.loss_before,
                 done.loss_after, "" if done.kept else " (declined: the fit did not lower it)")
        del gap
    if guard is not None:
        log.info("layer %d: %s", chosen, guard.summary())
    if scanner is not None:
        scanner.removed(current, applied)
        if fit is not None:  # a gap map changes the output of the layer it is folded into (or the embedding's)
            scanner.invalidate(current - 1 if current > 0 else None)
        if weights is not None:  # the fitted layers' outputs changed beyond a rescale
            scanner.invalidate(min(fitted))
    return StepRecord(
        step=step,
        metric=config.metric,
        scores={orig[i]: scan.scores[i] for i in range(len(orig))},
        candidates=[orig[i] for i in cands],
        chosen=chosen,
        chosen_current=current,
        measured_scale=s,
        applied_scale=applied,
        layers_after=len(decoder_layers(model)),
        seconds=time.perf_counter() - t0,
        layer_forwards=scan.layer_forwards if forwards is None else forwards,
        gap_fit=None if fit is None else {"error_before": fit.error_before, "error_after": fit.error_after},
        gap_map=None if fit is None else fit.t,
        guard=None if guard is None else guard.to_dict(),
        reconstruct=local,
        layer_weights=weights,
    )


def _keep_if_better(model: nn.Module, ids: Tensor, current: int, fit: GapFit, guard: GuardResult,
                    batch_size: int) -> GapFit | None:
    """Fold the lsq map (layer already removed and the guarded scale folded) only when it lowers the calibration
    NLL; both sides measured by the same full forward. Records the comparison on ``guard``."""
    without = mean_nll(model, ids, batch_size=batch_size)
    with restored(gap_map_tensors(model, current)) as keep:
        apply_gap_map(model, current, fit)
        guard.map_loss = mean_nll(model, ids, batch_size=batch_size)
        guard.map_kept = guard.map_loss < without
        keep(guard.map_kept)
    return fit if guard.map_kept else None


def prune_and_compensate(
    model: nn.Module,
    calibration: TokenWindows | Tensor,
    config: PruneConfig,
    *,
    batch_size: int = 4,
    on_step: Callable[[StepRecord, nn.Module], None] | None = None,
    on_batch: Callable[[], None] | None = None,
    calibration_config: CalibrationConfig | None = None,
    cache_budget_bytes: int | None = None,
    fit_windows: TokenWindows | Tensor | None = None,
) -> PruneReport:
    """Remove layers from ``model`` in place until the configured count is gone; return the report.

    Iterative mode re-scores the compensated model after every removal (the paper's method). One-shot mode scores
    once and removes the chosen layers from the highest index down, each compensated with its own measured scale.
    ``on_step(record, model)`` runs after every removal, with the model in its new state.
    ``config.scoring="incremental"`` (default) keeps the residual stream of every layer boundary between steps
    and re-runs only the layers after each gap (:mod:`prunecomp.incremental`), within ``cache_budget_bytes``
    (default: a quarter of physical memory; over it, exact scoring).
    ``config.refine`` is not applied here: refinement needs the dense model's predictions from before the first
    removal and runs after the last one, so the caller wires it (:func:`prunecomp.compress.compress` in memory,
    the pipeline's own refine task). ``fit_windows``: the windows of ``config.reconstruct``'s local fit after
    each removal (default: ``calibration``).
    """
    t0 = time.perf_counter()
    get_adapter(model)
    n_src = source_num_layers(model)
    k = config.layers_to_remove(n_src)
    report = PruneReport(config=config.model_dump(mode="json"), source_num_layers=n_src)
    if isinstance(calibration, TokenWindows):
        report.calibration = {"origin": calibration.origin, "digest": calibration.digest,
                              "n_samples": calibration.n, "seq_len": calibration.seq_len}
    if calibration_config is not None:
        report.calibration["config"] = calibration_config.model_dump(mode="json")
    already = n_src - len(decoder_layers(model))
    scanner = make_scanner(model, calibration, config, batch_size=batch_size, on_batch=on_batch,
                           cache_budget_bytes=cache_budget_bytes)
    report.scoring = "incremental" if isinstance(scanner, IncrementalScanner) else "exact"
    if config.mode == "iterative":
        for step in range(already, k):
            record = prune_step(model, calibration, config, step=step, batch_size=batch_size, on_batch=on_batch,
                                scanner=scanner, fit_windows=fit_windows)
            report.steps.append(record)
            if on_step is not None:
                on_step(record, model)
    else:
        remaining = k - already
        cands = candidates(model, config, remaining)
        block = remaining if config.metric == "block" else 1
        scan = _scan(model, _windows(calibration), config, scanner, batch_size=batch_size, block=block,
                     cands=cands, on_batch=on_batch)
        scanner = None  # one-shot removes several layers from one scan: the cache is not needed again
        check_finite(scan, cands, original_indices(model))
        chosen = one_shot_choice(scan, cands, config.metric, remaining)
        orig = original_indices(model)
        # Highest index first, so the scan's indices of the layers still to remove stay valid.
        for n_done, current in enumerate(sorted(chosen, reverse=True)):
            record = _apply(model, config, scan, orig, cands, current, already + n_done, time.perf_counter(),
                            ids=_windows(calibration), batch_size=batch_size,
                            forwards=scan.layer_forwards if n_done == 0 else 0,
                            fit_ids=None if fit_windows is None else _windows(fit_windows))
            report.steps.append(record)
            if on_step is not None:
                on_step(record, model)
    report.seconds = time.perf_counter() - t0
    return report

