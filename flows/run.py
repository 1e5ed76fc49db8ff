"""One compression run's shared context (:class:`Run`: parameters, locations, base model, placement, calibration)
and its position (:class:`State`: the recipe parts so far), with the cached tasks every phase of
:mod:`flows.compress` calls through them: evaluation, the gains fit, the fitting windows, the teacher, the
materialised base and the candidates fanned out to workers."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from flows.journal import Journal
from flows.params import CompressConfig
from flows.placement import Placement
from prunecomp.engine.final_check import held_out_config
from tasks.caching import run_cached
from tasks.calibrate import build_calibration
from tasks.candidates import CandidateJob, score_candidates, split
from tasks.evaluate import evaluate_checkpoint
from tasks.jobs import CalibrationJob, EvalJob, ModelJob, RefineJob, StepJob, TeacherJob
from tasks.model_io import materialize_model
from tasks.refine import refine_state, teacher_predictions
from tasks.settings import Locations

__all__ = ["Run", "State", "base_model", "decision", "fan_out", "teacher"]


@dataclass
class Run:
    """What every phase of one run shares: its parameters, where things are, the base model, where it lives and the
    calibration windows."""

    config: CompressConfig
    loc: Locations
    log: Any
    data_dir: str | None
    code: str
    journal: Journal
    source: dict[str, Any]
    base: dict[str, Any]
    base_cached: bool
    k: int
    placement: Placement
    cal: dict[str, Any] = field(default_factory=dict)
    progress: Any = None
    fit: dict[str, Any] | None = None  # the fitting windows and the teacher, when the gains are fitted
    warm: threading.Thread | None = None

    @property
    def run_id(self) -> str:
        return self.config.run_id()

    @property
    def store(self) -> str:
        return self.loc.store

    @property
    def stream(self) -> bool:
        return self.placement.stream

    @property
    def fits(self) -> int:
        """How many gains fits the run makes: none, one at the end, or one per step (progressive)."""
        p = self.config.prune
        return 0 if p.refine == "none" else (self.k if p.refine_at == "each" else 1)

    def state(self, parts: list[str], digest: str) -> dict[str, Any]:
        return {"store": self.store, "base_uri": self.base["uri"], "base_hash": self.base["hash"],
                "parts": tuple(parts), "state_digest": digest, "stream": self.stream}

    def evaluate(self, parts: list[str], digest: str, evaluation: Any, qa: bool = False,
                 check: bool = False) -> dict[str, Any]:
        c = self.config
        job = EvalJob(store=self.store, checkpoint_hash=digest, base_uri=self.base["uri"],
                      base_hash=self.base["hash"], parts=tuple(parts), stream=self.stream, evaluation=evaluation,
                      data_dir=self.data_dir, qa_tasks=c.qa_tasks if qa else (), qa_limit=c.qa_limit if qa else None,
                      final_check=held_out_config(c.calibration, c.prune) if check else None)
        return dict(run_cached(evaluate_checkpoint, job)[0])

    def quick(self, parts: list[str], digest: str) -> dict[str, float] | None:
        if self.config.quick_eval is None or not self.config.quick_eval.datasets:
            return None
        return dict(self.evaluate(parts, digest, self.config.quick_eval)["perplexity"])

    def fit_windows(self) -> dict[str, Any]:
        """The windows refinement, block reconstruction and the refit fit on: the calibration windows, or their
        own cached superset with ``refine_samples``."""
        if self.fit is not None:
            return self.fit["windows"]
        return _fit_windows(self.config, self.store, self.base, self.cal, self.data_dir)

    def decision_windows(self) -> dict[str, Any] | None:
        """The held-out windows the gains and block reconstruction are kept or declined on (:func:`decision`)."""
        if self.fit is not None:
            return self.fit["check"]
        return decision(self.config, self.store, self.base, self.data_dir)

    def refine(self, parts: list[str], digest: str) -> tuple[dict[str, Any], bool]:
        """One gains fit on the state ``parts`` (cached)."""
        assert self.fit is not None
        p = self.config.prune
        return run_cached(refine_state, RefineJob(
            **self.state(parts, digest), calibration_uri=self.fit["windows"]["uri"],
            calibration_digest=self.fit["windows"]["digest"], teacher_uri=self.fit["teacher"]["uri"], mode=p.refine,
            steps=p.refine_steps, lr=p.refine_lr, batch=p.refine_batch, topk=p.refine_topk, loss=p.refine_loss,
            batch_size=self.config.calibration.batch_size,
            **({} if self.fit.get("check") is None else {"check_uri": self.fit["check"]["uri"],
                                                         "check_digest": self.fit["check"]["digest"]})))


@dataclass
class State:
    """Where the run stands: the recipe parts on top of the base, their digest, the last quick perplexity."""

    parts: list[str]
    digest: str
    ppl: dict[str, float] | None = None

    def then(self, meta: dict[str, Any], ppl: dict[str, float] | None) -> State:
        return State([*self.parts, meta["uri"]], meta["digest"], ppl)


def base_model(config: CompressConfig, source: dict[str, Any], store: str) -> tuple[dict[str, Any], bool]:
    """The run's base model: the source itself when it is safetensors, else its one materialised copy."""
    if source["safetensors"]:
        return {"uri": source["load_uri"], "hash": source["content_hash"], "num_layers": source["num_layers"],
                "materialized": False, "weight_bytes": source["weight_bytes"]}, False
    meta, cached = run_cached(materialize_model, ModelJob(
        store=store, source_uri=config.model, revision=config.revision, source_hash=source["content_hash"],
        allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code))
    from tasks.keys import record_source, source_stamps

    # the store's copy as this run found it: the jobs on it carry the record, their loads check it
    record_source(meta["uri"], meta["hash"], source_stamps(meta["uri"]))
    return dict(meta) | {"materialized": True}, cached


def _fit_windows(config: CompressConfig, store: str, base: dict[str, Any], cal: dict[str, Any],
                 data_dir: str | None) -> dict[str, Any]:
    """The windows refinement and block reconstruction fit on: the calibration windows, or their own cached
    superset with ``refine_samples``."""
    if config.prune.refine_samples is None:
        return cal
    windows, _ = run_cached(build_calibration, CalibrationJob(
        store=store, model_uri=base["uri"], model_hash=base["hash"], data_dir=data_dir,
        calibration=config.calibration.model_copy(update={"n_samples": config.prune.refine_samples})))
    return dict(windows)


def teacher(config: CompressConfig, store: str, base: dict[str, Any], cal: dict[str, Any],
             data_dir: str | None) -> dict[str, Any]:
    """The refinement windows (:func:`_fit_windows`), the dense model's predictions on them (one cached task,
    computed on the dense working copy) and the held-out windows every gains fit must improve to be folded
    (``check``; none when the run keeps no held-out windows)."""
    p = config.prune
    windows = _fit_windows(config, store, base, cal, data_dir)
    teacher, _ = run_cached(teacher_predictions, TeacherJob(
        store=store, base_uri=base["uri"], base_hash=base["hash"], calibration_uri=windows["uri"],
        calibration_digest=windows["digest"], topk=p.refine_topk, batch_size=config.calibration.batch_size))
    return {"windows": windows, "teacher": teacher, "check": decision(config, store, base, data_dir)}


def decision(config: CompressConfig, store: str, base: dict[str, Any], data_dir: str | None) -> dict[str, Any] | None:
    """The held-out windows every gains fit and block reconstruction must improve to be kept (one cached task, the
    held-out draw continued after the final check's windows); None when the run keeps no held-out windows or
    decides nothing on them."""
    if not config.calibration.held_out or not config.prune.decides_held_out:
        return None
    check, _ = run_cached(build_calibration, CalibrationJob(
        store=store, model_uri=base["uri"], model_hash=base["hash"], data_dir=data_dir,
        calibration=held_out_config(config.calibration, config.prune), windows="decision"))
    return dict(check)


def fan_out(config: CompressConfig, job: StepJob, n_src: int, removed: list[int]) -> tuple[dict[int, float],
                                                                                         list[str]]:
    """Score this step's candidates in ``config.parallel_candidates`` tasks on the flow's task runner."""
    protected = config.prune.protected(n_src)
    cands = [i for i in range(n_src) if i not in protected and i not in removed]
    jobs = [CandidateJob(store=job.store, base_uri=job.base_uri, base_hash=job.base_hash, parts=job.parts,
                         state_digest=job.state_digest, calibration_uri=job.calibration_uri,
                         calibration_digest=job.calibration_digest, metric=config.prune.metric, candidates=chunk,
                         batch_size=job.batch_size)
            for chunk in split(cands, config.parallel_candidates)]
    results = [f.result() for f in score_candidates.map(job=jobs)]
    scores = {int(k): float(v) for r in results for k, v in r["scores"].items()}
    return scores, sorted({r["worker"] for r in results})
