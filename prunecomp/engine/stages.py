"""The method's stages at one removal, as parts: each a small component with its own typed settings, composed by
the loop (:mod:`prunecomp.engine.loop`) in the order of :data:`STAGES`.

One removal, as every stage sees it (a :class:`Gap`): the layer to remove has been chosen (see
:data:`SELECTIONS`); each stage's ``before`` runs while the layer is still there (the guard measures the scale to
fold, the lsq map and block reconstruction read the streams the layer writes); the loop then removes the layer and
folds the scale upstream (:meth:`prunecomp.engine.backends.Backend.remove`); each stage's ``after`` runs on the model
without it (the gap map is folded, the layers beside the gap are fitted). What a stage decides goes into
``gap.record`` (fields of :class:`~prunecomp.recipes.report.StepRecord`), so the audit trail needs no loop change
either.

A new method is one component and one :func:`register` call: it states when it runs (``wanted``), what it needs
of the backend (``needs``: names of :class:`~prunecomp.engine.backends.Capabilities` abilities, checked before any
work in :func:`refusal`) and its part of the step. The stages that run once after the last removal (the refit, the
gains: they need the dense model) are components too (:data:`FINISHERS`), run by
:func:`prunecomp.engine.compress.compress` after the loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn

from prunecomp.config import PruneConfig, StageSettings
from prunecomp.engine.backends import ABILITIES, Capabilities
from prunecomp.engine.dense import DenseSource, as_dense
from prunecomp.errors import PrunecompError
from prunecomp.method.guard import GuardResult
from prunecomp.method.planning import choose
from prunecomp.method.reconstruct import describe as describe_reconstruct
from prunecomp.method.refine import RefineReport, TeacherTargets, refine
from prunecomp.method.refit import RefitReport, sequential_refit
from prunecomp.method.scoring import LayerScan
from prunecomp.recipes.report import PruneReport, StepRecord

if TYPE_CHECKING:
    from prunecomp.engine.backends import Backend

__all__ = ["FINISHERS", "SELECTIONS", "STAGES", "Finish", "Finisher", "Gains", "Gap", "Refit", "Selection", "Stage",
           "StageSpec", "active_stages", "finishing_stages", "refusal", "register", "stage_needs", "unregister"]

log = logging.getLogger(__name__)


@dataclass
class Gap:
    """One removal as the stages see it. ``current``: the layer's index now; ``chosen``: its original index;
    ``measured``: the paper's gap scale s; ``scale``: what the loop folds upstream (the compensation stage sets
    it; 1.0 folds nothing); ``fit_ids``: the windows local fits use; ``check_ids``: held-out windows on which a
    local fit must lower its error too to be kept (None: decided on ``fit_ids`` alone)."""

    backend: Backend
    ids: Tensor
    fit_ids: Tensor
    batch_size: int
    step: int
    current: int
    chosen: int
    measured: float
    scale: float = 1.0
    guard: GuardResult | None = None
    record: dict[str, Any] = field(default_factory=dict)
    check_ids: Tensor | None = None


class Stage(Protocol):
    """A part of one removal: ``before`` with the layer still there, ``after`` once it is removed and the scale
    folded."""

    def before(self, gap: Gap) -> None: ...

    def after(self, gap: Gap) -> None: ...


@dataclass(frozen=True)
class StageSpec:
    """A registered stage: its name, when a configuration runs it, how it is built from the configuration (its
    own typed settings: :meth:`PruneConfig.stage`) and what it needs of the backend."""

    name: str
    wanted: Callable[[PruneConfig], bool]
    build: Callable[[PruneConfig], Stage]
    needs: frozenset[str] = frozenset()
    option: str = ""
    """The flag and config key that turn the stage on, for refusals."""


# --- compensation: what is folded at the gap --------------------------------------------------------------------


@dataclass(frozen=True)
class Fixed:
    """``none`` (fold nothing) or ``magnitude`` (fold the measured s: the paper, bit for bit)."""

    fold: bool

    def before(self, gap: Gap) -> None:
        gap.scale = gap.measured if self.fold else 1.0

    def after(self, gap: Gap) -> None:
        return None


@dataclass(frozen=True)
class Guarded:
    """Fold ``s ** a`` for the exponent ``a`` that lowers the calibration loss most (:mod:`prunecomp.method.guard`);
    measured while the layer is still there (from the scanner's cached stream where there is one), unless
    selection already measured it."""

    settings: StageSettings  # the compensation stage's: guard_exponents

    def before(self, gap: Gap) -> None:
        if gap.guard is None:
            gap.guard = gap.backend.guard(gap.current, gap.measured, self.settings.guard_exponents)
        gap.scale = gap.guard.scale

    def after(self, gap: Gap) -> None:
        assert gap.guard is not None
        log.info("layer %d: %s", gap.chosen, gap.guard.summary())


@dataclass
class GapMap:
    """``lsq``: a least-squares map of the gap, fitted while the layer is there (its output is the target),
    folded into the last writer before the gap and kept only when it lowers the calibration loss (the guard's
    record keeps the comparison either way)."""

    settings: StageSettings  # the compensation stage's: lsq_ridge
    _fit: Any = None

    def before(self, gap: Gap) -> None:
        self._fit = gap.backend.fit_gap_map(gap.current, gap.scale, ridge=self.settings.lsq_ridge)

    def after(self, gap: Gap) -> None:
        assert gap.guard is not None
        fit, self._fit = self._fit, None
        if fit is None:  # a family with no single writer before the gap (sandwich norms): nothing to fold
            return
        if gap.backend.keep_gap_map(gap.current, fit, gap.guard):
            gap.record |= {"gap_fit": {"error_before": fit.error_before, "error_after": fit.error_after},
                           "gap_map": fit.t}
            gap.backend.changed(gap.current - 1 if gap.current > 0 else None)


@dataclass
class Reconstruct:
    """Block reconstruction: the layer(s) beside the gap fitted to write the stream the model had there before
    the removal (:mod:`prunecomp.method.reconstruct`); streams read while the layer is there, the fit after."""

    settings: StageSettings  # the reconstruct stage's: method (the side), steps, lr, batch
    _streams: Any = None

    def before(self, gap: Gap) -> None:
        self._streams = gap.backend.capture_gap(gap.current, gap.fit_ids, self.settings.method,
                                                batch_size=self.settings.batch, check=gap.check_ids)
        if self._streams is None:
            log.info("layer %d: no layer %s it to reconstruct", gap.chosen, self.settings.method)

    def after(self, gap: Gap) -> None:
        streams, self._streams = self._streams, None
        if streams is None:
            return
        fitted = streams.fitted()
        done, weights = gap.backend.fit_layers(streams, gap.scale, steps=self.settings.steps, lr=self.settings.lr,
                                               seed=gap.step, removed=gap.chosen)
        log.info("layer %d: %s", gap.chosen, describe_reconstruct(done.to_dict()))
        gap.record |= {"reconstruct": done.to_dict(), "layer_weights": weights}
        if weights is not None:
            gap.backend.changed(min(fitted))


def _compensation(config: PruneConfig) -> Stage:
    if config.compensation in ("guarded", "lsq"):
        return Guarded(config.stage("compensation"))
    return Fixed(fold=config.compensation == "magnitude")


STAGES: list[StageSpec] = [
    StageSpec("compensation", lambda c: True, _compensation, option="--compensation (compensation)"),
    StageSpec("lsq", lambda c: c.compensation == "lsq", lambda c: GapMap(c.stage("compensation")),
              needs=frozenset({"gap_map"}), option="--compensation lsq (compensation: lsq)"),
    StageSpec("reconstruct", lambda c: c.reconstruct != "none", lambda c: Reconstruct(c.stage("reconstruct")),
              needs=frozenset({"reconstruct"}), option="--reconstruct (reconstruct)"),
]
"""The stages of one removal, in the order their ``before`` (and ``after``) run."""


def active_stages(config: PruneConfig) -> list[Stage]:
    """The stages ``config`` runs at each removal, built, in order."""
    return [s.build(config) for s in STAGES if s.wanted(config)]


def stage_needs(config: PruneConfig) -> list[tuple[StageSpec, str]]:
    """``(stage, ability)`` for every backend ability the configured stages need (at each removal and after the
    last)."""
    return [(s, need) for s in (*STAGES, *FINISHERS) if s.wanted(config) for need in sorted(s.needs)]


# --- after the last removal: the fits that need the dense model ---------------------------------------------------


@dataclass
class Finish:
    """The run after its last removal, as the finishing stages see it: the pruned model (in memory), the windows the
    fits use, the dense model's predictions (the gains' teacher, taken before the first removal) and the dense
    source (the refit's), the report they add to, and the caller's observers."""

    model: nn.Module
    windows: Tensor
    report: PruneReport
    targets: TeacherTargets | None = None
    dense: DenseSource | None = None
    on_refit: Callable[[RefitReport], None] | None = None
    on_refine: Callable[[RefineReport, StepRecord | None, nn.Module], None] | None = None
    check: Tensor | None = None  # held-out windows a gains fit must improve to be folded


class Finisher(Protocol):
    """A stage that runs once, after the last removal."""

    def finish(self, run: Finish) -> None: ...


@dataclass(frozen=True)
class Refit:
    """The sequential refit: every layer after the first gap, in order, fitted to the dense source's stream
    (:mod:`prunecomp.method.refit`); ``batch``: windows a step (the reconstruction's setting)."""

    settings: StageSettings  # the refit stage's: method, steps, lr
    batch: int

    def finish(self, run: Finish) -> None:
        done, weights = sequential_refit(run.model, run.windows, as_dense(run.dense), steps=self.settings.steps,
                                         lr=self.settings.lr, batch_size=self.batch)
        run.report.add_refit(done.to_dict(), weights)
        if run.on_refit is not None:
            run.on_refit(done)


@dataclass(frozen=True)
class Gains:
    """Per-channel gains distilled from the dense model's predictions and folded (:mod:`prunecomp.method.refine`):
    once at the end, or (``at="each"``) after every removal, which :func:`prunecomp.engine.compress.compress` runs
    with :meth:`fit` between removals."""

    settings: StageSettings  # the refine stage's: method, steps, lr, batch, topk, loss, samples, at

    def fit(self, model: nn.Module, windows: Tensor, targets: TeacherTargets,
            check: Tensor | None = None) -> RefineReport:
        s = self.settings
        done = refine(model, windows, targets, mode=s.method, steps=s.steps, lr=s.lr, batch_size=s.batch,
                      loss=s.loss, check=check)
        if not done.kept:
            log.warning("gains declined: next-token NLL on %d held-out windows %.4f with them, %.4f without",
                        done.check_windows, done.check_loss_after, done.check_loss_before)
        return done

    def finish(self, run: Finish) -> None:
        if self.settings.at != "end":
            return
        assert run.targets is not None
        done = self.fit(run.model, run.windows, run.targets, run.check)
        run.report.add_refine(done)
        if run.on_refine is not None:
            run.on_refine(done, None, run.model)


FINISHERS: list[StageSpec] = [
    StageSpec("refit", lambda c: c.refit != "none", lambda c: Refit(c.stage("refit"), c.reconstruct_batch),
              needs=frozenset({"refit"}), option="--refit (refit)"),
    StageSpec("refine", lambda c: c.refine != "none", lambda c: Gains(c.stage("refine")),
              needs=frozenset({"refine"}), option="--refine (refine)"),
]
"""The stages after the last removal, in order (the refit before the gains: the gains fit the refitted model)."""


def register(spec: StageSpec, *, after: str | None = None, finishing: bool = False) -> None:
    """Add a stage (after the stage named ``after``, default last) to the stages of each removal, or with
    ``finishing`` to those after the last removal (:data:`FINISHERS`). A name already registered is an error."""
    where = FINISHERS if finishing else STAGES
    if any(s.name == spec.name for s in (*STAGES, *FINISHERS)):
        raise PrunecompError(f"a stage named {spec.name!r} is already registered")
    at = len(where) if after is None else [s.name for s in where].index(after) + 1
    where.insert(at, spec)


def unregister(name: str) -> None:
    """Remove the stage ``name`` (tests that register a toy stage clean up with it)."""
    STAGES[:] = [s for s in STAGES if s.name != name]
    FINISHERS[:] = [s for s in FINISHERS if s.name != name]


def finishing_stages(config: PruneConfig) -> list[Finisher]:
    """The finishing stages ``config`` runs, built, in order."""
    return [s.build(config) for s in FINISHERS if s.wanted(config)]


# --- selection: which layer goes --------------------------------------------------------------------------------


@dataclass
class Selection:
    """The layer to remove (index now), the calibration loss of every trial (selection by loss) and the guard's
    measurement of the winner when selection made it."""

    current: int
    trials: dict[int, float] | None = None
    guard: GuardResult | None = None


def _by_score(backend: Backend, scan: LayerScan, cands: Sequence[int], config: PruneConfig, block: int
              ) -> Selection:
    return Selection(choose(scan, list(cands), config.metric, block))


def _by_loss(backend: Backend, scan: LayerScan, cands: Sequence[int], config: PruneConfig, block: int
             ) -> Selection:
    if config.metric == "block":  # a block's removal is one decision: no per-layer trials
        return _by_score(backend, scan, cands, config, block)
    current, trials, guard = backend.select_by_loss(scan, list(cands), config)
    return Selection(current, trials, guard)


SELECTIONS: dict[str, tuple[Callable[[Backend, LayerScan, Sequence[int], PruneConfig, int], Selection],
                            frozenset[str]]] = {
    "score": (_by_score, frozenset()),
    "loss": (_by_loss, frozenset({"trials"})),
}
"""Selection method -> (the function that picks the layer, the backend abilities it needs)."""


def refusal(backend: Capabilities, config: PruneConfig, *, qa: bool = False) -> str | None:
    """Why ``config`` (and QA evaluation, with ``qa``) cannot run on ``backend``, or ``None`` when it can: the
    metric and mode, then every ability the configured stages need (:func:`stage_needs`), the selection method's
    (the stages after the last removal included)."""
    for what, value, allowed in (("metric", config.metric, backend.metrics), ("mode", config.mode, backend.modes)):
        if allowed is not None and value not in allowed:
            return (f"{backend.name} cannot run {what} {value!r} (it runs {', '.join(sorted(allowed))}; "
                    f"{backend.why}); drop the option or run in memory")
    needs = [need for _stage, need in stage_needs(config)]
    needs += sorted(SELECTIONS[config.selection][1])
    needs += ["qa"] if qa else []
    for need in needs:
        if need not in backend.abilities:
            return (f"{backend.name} cannot run {ABILITIES[need]} ({backend.why}); run it in memory, or leave "
                    "that stage out")
    return None
