"""The end of a compression run on the registry's side: the final metrics promotion gates read
(:func:`run_metrics`), and the MLflow run plus the registered model version (:func:`track_run`)."""

from __future__ import annotations

from typing import Any

from flows.params import CompressConfig
from tasks.artifacts import summary_markdown
from tasks.settings import Locations
from tasks.tracking import log_run_task, register_task

__all__ = ["run_metrics", "track_run"]


def run_metrics(ppl: dict[str, dict[str, float]], qa: dict[str, Any] | None, n_removed: int,
                check: dict[str, Any] | None = None) -> dict[str, float]:
    """The final metrics promotion gates read: per-corpus and mean perplexity, ratios, QA retention, and the final
    check's ``fold_loss_ratio`` (held-out NLL with what was folded / without it: above 1, the folds hurt)."""
    out: dict[str, float] = {"layers_removed": float(n_removed)}
    if check is not None:
        out["fold_loss_ratio"] = check["loss"] / check["uncompensated_loss"]
    for name, v in ppl.items():
        out[f"ppl_{name}_dense"], out[f"ppl_{name}_pruned"] = v["dense"], v["pruned"]
        out[f"ppl_{name}_ratio"] = v["pruned"] / v["dense"]
    if ppl:
        out["ppl_mean_dense"] = sum(v["dense"] for v in ppl.values()) / len(ppl)
        out["ppl_mean_pruned"] = sum(v["pruned"] for v in ppl.values()) / len(ppl)
        out["ppl_ratio_mean"] = out["ppl_mean_pruned"] / out["ppl_mean_dense"]
    if qa and qa.get("dense") is not None and qa.get("pruned") is not None:
        out["qa_average_dense"], out["qa_average_pruned"] = qa["dense"], qa["pruned"]
        out["qa_retained"] = qa["pruned"] / qa["dense"] if qa["dense"] else 0.0
    return out


def _gains_decisions(summary: dict[str, Any]) -> str:
    """Each gains fit's held-out decision, in order ("kept", "declined"; "-" where a fit was not checked), or
    "none" when the run fitted no gains: the registry says whether what a level promised was folded."""
    fits = [s["refine"] for s in summary["steps"] if s.get("kept") and s.get("refine")]
    if summary.get("refine"):
        fits.append(summary["refine"])
    if not fits:
        return "none"
    return ",".join("-" if not f["report"].get("check_windows") else "kept" if f["report"].get("kept", True)
                    else "declined" for f in fits)


def _reconstruct_decisions(summary: dict[str, Any]) -> str:
    """Each kept step's block reconstruction, in order: "kept", "declined" (on held-out windows or its own), "-"
    where the step fitted nothing; "none" when the run reconstructed nothing."""
    fits = [s["record"].get("reconstruct") for s in summary["steps"] if s.get("kept")]
    if not any(fits):
        return "none"
    return ",".join("-" if not f else "kept" if f.get("kept", True) else "declined" for f in fits)


def _method(config: CompressConfig) -> str:
    prune = config.prune
    return ({"magnitude": "prune&comp", "guarded": "prune&comp-guarded", "lsq": "prune&comp+lsq"}.get(
        prune.compensation, "naive-depth-pruning")
        + ("" if prune.reconstruct == "none" else f"+reconstruct-{prune.reconstruct}")
        + ("" if prune.refit == "none" else f"+refit-{prune.refit}")
        + ("" if prune.refine == "none" else f"+refine-{prune.refine}{'-each' if prune.refine_at == 'each' else ''}"))


def track_run(config: CompressConfig, loc: Locations, summary: dict[str, Any], metrics: dict[str, float], *,
              final_uri: str) -> dict:
    """Log the run to MLflow (params, metrics, report, plots, the recipe) and register the final model as a new
    model version with lineage tags. The weights are not copied: the version's source is the final model in the
    store, so a run leaves one copy of them. The tags include the digest of the evaluation settings (corpora,
    windows, sequence length, QA tasks, dtype, device type): promotion compares a version's metrics with the
    champion's only when these are equal."""
    from tasks.tracking import eval_settings_tags

    tags = {
        "method": _method(config), "metric": config.prune.metric, "compensation": config.prune.compensation,
        "quality": config.quality,
        "final_check": (summary.get("final_check") or {}).get("verdict", "not run"),
        "guard_decisions": ",".join((s["record"].get("guard") or {}).get("decision", "-")
                                    for s in summary["steps"] if s["kept"]),
        "gains": _gains_decisions(summary), "reconstruct": _reconstruct_decisions(summary),
        "layers_removed": str(summary["removed"]), "n_layers_removed": str(len(summary["removed"])),
        "source_model": summary["source"]["uri"], "source_hash": summary["source"]["content_hash"],
        "calibration_digest": summary["calibration"]["digest"],
        "calibration_origin": summary["calibration"]["origin"], "code_version": summary["code_version"],
        "checkpoint_uri": summary["final"]["uri"], "checkpoint_hash": summary["final"]["hash"],
        "prunecomp_run": summary["run_id"],
    } | eval_settings_tags(config.evaluation, config.qa_tasks, config.qa_limit)
    report = {k: v for k, v in summary.items() if k != "mlflow"}
    run_key = f"{summary['run_id']}-{summary['final']['hash'][:12]}"
    run = log_run_task(tracking_uri=loc.tracking_uri, artifact_root=loc.mlflow_artifacts,
                       experiment=config.tracking.experiment, run_key=run_key, run_name=summary["run_id"],
                       params=summary["config"] | {"code_version": summary["code_version"]},
                       steps=[s for s in summary["steps"] if s["kept"]], metrics=metrics, tags=tags, report=report,
                       summary_md=summary_markdown(summary), model_uri=summary["final"]["uri"],
                       recipe_uri=final_uri)  # read with the real URI; everything sent is redacted
    version = register_task(tracking_uri=loc.tracking_uri, name=config.model_name(), run_id=run["run_id"],
                            source=summary["final"]["uri"], tags=tags, model_id=run["model_id"] or None,
                            description=f"{summary['source']['uri']} minus layers {summary['removed']} "
                                        f"({tags['method']}, {config.prune.metric})")
    return {"run_id": run["run_id"], "model_id": run["model_id"], "model_uri": run["model_uri"], **version}
