"""Resolve the source model (where from, which revision, which bytes) and materialise it as a safetensors
checkpoint in the store: the root of every run's checkpoint chain.

Materialising once pays the slow load (a GGUF file is dequantised in ~25 s for SmolLM2) a single time; every
later task loads plain safetensors in about a second.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from prunecomp.adapters import decoder_layers
from prunecomp.checkpoint import REPORT_FILE, save_pruned
from prunecomp.errors import PrunecompError
from prunecomp.sources import content_hash, load_model, resolve_source
from prunecomp.storage import is_complete
from tasks.caching import JOB_KEY
from tasks.files import read_json
from tasks.jobs import ModelJob
from tasks.keys import model_state_hash
from tasks.settings import redact

__all__ = ["load_checkpoint", "materialize_model", "read_meta", "resolve_model"]


def read_meta(uri: str) -> dict[str, Any]:
    """The pipeline metadata a checkpoint was saved with (its ``prunecomp_report.json``)."""
    return dict(read_json(f"{uri.rstrip('/')}/{REPORT_FILE}")["pipeline"])


def load_checkpoint(uri: str, expected_hash: str | None = None) -> Any:
    """Load a pipeline checkpoint, refusing one whose tensors are not the ones the cache key was built from."""
    lm = load_model(uri)
    if expected_hash is not None:
        actual = model_state_hash(lm.model)
        if actual != expected_hash:
            raise PrunecompError(
                f"checkpoint {redact(uri)!r} changed since it was recorded (tensor hash {actual[:12]}, expected "
                f"{expected_hash[:12]}); delete it to have it recomputed"
            )
    return lm


@task(name="resolve-model", cache_policy=NO_CACHE)
def resolve_model(model: str | None, revision: str | None = None, allow_pickle: bool = False) -> dict[str, Any]:
    """Where the model comes from and the sha256 of its files (never cached: the bytes behind a name can move)."""
    source = resolve_source(model, revision, allow_pickle=allow_pickle)
    return {"uri": redact(source.uri), "kind": source.kind, "revision": source.revision,
            "gguf_file": source.gguf_file, "content_hash": content_hash(source)}


@task(name="materialize-model", cache_policy=JOB_KEY, persist_result=True)
def materialize_model(job: ModelJob) -> dict[str, Any]:
    """Save the source model as ``<store>/models/<key>``; returns its URI, tensor hash and depth."""
    if is_complete(job.uri):
        return read_meta(job.uri)
    lm = load_model(job.source_uri, job.revision, allow_pickle=job.allow_pickle,
                    trust_remote_code=job.trust_remote_code)
    if lm.content_hash != job.source_hash:
        raise PrunecompError(f"model {job.source_uri!r} changed while the run started; run it again")
    meta = {"uri": job.uri, "hash": model_state_hash(lm.model), "num_layers": len(decoder_layers(lm.model)),
            "source": lm.provenance() | {"uri": redact(lm.source.uri)}, "key": job.key, "code": job.code}
    save_pruned(lm.model, lm.tokenizer, job.uri, report={"pipeline": meta}, overwrite=True)
    return meta
