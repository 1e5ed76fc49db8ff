"""Evaluate a model next to its dense reference: QA (and optionally MMLU), retained performance, cached results.

Why a module apart from the CLI: ``prunecomp eval`` only renders what :func:`compare_models` returns, and the same
call serves notebooks and benchmarks. The dense reference is ``dense`` when given, else the ``"source"`` a
prunecomp checkpoint records in its ``prunecomp_report.json`` (uri and content hash), else none. Both models are
identified by content hash before any weights are loaded, so a reference whose results are cached
(:mod:`prunecomp.evaluation.cache`) is never loaded, and a recorded reference whose files changed since pruning is
refused rather than silently compared with.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunecomp.errors import PrunecompError
from prunecomp.evaluation import harness
from prunecomp.evaluation.cache import Cached, ResultCache, cached_mmlu, cached_qa, data_origin
from prunecomp.evaluation.lm_eval_run import check_limit
from prunecomp.models.sources import content_hash, load_model, resolve_source
from prunecomp.models.storage import REPORT_FILE

__all__ = ["ModelRef", "compare_models", "recorded_dense", "resolve_ref"]


@dataclass(frozen=True)
class ModelRef:
    """A model to evaluate: how to load it, the content hash it must have, and where the reference came from."""

    uri: str | None
    revision: str | None
    content_hash: str
    origin: str  # "--model", "--dense-model", or the report file it was read from

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "revision": self.revision, "content_hash": self.content_hash, "origin": self.origin}


def resolve_ref(uri: str | None, revision: str | None, *, origin: str, allow_pickle: bool = False,
                ) -> tuple[ModelRef, Path | None]:
    """Resolve and hash a model without loading it; also returns the path of its prunecomp report, if it has one."""
    source = resolve_source(uri, revision, allow_pickle=allow_pickle)
    report = source.local_dir / REPORT_FILE
    has_report = source.gguf_file is None and report.is_file()
    return ModelRef(uri, revision, content_hash(source), origin), report if has_report else None


def recorded_dense(report_path: Path) -> ModelRef | None:
    """The model a prunecomp checkpoint was pruned from, as its report records it (None when it records none)."""
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PrunecompError(f"cannot read the prunecomp report {report_path}: {err}") from err
    source = report.get("source") if isinstance(report, dict) else None
    if not isinstance(source, dict) or not source.get("content_hash") or "uri" not in source:
        return None
    return ModelRef(source["uri"], source.get("revision"), str(source["content_hash"]), str(report_path))


def precision() -> tuple[str, Any]:
    """``(device, dtype)`` every model is evaluated in (the defaults of :func:`load_model`), fixed once per run."""
    import torch

    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def _loader(ref: ModelRef, *, device: str, dtype: Any, allow_pickle: bool,
            trust_remote_code: bool) -> Callable[[], tuple[Any, Any]]:
    """Load ``ref`` at most once, on first use, checking its hash (a changed recorded reference is an error)."""

    @functools.cache
    def load() -> tuple[Any, Any]:
        try:
            lm = load_model(ref.uri, ref.revision, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                            dtype=dtype, device=device)
        except PrunecompError as err:
            if ref.origin in ("--model", "--dense-model"):
                raise
            raise PrunecompError(f"cannot load the dense reference recorded in {ref.origin} ({ref.uri!r}): {err}; "
                                 "pass --dense-model PATH_OR_ID, or --no-dense") from err
        if lm.content_hash != ref.content_hash:
            raise PrunecompError(
                f"model {ref.uri!r} has content hash {lm.content_hash[:16]}..., but {ref.origin} expects "
                f"{ref.content_hash[:16]}... (its files changed); pass --dense-model to compare with it anyway")
        return lm.model, lm.tokenizer

    return load


def _evaluate(ref: ModelRef, load: Callable[[], tuple[Any, Any]], *, tasks: Sequence[str], mmlu: bool,
              data_dir: Path | None, limit: int | None, seed: int, batch_size: int, dtype: str,
              cache: ResultCache, refresh: bool) -> dict[str, Any]:
    qa: Cached | None = None
    if tasks:
        qa = cached_qa(ref.content_hash, load, tasks, data_dir=data_dir, limit=limit, seed=seed, dtype=dtype,
                       batch_size=batch_size, cache=cache, refresh=refresh)
    mm = cached_mmlu(ref.content_hash, load, data_dir=data_dir, limit=limit, seed=seed, dtype=dtype, cache=cache,
                     refresh=refresh) if mmlu else None
    hits = (qa.hits if qa else []) + (mm.hits if mm else [])
    return ref.to_dict() | {"qa": qa.result if qa else None, "mmlu": mm.result if mm else None, "cached": hits}


def compare_models(model: str | None, *, revision: str | None = None, dense: str | None = None,
                   dense_revision: str | None = None, use_recorded_dense: bool = True,
                   tasks: Sequence[str] = harness.DEFAULT_TASKS, mmlu: bool = False, data_dir: Path | None = None,
                   limit: int | None = None, seed: int = 1234, batch_size: int = 8, cache: ResultCache | None = None,
                   refresh: bool = False, allow_pickle: bool = False, trust_remote_code: bool = False,
                   message: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Evaluate ``model`` and its dense reference on the same items; results are cached per model content hash.

    Returns ``{"model": {uri, revision, content_hash, origin, qa, mmlu, cached}, "dense": same or None,
    "retained": {"qa": harness.retained(...) | None, "mmlu": ... | None} or None, "tasks", "mmlu", "limit",
    "seed", "subset" (True when ``limit`` left items out), "data", "dtype"}``; ``cached`` lists what came from the
    cache ("mmlu" for MMLU).
    """
    names = harness.check_tasks(tasks) if tasks else []
    if not names and not mmlu:
        raise PrunecompError(f"nothing to evaluate: give --tasks (known: {', '.join(harness.KNOWN_TASKS)}) or --mmlu")
    check_limit(limit)
    cache = cache or ResultCache()
    device, torch_dtype = precision()
    dtype = str(torch_dtype).removeprefix("torch.")
    ref, report = resolve_ref(model, revision, origin="--model", allow_pickle=allow_pickle)
    dense_ref: ModelRef | None = None
    if dense is not None:
        dense_ref, _ = resolve_ref(dense, dense_revision, origin="--dense-model", allow_pickle=allow_pickle)
    elif use_recorded_dense and report is not None:
        dense_ref = recorded_dense(report)
    common = {"tasks": names, "mmlu": mmlu, "data_dir": data_dir, "limit": limit, "seed": seed,
              "batch_size": batch_size, "dtype": dtype, "cache": cache, "refresh": refresh}
    kw = {"device": device, "dtype": torch_dtype, "allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    message(f"evaluating {model or 'the default model'} ({ref.content_hash[:12]})")
    result = _evaluate(ref, _loader(ref, **kw), **common)
    dense_result = None
    if dense_ref is not None:
        message(f"dense reference {dense_ref.uri} ({dense_ref.content_hash[:12]}, from {dense_ref.origin})")
        dense_result = _evaluate(dense_ref, _loader(dense_ref, **kw), **common)
    retained = None
    if dense_result is not None:
        retained = {key: harness.retained(result[key], dense_result[key]) if result[key] else None
                    for key in ("qa", "mmlu")}
    qa = result["qa"]
    subset = limit is not None and (mmlu or any(r["n"] < r["n_total"] for r in qa["tasks"].values()))
    return {"model": result, "dense": dense_result, "retained": retained, "tasks": names, "mmlu": mmlu,
            "limit": limit, "seed": seed, "subset": subset, "data": data_origin(data_dir), "dtype": dtype}
