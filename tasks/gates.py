"""Promotion gates as data, and the Prefect- and MLflow-free decision over them.

A gate compares one metric of the candidate model version either with a fixed threshold or with the current
champion's value. Gates are declared in config files (``deployments/configs/promote-*.yaml``) and validated like
every other parameter; :func:`decide` returns every gate's verdict so a rejection names exactly which gate failed.

A gate can only be as strict as what it reads, so none of them may pass by accident:

* ``metric`` must be one of the final metrics the compress flow logs (:data:`METRIC_PATTERNS`, the outputs of
  ``flows.registration.run_metrics``): a misspelt name is a validation error, not a metric that is never measured
  and so always skipped;
* a metric that was measured but is NaN (or infinite) fails its gate, whatever ``missing`` says: it is a broken
  evaluation, not an absent one;
* a ``vs_champion`` gate compares only versions evaluated the same way: the caller says why two versions are not
  comparable (different evaluation settings, or a champion whose settings are unknown) and the gate fails with
  that reason instead of comparing perplexities of different datasets, windows or precisions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prunecomp.errors import PrunecompError

__all__ = ["DEFAULT_GATES", "METRIC_PATTERNS", "Decision", "GateFailed", "GateResult", "MetricGate", "decide",
           "is_known_metric"]

METRIC_PATTERNS: tuple[str, ...] = (
    r"layers_removed",
    r"fold_loss_ratio",  # the final check: held-out NLL with the run's folds / without them
    r"ppl_[a-z0-9][a-z0-9_.-]*_(dense|pruned|ratio)",  # per evaluation corpus, and ppl_mean_dense / _pruned
    r"ppl_ratio_mean",
    r"qa_average_(dense|pruned)",
    r"qa_retained",
    r"refit_(error_before|error_after|seconds)",
)
"""The final metrics of a compression run (``flows.registration.run_metrics`` and the refit's), the only names a gate
may read. One place: the gate validation uses it, and a test checks that every metric the flow logs matches."""

_KNOWN = re.compile("|".join(f"(?:{p})" for p in METRIC_PATTERNS))


def is_known_metric(name: str) -> bool:
    """Whether ``name`` is a final metric the compress flow logs (see :data:`METRIC_PATTERNS`)."""
    return _KNOWN.fullmatch(name) is not None


class MetricGate(BaseModel):
    """One gate: ``metric`` of the candidate must be within ``threshold`` (or better than the champion's).

    ``direction`` says which way is better. ``missing="skip"`` lets a gate pass when the metric was not measured
    at all (QA is optional); ``"fail"`` treats an unmeasured metric as a failure. A NaN is never "not measured".
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    metric: str
    direction: Literal["lower_is_better", "higher_is_better"] = "lower_is_better"
    threshold: float | None = None
    vs_champion: bool = False
    missing: Literal["skip", "fail"] = "fail"

    @model_validator(mode="after")
    def _checked(self) -> MetricGate:
        if (self.threshold is None) == (not self.vs_champion):
            raise ValueError(f"gate {self.name!r}: give a threshold, or vs_champion: true (exactly one)")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"gate {self.name!r}: threshold must be a finite number, got {self.threshold}")
        if not is_known_metric(self.metric):
            raise ValueError(
                f"gate {self.name!r}: unknown metric {self.metric!r}; a gate reads one of the final metrics of a "
                "compression run: layers_removed, fold_loss_ratio, ppl_<dataset>_dense/_pruned/_ratio, "
                "ppl_mean_dense/_pruned, ppl_ratio_mean, qa_average_dense/_pruned, qa_retained, "
                "refit_error_before/_after, refit_seconds")
        return self


class GateResult(BaseModel):
    name: str
    passed: bool
    detail: str


class Decision(BaseModel):
    """All verdicts; ``passed`` only when every gate passed."""

    passed: bool
    results: list[GateResult]

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.results if not r.passed]


class GateFailed(PrunecompError):
    """A promotion was refused; the message names every failing gate and says the registry is unchanged."""

    def __init__(self, decision: Decision, version: str) -> None:
        self.decision = decision
        lines = "; ".join(f"{r.name}: {r.detail}" for r in decision.results if not r.passed)
        super().__init__(f"version {version} not promoted, failing gate(s) {', '.join(decision.failed)} ({lines}); "
                         "the registry is unchanged")


DEFAULT_GATES: tuple[MetricGate, ...] = (
    MetricGate(name="max_ppl_increase", metric="ppl_ratio_mean", threshold=3.0),
    MetricGate(name="min_qa_retained", metric="qa_retained", direction="higher_is_better", threshold=0.9,
               missing="skip"),
    MetricGate(name="beat_champion", metric="ppl_mean_pruned", vs_champion=True),
    # the final check: what the run folded (compensation, lsq maps, refinement) must not be worse on held-out
    # calibration windows than removing the same layers without it (ratio of NLLs; 1e-4 of float slack)
    MetricGate(name="folds_not_worse", metric="fold_loss_ratio", threshold=1.0001, missing="skip"),
)


def _better(value: float, reference: float, direction: str, strict: bool) -> bool:
    if direction == "lower_is_better":
        return value < reference if strict else value <= reference
    return value > reference if strict else value >= reference


def _one(gate: MetricGate, value: float | None, champion: Mapping[str, float] | None,
         incomparable: str | None) -> GateResult:
    if value is None:
        ok = gate.missing == "skip"
        return GateResult(name=gate.name, passed=ok,
                          detail=f"{gate.metric} not measured" + (" (skipped)" if ok else ""))
    if not math.isfinite(value):  # measured, but broken: never taken for "not measured"
        return GateResult(name=gate.name, passed=False,
                          detail=f"{gate.metric} is {value} (a failed evaluation); re-evaluate the version")
    if not gate.vs_champion:
        assert gate.threshold is not None
        ok = _better(value, gate.threshold, gate.direction, strict=False)
        sign = "<=" if gate.direction == "lower_is_better" else ">="
        return GateResult(name=gate.name, passed=ok,
                          detail=f"{gate.metric} {value:.4g} (needs {sign} {gate.threshold:g})")
    if champion is None:
        return GateResult(name=gate.name, passed=True, detail=f"no champion to beat ({gate.metric} {value:.4g})")
    if incomparable is not None:
        return GateResult(name=gate.name, passed=False, detail=incomparable)
    ref = champion.get(gate.metric)
    if ref is None or not math.isfinite(ref):
        return GateResult(name=gate.name, passed=False,
                          detail=f"the champion's {gate.metric} is {'missing' if ref is None else ref}, so there "
                                 "is nothing to compare with; re-evaluate the champion, or promote with gates "
                                 "that do not compare with it")
    ok = _better(value, ref, gate.direction, strict=True)
    return GateResult(name=gate.name, passed=ok, detail=f"{gate.metric} {value:.4g} vs champion {ref:.4g}")


def decide(gates: tuple[MetricGate, ...] | list[MetricGate], candidate: Mapping[str, float],
           champion: Mapping[str, float] | None, *, incomparable: str | None = None) -> Decision:
    """Evaluate every gate. Thresholds are inclusive; beating the champion is strict (a tie does not move it).

    Without a champion, ``vs_champion`` gates pass: the first version to clear the thresholds becomes champion.
    ``incomparable`` is why the candidate's metrics cannot be compared with the champion's (different evaluation
    settings); every ``vs_champion`` gate then fails with it. No gates at all is an error: a promotion with
    nothing checked would move the alias to anything.
    """
    if not gates:
        raise PrunecompError("no promotion gates given; pass at least one (the default gates, or a gates file with "
                             "a non-empty `gates:` list)")
    results = [_one(gate, candidate.get(gate.metric), champion, incomparable) for gate in gates]
    return Decision(passed=all(r.passed for r in results), results=results)
