"""A small on-disk cache of QA / MMLU results, keyed by everything that determines them.

Why: ``prunecomp eval`` compares every pruned variant with the same dense model, and evaluating that dense model
again for each variant costs minutes (7 QA tasks) to hours (5-shot MMLU) on a CPU. Results are stored under
``<cache_dir()>/eval`` (``$PRUNECOMP_CACHE_DIR``, default ``~/.cache/prunecomp``), one JSON file per entry, written
atomically, so concurrent runs cannot corrupt each other and an unreadable entry is simply a miss.

The key holds the model's content hash (config + weight bytes, :func:`prunecomp.models.sources.content_hash`), the task,
``limit``, ``seed`` (and ``n_shot`` for MMLU), the weights' dtype, the data origin ("hub" or the resolved local
folder, plus the size and mtime of every file read, so replaced data is a miss), the task YAML text and the
lm-eval version. Each QA task is one entry, so a later run with more tasks computes only the new ones. The model is
passed as a loader called only on a miss: a fully cached dense reference is never even loaded.

Nothing here imports Prefect, lm-eval or torch at import time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from prunecomp.evaluation import harness
from prunecomp.evaluation.lm_eval_run import check_limit
from prunecomp.models.storage import write_json

__all__ = [
    "CACHE_VERSION",
    "Cached",
    "ResultCache",
    "cached_mmlu",
    "cached_qa",
    "data_origin",
    "mmlu_key",
    "qa_key",
    "weights_digest",
]

CACHE_VERSION = 1
"""Bump when the meaning of a stored result changes (its fields, or how it is computed)."""

Loader = Callable[[], tuple[Any, Any]]
"""Returns ``(model, tokenizer)``; called at most once, and only when something must be computed."""

log = logging.getLogger(__name__)


class ResultCache:
    """JSON entries under ``root`` (default ``cache_dir() / "eval"``), named by the sha256 of their key."""

    def __init__(self, root: str | Path | None = None) -> None:
        if root is None:
            from prunecomp.models.sources import cache_dir  # imports torch (through the adapters): only when needed

            root = cache_dir() / "eval"
        self.root = Path(root).expanduser()

    def path(self, key: Mapping[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        return self.root / f"{digest[:32]}.json"

    def get(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The stored result for ``key``, or None (absent, unreadable, or stored under a colliding other key)."""
        path = self.path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("key") != json.loads(json.dumps(key, default=str)):
            return None
        result = entry.get("result")
        return result if isinstance(result, dict) else None

    def put(self, key: Mapping[str, Any], result: Mapping[str, Any]) -> Path | None:
        """Store ``result``; a cache that cannot be written only costs a recomputation later, so it warns."""
        path = self.path(key)
        try:
            write_json(str(path), {"key": dict(key), "result": dict(result)})
        except OSError as err:
            log.warning("could not write the evaluation cache entry %s: %s", path, err)
            return None
        return path


def weights_digest(model: Any) -> str:
    """16 hex of the sha256 of an in-memory model's state: every tensor's name and float32 bytes, in order.

    For models that exist only in memory (benchmarks, notebooks comparing variants), where there are no files for
    :func:`prunecomp.models.sources.content_hash` to read. Two models with equal weights get the same digest whatever
    produced them, so a variant that happens to equal another is evaluated once. Reads every weight once."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Cached:
    """A result and which parts of it came from the cache (QA: task names; MMLU: ``["mmlu"]``)."""

    result: dict[str, Any]
    hits: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)


def data_origin(data_dir: str | Path | None) -> str:
    """``"hub"`` or the resolved local data folder: what evaluation results record as ``"data"``."""
    return "hub" if data_dir is None else str(Path(data_dir).expanduser().resolve())


def _files_fingerprint(paths: Sequence[Path]) -> str:
    """Size and mtime of each file ("missing" when absent): cheap, and changes whenever a file is replaced."""
    parts = []
    for p in paths:
        try:
            st = p.stat()
            parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{p.name}:missing")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _task_files(task: str, root: Path) -> list[Path]:
    from prunecomp.evaluation.qa_data import LOCAL_SETS

    path = root / LOCAL_SETS[task].path
    return [path, path.with_name("valid-labels.lst")] if task == "piqa" else [path]


def _mmlu_files(root: Path) -> list[Path]:
    from prunecomp.evaluation.mmlu import MMLU_DIR, MMLU_SUBJECTS

    return [root / MMLU_DIR / split / f"{s}_{split}.csv" for s in MMLU_SUBJECTS for split in ("test", "dev")]


def _yaml_digest(name: str) -> str:
    try:
        return hashlib.sha256((harness.TASKS_DIR / f"{name}.yaml").read_bytes()).hexdigest()[:16]
    except OSError:
        return "missing"


def _lm_eval_version() -> str:
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return "unknown"


def _base_key(kind: str, model_hash: str, *, data_dir: str | Path | None, limit: int | None, seed: int,
              dtype: str) -> dict[str, Any]:
    return {"v": CACHE_VERSION, "kind": kind, "model": model_hash, "limit": limit, "seed": seed, "dtype": dtype,
            "data": data_origin(data_dir), "lm_eval": _lm_eval_version()}


def qa_key(model_hash: str, task: str, *, data_dir: str | Path | None, limit: int | None, seed: int,
           dtype: str) -> dict[str, Any]:
    """The cache key of one QA task's result."""
    key = _base_key("qa", model_hash, data_dir=data_dir, limit=limit, seed=seed, dtype=dtype)
    key.update(task=task, yaml=_yaml_digest(task))
    if data_dir is not None:
        key["files"] = _files_fingerprint(_task_files(task, Path(data_dir).expanduser()))
    return key


def mmlu_key(model_hash: str, *, data_dir: str | Path | None, n_shot: int, limit: int | None, seed: int,
             dtype: str) -> dict[str, Any]:
    """The cache key of a whole MMLU result (all 57 subjects)."""
    key = _base_key("mmlu", model_hash, data_dir=data_dir, limit=limit, seed=seed, dtype=dtype)
    key.update(n_shot=n_shot, yaml=_yaml_digest("_mmlu_template"))
    if data_dir is not None:
        key["files"] = _files_fingerprint(_mmlu_files(Path(data_dir).expanduser()))
    return key


def _qa_summary(rows: dict[str, dict[str, Any]], *, data_dir: str | Path | None, limit: int | None,
                seed: int) -> dict[str, Any]:
    """Per-task rows assembled into :func:`~prunecomp.evaluation.harness.evaluate_qa`'s summary shape."""
    return {
        "tasks": rows,
        "average": sum(r["score"] for r in rows.values()) / len(rows),
        "average_metric": {name: harness.AVERAGE_METRIC[name] for name in rows},
        "limit": limit,
        "seed": seed,
        "num_fewshot": 0,
        "data": data_origin(data_dir),
    }


def cached_qa(model_hash: str, load: Loader, tasks: Sequence[str], *, data_dir: str | Path | None,
              limit: int | None, seed: int, dtype: str, batch_size: int = 8, cache: ResultCache | None = None,
              refresh: bool = False) -> Cached:
    """:func:`~prunecomp.evaluation.harness.evaluate_qa` of the model behind ``load``, reusing cached tasks.

    Only the tasks missing from the cache are evaluated (in one lm-eval call); ``refresh`` recomputes all and
    overwrites their entries. ``cache=None`` uses the default location.
    """
    names = harness.check_tasks(tasks)
    check_limit(limit)
    cache = cache or ResultCache()
    keys = {t: qa_key(model_hash, t, data_dir=data_dir, limit=limit, seed=seed, dtype=dtype) for t in names}
    rows: dict[str, dict[str, Any]] = {}
    if not refresh:
        for t in names:
            hit = cache.get(keys[t])
            if hit is not None:
                rows[t] = hit
    missing = [t for t in names if t not in rows]
    if missing:
        model, tokenizer = load()
        fresh = harness.evaluate_qa(model, tokenizer, missing, data_dir=data_dir, limit=limit, seed=seed,
                                    batch_size=batch_size)
        for t in missing:
            rows[t] = fresh["tasks"][t]
            cache.put(keys[t], rows[t])
    summary = _qa_summary({t: rows[t] for t in names}, data_dir=data_dir, limit=limit, seed=seed)
    return Cached(summary, hits=[t for t in names if t not in missing], computed=missing)


def cached_mmlu(model_hash: str, load: Loader, *, data_dir: str | Path | None, n_shot: int = 5,
                limit: int | None = None, seed: int = 1234, dtype: str, cache: ResultCache | None = None,
                refresh: bool = False) -> Cached:
    """:func:`~prunecomp.evaluation.harness.evaluate_mmlu` of the model behind ``load``, cached as one entry."""
    check_limit(limit)
    cache = cache or ResultCache()
    key = mmlu_key(model_hash, data_dir=data_dir, n_shot=n_shot, limit=limit, seed=seed, dtype=dtype)
    hit = None if refresh else cache.get(key)
    if hit is not None:
        return Cached(hit, hits=["mmlu"])
    model, tokenizer = load()
    result = harness.evaluate_mmlu(model, tokenizer, data_dir=data_dir, n_shot=n_shot, limit=limit, seed=seed)
    cache.put(key, result)
    return Cached(result, computed=["mmlu"])
