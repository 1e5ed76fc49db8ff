"""MLflow: log a compression run (params, per-step metrics, report, summary, plot, the pruned model), register it
as a new model version with lineage tags, and move the ``champion`` alias under gates.

Everything goes through an explicit :class:`~mlflow.tracking.MlflowClient` (no fluent global run state, which
would leak between tasks of one process). Experiments are created with an explicit ``artifact_location`` so
nothing lands in ``./mlruns`` by accident. Every call is idempotent: a resumed run finds the MLflow run and model
version an interrupted one already wrote instead of duplicating them.

Promotion (:func:`promote_version`) refuses, with one message that says what to do instead, whatever would let
the alias move quietly to the wrong version:

* files that are not a finished, whole checkpoint matching the version
  (:func:`tasks.mlflow_model.check_version_files`);
* gates that check nothing: none at all, unknown metric names, NaN metrics (:mod:`tasks.gates`);
* a comparison with a champion evaluated differently: every version carries the digest of its evaluation
  settings (:func:`eval_settings_tags`), and ``vs_champion`` gates compare only equal digests;
* two promotions racing. Promotions of one registered model are serialized by a lock kept in the registry itself
  (:func:`promotion_lock`: a registered model ``<name>.promotion-lock``, created atomically because the registry
  refuses a second model of one name), so it holds for every promoter of that registry whatever store each one
  uses. Under it the champion is read, the gates decided, and the alias read again just before it moves
  (compare-and-set: an alias that moved is decided against again), so of two concurrent promotions the better
  version ends champion.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from prunecomp.errors import PrunecompError
from prunecomp.redact import redact
from prunecomp.storage import is_remote
from tasks.gates import Decision, GateFailed, MetricGate, decide

__all__ = ["EVAL_DIGEST_TAG", "EVAL_SETTINGS_TAG", "client", "ensure_experiment", "eval_settings_tags",
           "find_version", "log_compress_run", "promote_version", "promotion_lock", "register_version",
           "version_metrics"]

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
                      Metric("step_reconstruct_seconds", float(local["seconds"]), ts, n)]
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
        from prunecomp.plots import save_report_plots

        with tempfile.TemporaryDirectory(prefix="prunecomp-plots-") as tmp:
            save_report_plots(report, tmp)
            c.log_artifacts(run_id, tmp, "plots")
    if recipe_uri is not None:  # the recipe of the registered model, not its weights
        from prunecomp.recipe import RECIPE_FILE, TENSORS_FILE
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
    default to what this process evaluates in (the defaults of :func:`prunecomp.sources.load_model`: bf16 on
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


def version_metrics(c: Any, name: str, version: str) -> dict[str, float]:
    """The final metrics of the run that produced a model version."""
    mv = c.get_model_version(name, version)
    if not mv.run_id:
        return {}
    return {k: float(v) for k, v in c.get_run(mv.run_id).data.metrics.items()}


def _alias_version(c: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


_DELIBERATE = ("or, to replace the champion deliberately, promote with gates that do not compare with it (a "
               "gates file without vs_champion gates)")


def _incomparable(candidate: Mapping[str, str], champion: Mapping[str, str], champion_version: str) -> str | None:
    """Why the candidate's metrics (its tags: ``candidate``) cannot be compared with the champion's, or ``None``."""
    mine, theirs = candidate.get(EVAL_DIGEST_TAG), champion.get(EVAL_DIGEST_TAG)
    if theirs is None:
        return (f"champion version {champion_version} has unknown evaluation settings (no {EVAL_DIGEST_TAG} tag: "
                "registered by an older prunecomp or by hand), so its metrics cannot be compared; register the "
                f"champion's model again from a run of this prunecomp, {_DELIBERATE}")
    if mine is None:
        return (f"this version has unknown evaluation settings (no {EVAL_DIGEST_TAG} tag: registered by an older "
                "prunecomp or by hand), so its metrics cannot be compared with the champion's; register it from a "
                f"run of this prunecomp, {_DELIBERATE}")
    if mine != theirs:
        return (f"evaluated differently from champion version {champion_version} "
                f"({candidate.get(EVAL_SETTINGS_TAG, mine)} vs {champion.get(EVAL_SETTINGS_TAG, theirs)}), so "
                "their metrics are not comparable; evaluate the candidate with the champion's settings (the compress "
                f"flow with the same evaluation section), {_DELIBERATE}")
    return None


LOCK_SUFFIX = ".promotion-lock"
LOCK_WAIT_S = 300.0
"""How long a promotion waits for another promotion of the same registered model (one takes seconds; a 70B
version's file check on S3 some more)."""
LOCK_STALE_S = 1800.0
"""A promotion lock held longer than this is a dead promoter's leftover (on another host, where its pid cannot
be probed) and is taken over."""
_LOCK_TAG = "prunecomp.promotion_lock"


def _lock_owner(c: Any, lock: str) -> dict[str, Any] | None:
    """Who holds the lock (host, pid, since, token), ``{}`` when unreadable, ``None`` when nobody holds it."""
    from mlflow.exceptions import MlflowException

    try:
        raw = c.get_registered_model(lock).tags.get(_LOCK_TAG)
    except MlflowException:
        return None
    try:
        return dict(json.loads(raw)) if raw else {}
    except ValueError:
        return {}


def _lock_stale(owner: Mapping[str, Any], stale_s: float) -> str | None:
    """Why the promotion that holds the lock is gone, or ``None`` while it may still be running."""
    from prunecomp.storage import pid_alive

    if owner.get("host") == socket.gethostname() and not pid_alive(int(owner.get("pid") or 0)):
        return f"process {owner.get('pid')} on this host is gone"
    age = time.time() - float(owner.get("since") or 0)
    return f"held for {age:.0f} s (over {stale_s:.0f} s)" if age > stale_s else None


def _drop_lock(c: Any, lock: str, token: str | None) -> None:
    """Remove the lock if ``token`` still holds it (a lock taken over meanwhile is not ours to remove)."""
    owner = _lock_owner(c, lock)
    if owner is not None and owner.get("token") == token:
        with contextlib.suppress(Exception):
            c.delete_registered_model(lock)


@contextlib.contextmanager
def promotion_lock(c: Any, name: str, *, wait_s: float = LOCK_WAIT_S,
                   stale_s: float = LOCK_STALE_S) -> Iterator[None]:
    """Hold the promotion lock of registered model ``name`` (see the module docstring), waiting up to ``wait_s``
    for another promotion to finish; a holder whose process is gone is taken over."""
    from mlflow.exceptions import MlflowException

    lock = f"{name}{LOCK_SUFFIX}"
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        owner = {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        try:
            c.create_registered_model(lock, tags={_LOCK_TAG: json.dumps(owner)},
                                      description=f"held while a promotion of {name} decides and moves an alias; "
                                                  "removed when it ends")
            break
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise PrunecompError(redact(f"cannot take the promotion lock of {name!r} ({exc.error_code}: "
                                            f"{str(exc)[:200]}); check the tracking server and run again")) from exc
        held = _lock_owner(c, lock)
        stale = held is not None and _lock_stale(held, stale_s) is not None
        if stale:
            _drop_lock(c, lock, held.get("token") if held else None)  # then race the others for the create
        if time.monotonic() > deadline:
            who = f"host {held.get('host')}, pid {held.get('pid')}" if held else "another process"
            raise PrunecompError(
                f"another promotion of {name!r} is in progress ({who}); waited {wait_s:.0f} s. Run this one again "
                f"when it has finished; if that process is gone, delete the registered model {lock!r}")
        if not stale:
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
    try:
        yield
    finally:
        _drop_lock(c, lock, token)


def _gates(gates: Iterable[MetricGate | Mapping[str, Any]]) -> list[MetricGate]:
    """The gates, validated; at least one (a promotion that checks nothing would move the alias to anything)."""
    try:
        checked = [MetricGate.model_validate(g) for g in gates]
    except ValidationError as exc:
        raise PrunecompError("invalid promotion gate: " + "; ".join(str(e["msg"]) for e in exc.errors())) from exc
    if not checked:
        raise PrunecompError("no promotion gates given; pass at least one (the default gates, or a gates file "
                             "with a non-empty `gates:` list)")
    return checked


def promote_version(*, tracking_uri: str, name: str, version: str | None,
                    gates: Iterable[MetricGate | Mapping[str, Any]], alias: str = "champion",
                    lock_wait_s: float = LOCK_WAIT_S) -> dict[str, Any]:
    """Move ``alias`` to ``version`` (default: the newest) when every gate passes; raise :class:`GateFailed`
    naming the failing gates, or a :class:`PrunecompError` for a version that must not be promoted, leaving the
    registry untouched. Promoting the current champion again is a no-op. See the module docstring for what is
    refused and how concurrent promotions are serialized."""
    from mlflow.exceptions import MlflowException

    from tasks.mlflow_model import check_version_files

    checked = _gates(gates)
    c = client(tracking_uri)
    try:
        versions = c.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        raise PrunecompError(redact(f"cannot read registered model {name!r}: {exc}")) from exc
    if not versions:
        raise PrunecompError(f"registered model {name!r} has no versions (run the compress flow first)")
    if version is None:
        version = str(max(int(v.version) for v in versions))
    elif version not in {str(v.version) for v in versions}:
        raise PrunecompError(f"registered model {name!r} has no version {version}")

    def unchanged() -> dict[str, Any]:
        return {"name": name, "version": version, "alias": alias, "changed": False, "previous": version,
                "decision": Decision(passed=True, results=[]).model_dump()}

    if _alias_version(c, name, alias) == version:
        return unchanged()
    mv = c.get_model_version(name, version)
    problem = check_version_files(str(mv.source), mv.tags.get("checkpoint_hash"))
    if problem is not None:  # the alias only ever points at a finished, whole checkpoint matching the version
        raise PrunecompError(redact(
            f"version {version} of {name!r} is not a loadable MLflow Model ({problem}); not promoted to {alias!r} "
            "and the registry is unchanged: run the compress run that registered it again (its final model is "
            "written again), or promote another version"))
    candidate = version_metrics(c, name, version)
    with promotion_lock(c, name, wait_s=lock_wait_s):
        for _ in range(5):
            current = _alias_version(c, name, alias)
            if current == version:
                return unchanged()
            champion, incomparable = None, None
            if current is not None:
                champion = version_metrics(c, name, current)
                incomparable = _incomparable(mv.tags, c.get_model_version(name, current).tags, current)
            decision = decide(checked, candidate, champion, incomparable=incomparable)
            if not decision.passed:
                raise GateFailed(decision, f"{name}/{version}")
            if _alias_version(c, name, alias) != current:  # moved since it was read: decide again against it
                continue
            c.set_registered_model_alias(name, alias, version)
            c.set_model_version_tag(name, version, f"gates.{alias}",
                                    json.dumps([r.model_dump() for r in decision.results]))
            return {"name": name, "version": version, "alias": alias, "changed": True, "previous": current,
                    "decision": decision.model_dump()}
    raise PrunecompError(f"the {alias!r} alias of {name!r} kept moving while this promotion decided (a promoter "
                         "that does not take the lock?); this one changed nothing, run it again")


def _tasks() -> tuple[Any, Any, Any]:
    """Prefect task wrappers (never cached: MLflow writes are idempotent by themselves, see above)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return (task(name="mlflow-log-run", cache_policy=NO_CACHE)(log_compress_run),
            task(name="mlflow-register", cache_policy=NO_CACHE)(register_version),
            task(name="mlflow-promote", cache_policy=NO_CACHE)(promote_version))


log_run_task, register_task, promote_task = _tasks()
