"""MLflow: log a compression run (params, per-step metrics, report, summary, plot, the pruned model), register it
as a new model version with lineage tags, and move the ``champion`` alias under gates.

Everything goes through an explicit :class:`~mlflow.tracking.MlflowClient` (no fluent global run state, which
would leak between tasks of one process). Experiments are created with an explicit ``artifact_location`` so
nothing lands in ``./mlruns`` by accident. Every call is idempotent: a resumed run finds the MLflow run and model
version an interrupted one already wrote instead of duplicating them.

Promotion under gates is :mod:`tasks.promotion`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prunecomp.models.storage import is_remote

__all__ = ["EVAL_DIGEST_TAG", "EVAL_SETTINGS_TAG", "client", "ensure_experiment", "eval_settings_tags",
           "find_version", "log_compress_run", "register_version"]

MODEL_ID_TAG = "prunecomp.logged_model_id"
EVAL_DIGEST_TAG = "eval_settings_digest"
EVAL_SETTINGS_TAG = "eval_settings"
_MODEL_TAGS = ("method", "metric", "compensation", "final_check", "guard_decisions", "layers_removed",
               "source_hash", "checkpoint_hash", "prunecomp_run", EVAL_DIGEST_TAG, EVAL_SETTINGS_TAG)

RUN_KEY_TAG = "prunecomp.run_key"


def client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(c: Any, name: str, artifact_location: str) -> str:
    """The experiment's id, creating it with ``artifact_location`` (a path or URL) when it does not exist."""
    found = c.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = artifact_location if is_remote(artifact_location) else f"file://{artifact_location}"
    return str(c.create_experiment(name, artifact_location=f"{location.rstrip('/')}/{name}"))


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, list | tuple) else str(value)


def log_compress_run(*, tracking_uri: str, artifact_root: str, experiment: str, run_key: str, run_name: str,
                     params: Mapping[str, Any], steps: list[dict[str, Any]], metrics: Mapping[str, float],
                     tags: Mapping[str, str], report: Mapping[str, Any], summary_md: str,
                     model_uri: str, recipe_uri: str | None = None) -> dict[str, str]:
    """Log one finished compression run; returns ``run_id``, the ``model_id`` of its logged model and
    ``model_uri`` (where the model's files are: the final folder in the store).

    Per-step metrics use MLflow's ``step`` (= layers removed so far; step 0 is the dense model). The final model is
    an MLflow 3 LoggedModel of the run (model-centric API: it carries the run's final metrics and key params, and
    the registered version names it); its files are not copied: they already are an MLflow Model in the store
    (:mod:`tasks.mlflow_model`).
    """
    from mlflow.entities import Metric, Param, RunTag

    c = client(tracking_uri)
    exp_id = ensure_experiment(c, experiment, artifact_root)
    query = f"tags.`{RUN_KEY_TAG}` = '{run_key}' and attributes.status = 'FINISHED'"
    done = c.search_runs([exp_id], filter_string=query, max_results=1)
    if done:
        run = done[0]
        return {"run_id": run.info.run_id, "model_id": run.data.tags.get(MODEL_ID_TAG, ""), "model_uri": model_uri,
                "reused": "true"}
    run = c.create_run(exp_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **tags})
    run_id = run.info.run_id
    flat: dict[str, str] = {}
    _flatten("", params, flat)
    ts = int(run.info.start_time)
    batch = [Metric(k, float(v), ts, 0) for k, v in metrics.items()]
    for s in steps:
        n = s["step"] + 1
        rec = s["record"]
        batch += [Metric("step_removed_layer", float(rec["chosen"]), ts, n),
                  Metric("step_scale", float(rec["applied_scale"]), ts, n),
                  Metric("step_seconds", float(rec["seconds"]), ts, n)]
        score = rec["scores"].get(str(rec["chosen"]))
        if score is not None:
            batch.append(Metric("step_score", float(score), ts, n))
        for name, value in (s.get("ppl_after") or {}).items():
            batch.append(Metric(f"quick_ppl_{name}", float(value), ts, n))
        local = rec.get("reconstruct")
        if local:  # block reconstruction beside this gap
            batch += [Metric("step_reconstruct_error_before", float(local["loss_before"]), ts, n),
                      Metric("step_reconstruct_error_after", float(local["loss_after"]), ts, n),
                      Metric("step_reconstruct_seconds", float(local["seconds"]), ts, n),
                      Metric("step_reconstruct_kept", float(bool(local.get("kept", True))), ts, n)]
            if local.get("check_loss_after") is not None:  # measured on held-out windows
                batch += [Metric("step_reconstruct_check_error_before", float(local["check_loss_before"]), ts, n),
                          Metric("step_reconstruct_check_error_after", float(local["check_loss_after"]), ts, n)]
        fit = (s.get("refine") or {}).get("report")
        if fit:  # progressive refinement: the fit after this removal
            batch += [Metric("step_refine_kl_before", float(fit["loss_before"]), ts, n),
                      Metric("step_refine_kl_after", float(fit["loss_after"]), ts, n),
                      Metric("step_refine_seconds", float(fit["seconds"]), ts, n)]
        if n == 1:
            batch += [Metric(f"quick_ppl_{name}", float(v), ts, 0) for name, v in (s.get("ppl_before") or {}).items()]
    logged = c.create_logged_model(exp_id, name="model", source_run_id=run_id, model_type="transformers",
                                   tags={"model_uri": model_uri, **{k: v for k, v in tags.items()
                                                                    if k in _MODEL_TAGS}},
                                   params={k: flat[k][:6000] for k in _model_params(flat)})
    batch += [Metric(k, float(v), ts, 0, model_id=logged.model_id) for k, v in metrics.items()]
    for i in range(0, len(batch), 900):
        c.log_batch(run_id, metrics=batch[i : i + 900])
    items = [Param(k[:250], v[:6000]) for k, v in flat.items()]
    for i in range(0, len(items), 90):
        c.log_batch(run_id, params=items[i : i + 90], tags=[RunTag("mlflow.note.content", summary_md)] if i == 0
                    else [])
    c.log_dict(run_id, dict(report), "report.json")
    c.log_text(run_id, summary_md, "summary.md")
    if steps:  # the library's plots: score heatmap, gap scale per step, quick perplexity per step
        from prunecomp.evaluation.plots import save_report_plots

        with tempfile.TemporaryDirectory(prefix="prunecomp-plots-") as tmp:
            save_report_plots(report, tmp)
            c.log_artifacts(run_id, tmp, "plots")
    if recipe_uri is not None:  # the recipe of the registered model, not its weights
        from prunecomp.recipes.recipe import RECIPE_FILE, TENSORS_FILE
        from tasks.files import exists, read_bytes, size

        with tempfile.TemporaryDirectory(prefix="prunecomp-recipe-") as tmp:
            for name in (RECIPE_FILE, TENSORS_FILE):
                uri = f"{recipe_uri.rstrip('/')}/{name}"
                if not exists(uri):
                    continue
                if name == TENSORS_FILE and size(uri) > RECIPE_TENSORS_LIMIT:
                    # whole layers (block reconstruction, the refit): a copy would be a second model's worth
                    (Path(tmp) / f"{name}.uri").write_text(uri + "\n")
                    continue
                (Path(tmp) / name).write_bytes(read_bytes(uri))
            c.log_artifacts(run_id, tmp, "recipe")
    c.finalize_logged_model(logged.model_id, "READY")
    c.set_tag(run_id, MODEL_ID_TAG, logged.model_id)
    c.set_terminated(run_id)
    return {"run_id": run_id, "model_id": logged.model_id, "model_uri": model_uri, "reused": "false"}


RECIPE_TENSORS_LIMIT = 64 * 2**20
"""Largest recipe sidecar copied into the MLflow run (gains and lsq maps are kilobytes to a few MB; a recipe with
refitted or reconstructed layers holds their weights, which stay beside the final model, named by a ``.uri``
file)."""


def _model_params(flat: Mapping[str, str]) -> list[str]:
    """The params a logged model carries: what was removed and how (the run has them all)."""
    return [k for k in flat if k.split(".")[0] in ("prune", "model", "revision") or k == "code_version"][:90]


def find_version(c: Any, name: str, tag: str, value: str) -> Any | None:
    """The model version of ``name`` whose ``tag`` equals ``value`` (newest first), if any."""
    try:
        versions = c.search_model_versions(f"name = '{name}'")
    except Exception:
        return None
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        if v.tags.get(tag) == value:
            return v
    return None


def register_version(*, tracking_uri: str, name: str, run_id: str, source: str, tags: Mapping[str, str],
                     description: str, candidate_alias: str | None = "candidate",
                     model_id: str | None = None) -> dict[str, str]:
    """Register ``source`` as a new version of ``name`` (created when missing); reuse the version already
    registered for the same checkpoint hash. Tags carry the lineage (source model hash, calibration digest, metric,
    layers removed, code version)."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description="Depth-pruned models (prunecomp, Prune&Comp)")
    existing = find_version(c, name, "checkpoint_hash", tags["checkpoint_hash"])
    if existing is not None:
        version = str(existing.version)
    else:
        extra = {MODEL_ID_TAG: model_id} if model_id else {}
        mv = c.create_model_version(name, source=source, run_id=run_id, tags=dict(tags) | extra,
                                    description=description, model_id=model_id or None)
        version = str(mv.version)
        if model_id:  # the logged model names the versions made from it
            c.set_logged_model_tags(model_id, {f"registered.{name}": version})
    if candidate_alias:
        c.set_registered_model_alias(name, candidate_alias, version)
    return {"name": name, "version": version, "reused": str(existing is not None).lower()}


def eval_settings_tags(evaluation: Any, qa_tasks: Sequence[str] = (), qa_limit: int | None = None, *,
                       device: str | None = None, dtype: str | None = None) -> dict[str, str]:
    """The tags that say how a version's final metrics were measured: ``eval_settings_digest`` (what
    ``vs_champion`` gates compare) and ``eval_settings`` (the same, readable).

    Why: a perplexity depends on the corpora, the window length and count and the precision as much as on the
    model, so two versions' metrics are comparable only when all of these are equal. ``evaluation`` is an
    :class:`~prunecomp.config.EvalConfig` (``datasets``, ``seq_len``, ``max_windows``; ``batch_size`` does not
    change the result and is left out); QA tasks and their limit count when QA ran. ``device`` and ``dtype``
    default to what this process evaluates in (the defaults of :func:`prunecomp.models.sources.load_model`: bf16 on
    CUDA, fp32 on CPU)."""
    if device is None or dtype is None:
        import torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    datasets = sorted(evaluation.datasets)
    qa = sorted(qa_tasks)
    settings = {"datasets": datasets, "seq_len": int(evaluation.seq_len), "max_windows": evaluation.max_windows,
                "qa_tasks": qa, "qa_limit": qa_limit if qa else None, "device": device.split(":")[0],
                "dtype": dtype.removeprefix("torch.")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    readable = (f"ppl {','.join(datasets) or '-'} seq_len {settings['seq_len']} windows "
                f"{settings['max_windows'] or 'all'}; qa {','.join(qa) or '-'}"
                + (f" limit {qa_limit}" if qa and qa_limit else "") + f"; {settings['dtype']} on {settings['device']}")
    return {EVAL_DIGEST_TAG: digest, EVAL_SETTINGS_TAG: readable}


def _tasks() -> tuple[Any, Any]:
    """Prefect task wrappers (never cached: MLflow writes are idempotent by themselves, see above)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return (task(name="mlflow-log-run", cache_policy=NO_CACHE)(log_compress_run),
            task(name="mlflow-register", cache_policy=NO_CACHE)(register_version))


log_run_task, register_task = _tasks()
