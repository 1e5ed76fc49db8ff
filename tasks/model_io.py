"""The two ends of a run's chain of model states: the base (the source model, as a folder of safetensors) and
the final model, written once (a plain HF checkpoint that is also an MLflow Model: :mod:`tasks.mlflow_model`).

A source that already is safetensors (a local folder, a hub snapshot, an s3:// folder) is the base as it is:
its identity is the sha256 of its files, and nothing is copied. A GGUF or pickle source is materialised once as
a safetensors checkpoint in the store (dequantising SmolLM2's GGUF takes ~25 s; a resumed run or a fanned-out
worker then loads plain safetensors in about a second, and layer streaming needs safetensors anyway).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from prunecomp.errors import PrunecompError
from prunecomp.models.adapters import decoder_layers
from prunecomp.models.sources import content_hash, load_model, resolve_source
from prunecomp.models.storage import is_complete, is_remote
from prunecomp.recipes.checkpoint import REPORT_FILE, save_pruned
from tasks.caching import JOB_KEY, RESULT_SERIALIZER, json_result
from tasks.files import read_json
from tasks.jobs import FinalJob, ModelJob
from tasks.keys import model_state_hash, record_source, recorded_source, source_stamps
from tasks.mlflow_model import write_mlflow_model
from tasks.settings import redact

__all__ = ["load_checkpoint", "load_verified", "materialize_model", "read_meta", "resolve_model", "write_final"]


def read_meta(uri: str) -> dict[str, Any]:
    """The pipeline metadata a checkpoint was saved with (its ``prunecomp_report.json``)."""
    return dict(read_json(f"{uri.rstrip('/')}/{REPORT_FILE}")["pipeline"])


def _torch_dtype(dtype: str | None) -> Any:
    import torch

    return None if dtype is None else getattr(torch, dtype)


def load_checkpoint(uri: str, expected_hash: str | None = None, *, device: str | None = None,
                    dtype: str | None = None) -> Any:
    """Load a pipeline checkpoint, refusing one whose tensors are not the ones the cache key was built from
    (``device``, ``dtype``: what the job computes with; default: this machine's)."""
    lm = load_model(uri, device=device, dtype=_torch_dtype(dtype))
    if expected_hash is not None:
        actual = model_state_hash(lm.model)
        if actual != expected_hash:
            raise PrunecompError(
                f"checkpoint {redact(uri)!r} changed since it was recorded (tensor hash {actual[:12]}, expected "
                f"{expected_hash[:12]}); delete it to have it recomputed"
            )
    return lm


def load_verified(uri: str, expected_hash: str, *, device: str | None = None, dtype: str | None = None) -> Any:
    """Load a checkpoint for a job keyed by ``expected_hash``: a pipeline output's recorded identity (its recipe
    digest, from ``prunecomp_report.json``) or, for any other checkpoint, its tensor hash must match."""
    try:
        recorded = str(read_meta(uri)["hash"])
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        recorded = None
    if recorded is not None:
        if recorded != expected_hash:
            raise PrunecompError(f"checkpoint {redact(uri)!r} is model {recorded[:12]}, not the {expected_hash[:12]} "
                                 "this evaluation was keyed by; evaluate it again to key it correctly")
        return load_model(uri, device=device, dtype=_torch_dtype(dtype))
    return load_checkpoint(uri, expected_hash, device=device, dtype=dtype)


@task(name="resolve-model", cache_policy=NO_CACHE)
def resolve_model(model: str | None, revision: str | None = None, allow_pickle: bool = False) -> dict[str, Any]:
    """Where the model comes from and the sha256 of its files (never cached: the bytes behind a name can move).

    The files' stamps (:func:`tasks.keys.source_stamps`) are taken before hashing and compared after it, and the
    pair is recorded for this process (:func:`tasks.keys.record_source`): the jobs built from it carry the record,
    so whoever loads the source later can tell whether it is still what was hashed."""
    remote = model is not None and is_remote(model)
    before = source_stamps(model) if remote and model is not None else None  # before this process downloads it
    source = resolve_source(model, revision, allow_pickle=allow_pickle)
    safetensors = source.gguf_file is None and bool(source.weight_files) and all(
        f.endswith(".safetensors") for f in source.weight_files)
    local = source.kind in ("local", "hub", "default")
    load_uri = str(source.local_dir) if local else source.uri
    if before is None:
        before = source_stamps(load_uri)
    earlier = recorded_source(load_uri)
    if remote and earlier is not None and earlier.stamps != before:
        raise PrunecompError(redact(f"model {source.uri!r} changed on its store since this process downloaded it; "
                                    "run again in a new process (its copy here is the old one)"))
    digest = content_hash(source)
    if source_stamps(load_uri) != before:
        raise PrunecompError(redact(f"model {source.uri!r} changed while it was being hashed; run again"))
    record_source(load_uri, digest, before)
    return {"uri": redact(source.uri), "kind": source.kind, "revision": source.revision,
            "gguf_file": source.gguf_file, "content_hash": digest, "safetensors": safetensors,
            # where tasks load it from: the local folder, or the remote URL (each process downloads it once)
            "load_uri": load_uri,
            "weight_bytes": sum((source.local_dir / f).stat().st_size for f in source.weight_files),
            **_config_facts(source)}


def _config_facts(source: Any) -> dict[str, Any]:
    """Depth, architecture and context length from config.json, without loading weights (``None`` for GGUF:
    known after loading)."""
    import json

    path = source.local_dir / "config.json"
    if source.gguf_file is not None or not path.is_file():
        return {"num_layers": None, "architecture": None, "max_positions": None}
    cfg = json.loads(path.read_text())
    text = cfg.get("text_config", cfg)
    positions = text.get("max_position_embeddings")
    return {"num_layers": int(text["num_hidden_layers"]) if "num_hidden_layers" in text else None,
            "architecture": (cfg.get("architectures") or [None])[0],
            "max_positions": int(positions) if isinstance(positions, int) else None}


@task(name="write-final", cache_policy=JOB_KEY, persist_result=True, result_serializer=RESULT_SERIALIZER)
def write_final(job: FinalJob) -> dict[str, Any]:
    """Write the model of the final state (the working copy) with its full recipe to ``job.uri``, atomically, with
    the MLflow Model files beside the weights (one copy serves ``from_pretrained`` and the MLflow flavors)."""
    if is_complete(job.uri):
        return dict(json_result(read_meta(job.uri)))
    from tasks.working import checkout, recipe_of

    recipe = recipe_of(job.base_hash, job.parts, job.state_digest)
    config = dict(job.report.get("config") or {})  # the run's quality level and what was overridden, recorded
    full = replace(recipe, source={**job.source, "content_hash": job.base_hash},
                   config={**recipe.config, "quality": {"level": config.get("quality"),
                                                        "overridden": config.get("quality_overridden") or {}}})
    meta = {"uri": job.uri, "hash": job.state_digest, "digest": job.state_digest, "key": job.key, "code": job.code,
            "removed": recipe.removed}
    report = {"pipeline": meta, **job.report}
    with checkout(job.base_uri, recipe, stream=job.stream, device=job.device, dtype=job.dtype,
                  record=job.source_record) as wc:
        model = wc.model if wc.streamed is None else wc.streamed.model

        def mlflow_files(folder: Path) -> None:  # the same folder is an MLflow Model (tasks.mlflow_model)
            write_mlflow_model(folder, architecture=type(model).__name__, tokenizer_class=type(wc.tokenizer).__name__,
                               dtype=str(next(p.dtype for p in model.parameters() if not p.is_meta)),
                               source_name=redact(str(job.source.get("uri") or "")))

        if wc.streamed is not None:
            wc.streamed.save(job.uri, tokenizer=wc.tokenizer, report=report, recipe=full, owned=True,
                             extra=mlflow_files)
        else:
            save_pruned(wc.model, wc.tokenizer, job.uri, report=report, recipe=full, owned=True,
                        extra=mlflow_files)
    return dict(json_result(meta))


@task(name="materialize-model", cache_policy=JOB_KEY, persist_result=True, result_serializer=RESULT_SERIALIZER)
def materialize_model(job: ModelJob) -> dict[str, Any]:
    """Save the source model as ``<store>/models/<key>`` (in the job's dtype); returns its URI, tensor hash and
    depth. The source is hashed again as it loads, and must still be the one the job was keyed by."""
    if is_complete(job.uri):
        return dict(json_result(read_meta(job.uri)))
    lm = load_model(job.source_uri, job.revision, allow_pickle=job.allow_pickle,
                    trust_remote_code=job.trust_remote_code, device=job.device, dtype=_torch_dtype(job.dtype))
    if lm.content_hash != job.source_hash:
        raise PrunecompError(f"model {redact(job.source_uri)!r} changed while the run started; run it again")
    meta = {"uri": job.uri, "hash": model_state_hash(lm.model), "num_layers": len(decoder_layers(lm.model)),
            "source": lm.provenance() | {"uri": redact(lm.source.uri)}, "key": job.key, "code": job.code}
    save_pruned(lm.model, lm.tokenizer, job.uri, report={"pipeline": meta}, owned=True)
    return dict(json_result(meta))
