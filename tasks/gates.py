"""Promotion gates as data, and the Prefect- and MLflow-free decision over them.

A gate compares one metric of the candidate model version either with a fixed threshold or with the current
champion's value. Gates are declared in config files (``deployments/configs/promote-*.yaml``) and validated like
every other parameter; :func:`decide` returns every gate's verdict so a rejection names exactly which gate failed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prunecomp.errors import PrunecompError

__all__ = ["DEFAULT_GATES", "Decision", "GateFailed", "GateResult", "MetricGate", "decide"]


class MetricGate(BaseModel):
    """One gate: ``metric`` of the candidate must be within ``threshold`` (or better than the champion's).

    ``direction`` says which way is better. ``missing="skip"`` lets a gate pass when the metric was not measured
    (QA is optional); ``"fail"`` treats an unmeasured metric as a failure.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    metric: str
    direction: Literal["lower_is_better", "higher_is_better"] = "lower_is_better"
    threshold: float | None = None
    vs_champion: bool = False
    missing: Literal["skip", "fail"] = "fail"

    @model_validator(mode="after")
    def _one_reference(self) -> MetricGate:
        if (self.threshold is None) == (not self.vs_champion):
            raise ValueError(f"gate {self.name!r}: give a threshold, or vs_champion: true (exactly one)")
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
    """A promotion was refused; the message names every failing gate."""

    def __init__(self, decision: Decision, version: str) -> None:
        self.decision = decision
        lines = "; ".join(f"{r.name}: {r.detail}" for r in decision.results if not r.passed)
        super().__init__(f"version {version} not promoted, failing gate(s) {', '.join(decision.failed)} ({lines})")


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


def decide(gates: tuple[MetricGate, ...] | list[MetricGate], candidate: Mapping[str, float],
           champion: Mapping[str, float] | None) -> Decision:
    """Evaluate every gate. Thresholds are inclusive; beating the champion is strict (a tie does not move it).

    Without a champion, ``vs_champion`` gates pass: the first version to clear the thresholds becomes champion.
    """
    results = []
    for gate in gates:
        value = candidate.get(gate.metric)
        if value is None or not math.isfinite(value):
            ok = gate.missing == "skip"
            results.append(GateResult(name=gate.name, passed=ok, detail=f"{gate.metric} not measured"
                                      + (" (skipped)" if ok else "")))
            continue
        if gate.vs_champion:
            ref = None if champion is None else champion.get(gate.metric)
            if ref is None:
                results.append(GateResult(name=gate.name, passed=True,
                                          detail=f"no champion {gate.metric} to beat ({value:.4g})"))
                continue
            ok = _better(value, ref, gate.direction, strict=True)
            results.append(GateResult(name=gate.name, passed=ok,
                                      detail=f"{gate.metric} {value:.4g} vs champion {ref:.4g}"))
        else:
            assert gate.threshold is not None
            ok = _better(value, gate.threshold, gate.direction, strict=False)
            sign = "<=" if gate.direction == "lower_is_better" else ">="
            results.append(GateResult(name=gate.name, passed=ok,
                                      detail=f"{gate.metric} {value:.4g} (needs {sign} {gate.threshold:g})"))
    return Decision(passed=all(r.passed for r in results), results=results)
