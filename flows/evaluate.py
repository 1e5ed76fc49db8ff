"""The ``evaluate`` flow: re-evaluate any checkpoint (a path/URL or a registered model version) with any
evaluation config; cached like every other evaluation, and recorded on the model version when it is one."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.params import EvaluateConfig
from prunecomp.corpora.data import resolve_data_dir
from prunecomp.errors import PrunecompError
from prunecomp.models.redact import redact
from prunecomp.models.storage import is_complete
from tasks.caching import run_cached
from tasks.evaluate import evaluate_checkpoint
from tasks.jobs import EvalJob
from tasks.keys import model_state_hash
from tasks.model_io import load_checkpoint, read_meta
from tasks.settings import configure_s3, locations
from tasks.tracking import client

__all__ = ["evaluate", "resolve_checkpoint"]


def resolve_checkpoint(ref: str, tracking_uri: str) -> tuple[str, tuple[str, str] | None]:
    """``models:/name/3`` or ``models:/name@champion`` -> (checkpoint URI, (name, version)); paths pass through."""
    if not ref.startswith("models:/"):
        return ref, None
    from mlflow.exceptions import MlflowException

    spec = ref.removeprefix("models:/")
    c = client(tracking_uri)
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            mv = c.get_model_version_by_alias(name, alias)
        else:
            name, version = spec.rsplit("/", 1)
            mv = c.get_model_version(name, version)
    except (MlflowException, ValueError) as exc:
        raise PrunecompError(redact(f"cannot resolve {ref!r} in the MLflow registry at {tracking_uri}: {exc}")) from exc
    uri = mv.tags.get("checkpoint_uri")
    if not uri:
        raise PrunecompError(f"{ref!r} has no checkpoint_uri tag: it was not registered by the compress flow")
    return uri, (mv.name, str(mv.version))


@task(name="checkpoint-hash", cache_policy=NO_CACHE)
def checkpoint_hash(uri: str) -> str:
    """The tensor hash of a checkpoint: read from pipeline metadata when present, computed otherwise."""
    if is_complete(uri):
        try:
            return str(read_meta(uri)["hash"])
        except (FileNotFoundError, KeyError):
            pass
    return model_state_hash(load_checkpoint(uri).model)


@flow(name="evaluate", validate_parameters=True)
def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Perplexity (and optional QA) of ``config.checkpoint``; tags the model version with the results."""
    from prunecomp.quiet import quiet_libraries

    quiet_libraries()
    loc = locations(config.tracking.store, config.tracking.tracking_uri)
    configure_s3()
    data_dir = resolve_data_dir(config.data_dir)
    uri, version = resolve_checkpoint(config.checkpoint, loc.tracking_uri)
    digest = checkpoint_hash(uri)
    job = EvalJob(store=loc.store, checkpoint_uri=uri, checkpoint_hash=digest, evaluation=config.evaluation,
                  data_dir=str(data_dir) if data_dir else None, qa_tasks=config.qa_tasks, qa_limit=config.qa_limit)
    result, cached = run_cached(evaluate_checkpoint, job)
    if version is not None:
        c = client(loc.tracking_uri)
        suffix = f"seq{config.evaluation.seq_len}-w{config.evaluation.max_windows or 'all'}"
        for name, value in result["perplexity"].items():
            c.set_model_version_tag(version[0], version[1], f"eval.ppl.{name}.{suffix}", f"{value:.6g}")
        if result.get("qa"):
            c.set_model_version_tag(version[0], version[1], "eval.qa.average", f"{result['qa'].get('average')}")
    return {"checkpoint": uri, "checkpoint_hash": digest, "model_version": version, "cached": cached, **result}
