"""The audit trail of a run: per-step tables and the run summary, as plain data and markdown.

Builders are pure (tested without Prefect); :func:`publish_step` and :func:`publish_summary` hand them to
Prefect's artifact API and must run inside a flow or task run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prunecomp.engine.final_check import line as final_line
from prunecomp.method.guard import guard_cell, guard_line
from prunecomp.method.reconstruct import describe as describe_reconstruct
from prunecomp.method.refit import describe_refit

__all__ = ["publish_step", "publish_summary", "step_description", "step_rows", "summary_markdown"]


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def step_rows(step: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per original layer still present before the step: its score, and whether it was removed."""
    rec = step["record"]
    rows = []
    for layer, score in sorted(rec["scores"].items(), key=lambda kv: int(kv[0])):
        rows.append({"layer": int(layer), "score": score, "candidate": int(layer) in rec["candidates"],
                     "removed": int(layer) == rec["chosen"]})
    return rows


def _mean(d: Mapping[str, float] | None) -> float | None:
    return sum(d.values()) / len(d) if d else None


def step_description(step: Mapping[str, Any]) -> str:
    rec = step["record"]
    before, after = _mean(step.get("ppl_before")), _mean(step.get("ppl_after"))
    return (f"Step {rec['step'] + 1}: removed original layer **{rec['chosen']}** (metric {rec['metric']}), "
            f"scale s = {rec['measured_scale']:.5f} (applied {rec['applied_scale']:.5f}"
            f"{'; guard: ' + guard_line(rec['guard']) if rec.get('guard') else ''}), quick perplexity "
            f"{_fmt(before)} -> {_fmt(after)}, {rec['seconds']:.1f} s"
            f"{' (reused from cache)' if step.get('reused') else ''}; {rec['layers_after']} layers left."
            + _reconstructed_sentence(rec.get("reconstruct")) + _refined_sentence(step.get("refine")))


def _reconstructed_sentence(rec: Mapping[str, Any] | None) -> str:
    if not rec:
        return ""
    text = describe_reconstruct(dict(rec))
    return f" {text[0].upper()}{text[1:]}."


def _refined_sentence(fit: Mapping[str, Any] | None) -> str:
    if not fit:
        return ""
    r = fit["report"]
    return (f" Then refined ({r['mode']}, {r['steps']} steps): calibration KL {r['loss_before']:.4f} -> "
            f"{r['loss_after']:.4f}, quick perplexity {_fmt(_mean(fit.get('ppl_before')))} -> "
            f"{_fmt(_mean(fit.get('ppl_after')))}; the next step scores the refined model.")


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown report of a finished run: what was removed, quality before/after, lineage, where things are."""
    lines = [f"# prunecomp run `{summary['run_id']}`", "",
             f"- model: `{summary['source']['uri']}` (sha256 `{summary['source']['content_hash'][:16]}`)",
             f"- metric: {summary['config']['prune']['metric']}, compensation: "
             f"{summary['config']['prune']['compensation']}, removed {len(summary['steps'])} layers "
             f"(original indices {summary['removed']})",
             f"- calibration: {summary['calibration']['origin']} ({summary['calibration']['n_samples']} x "
             f"{summary['calibration']['seq_len']}, digest `{summary['calibration']['digest'][:16]}`)",
             f"- code version: `{summary['code_version']}`",
             f"- stopped because: {summary['stop_reason']}",
             f"- checkpoint: `{summary['final']['uri']}`", ""]
    check = summary.get("final_check")
    if check:
        lines[-1:-1] = [f"- {'**' if check['verdict'] == 'worse' else ''}{final_line(check)}"
                        f"{'**' if check['verdict'] == 'worse' else ''}"]
    if summary.get("refit"):
        lines[-1:-1] = [f"- {describe_refit(summary['refit']['report'])}"]
    progressive = any(s.get("refine") for s in summary["steps"])
    lines += ["| step | layer | score | measured s | folded | guard | quick ppl before | quick ppl after | seconds "
              f"| cached |{' refined: KL | refine (s) |' if progressive else ''}",
              f"|---:|---:|---:|---:|---:|:---:|---:|---:|---:|:---:|{'---:|---:|' if progressive else ''}"]
    for s in summary["steps"]:
        rec = s["record"]
        fit = (s.get("refine") or {}).get("report")
        extra = ""
        if progressive:
            extra = (f" {fit['loss_before']:.4f} -> {fit['loss_after']:.4f} | {fit['seconds']:.0f} |" if fit else
                     " - | - |")
        lines.append(f"| {rec['step'] + 1} | {rec['chosen']} | {_fmt(rec['scores'].get(str(rec['chosen'])))} | "
                     f"{rec['measured_scale']:.4f} | {rec['applied_scale']:.4f} | {guard_cell(rec.get('guard'))} | "
                     f"{_fmt(_mean(s.get('ppl_before')))} | "
                     f"{_fmt(_mean(s.get('ppl_after')))} | {rec['seconds']:.1f} | {'yes' if s.get('reused') else ''} |"
                     + extra)
    ppl = summary.get("perplexity") or {}
    if ppl:
        lines += ["", "| dataset | dense | pruned | ratio |", "|---|---:|---:|---:|"]
        for name, v in ppl.items():
            lines.append(f"| {name} | {v['dense']:.3f} | {v['pruned']:.3f} | {v['pruned'] / v['dense']:.3f} |")
    qa = summary.get("qa")
    if qa:
        lines += ["", f"QA average: dense {_fmt(qa.get('dense'))}, pruned {_fmt(qa.get('pruned'))}"]
    if summary.get("mlflow"):
        m = summary["mlflow"]
        lines += ["", f"MLflow: run `{m.get('run_id')}`, model `{m.get('name')}` version {m.get('version')}"]
    return "\n".join(lines) + "\n"


def publish_step(run_id: str, step: Mapping[str, Any]) -> None:
    """A Prefect table artifact of all layer scores of one step (key ``<run>-step-<n>``, so the UI keeps
    its history across re-runs)."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(step_rows(step), key=_key(f"{run_id}-step-{step['step'] + 1}"),
                          description=step_description(step))


class RunProgress:
    """The run's Prefect progress artifact (key ``<run>-progress``): how far a long run is, in the UI, without the
    terminal. Stages: the dense evaluation, each step, refinement, the final write and evaluation, MLflow."""

    def __init__(self, run_id: str, total: int) -> None:
        from prefect.artifacts import create_progress_artifact

        self.total, self.done = max(total, 1), 0
        self.id = create_progress_artifact(0.0, key=_key(f"{run_id}-progress"),
                                           description=f"prunecomp run {run_id}: starting")

    def advance(self, what: str) -> None:
        """One more stage done; ``what`` says which (shown as the artifact's description)."""
        from prefect.artifacts import update_progress_artifact

        self.done = min(self.done + 1, self.total)
        update_progress_artifact(self.id, 100.0 * self.done / self.total,
                                 description=f"{self.done}/{self.total}: {what}")


def publish_summary(run_id: str, markdown: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown, key=_key(f"{run_id}-summary"), description=f"prunecomp run {run_id}")


def _key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    out = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in text.lower())
    return out.strip("-")[:100]
