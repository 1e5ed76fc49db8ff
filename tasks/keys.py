"""Cache keys: stable hashes of what determines a result, and the code version that computed it.

Every cached task result is keyed by a :func:`stable_hash` of plain scalars (content hashes, validated configs,
step numbers, the code version and the store it lives in), never of live objects: tensors and modules hash
differently in every process, so they would never hit the cache. Prefect-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["CODE_VERSION_ENV", "NUMERIC_LIBRARIES", "code_files", "code_version", "library_versions",
           "model_state_hash", "source_digest", "stable_hash"]

CODE_VERSION_ENV = "PRUNECOMP_CODE_VERSION"
# The CLI package prints and parses options, it changes no number; everything else in prunecomp/ may.
_NOT_NUMERIC = ("prunecomp/cli/",)


def stable_hash(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` (pydantic models dumped in JSON mode)."""

    def plain(obj: Any) -> Any:
        if hasattr(obj, "model_dump"):
            return obj.model_dump(mode="json")
        if isinstance(obj, Path):
            return str(obj)
        if isinstance(obj, tuple | set | frozenset):
            return [plain(x) for x in (sorted(obj) if isinstance(obj, set | frozenset) else obj)]
        if isinstance(obj, dict):
            return {str(k): plain(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [plain(x) for x in obj]
        return obj

    payload = json.dumps(plain(list(parts)), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


# Libraries whose version can change a cached number (kernels, loading, lm-eval's scoring).
NUMERIC_LIBRARIES = ("torch", "transformers", "safetensors", "accelerate", "gguf", "lm-eval", "datasets")


def code_files() -> list[tuple[str, Path]]:
    """Every file whose content can change a cached result: the library's Python and its shipped task configs
    (QA YAMLs), and the task modules that compute what they cache. Names relative to the repository root."""
    import prunecomp
    import tasks

    out: list[tuple[str, Path]] = []
    for package in (prunecomp, tasks):
        root = Path(package.__file__).resolve().parent
        for path in sorted([*root.rglob("*.py"), *root.rglob("*.yaml"), *root.rglob("*.json")]):
            name = f"{root.name}/{path.relative_to(root).as_posix()}"
            if name.startswith(_NOT_NUMERIC) or "__pycache__" in path.parts:
                continue
            out.append((name, path))
    return out


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in NUMERIC_LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


def source_digest(files: list[tuple[str, Path]], versions: dict[str, str]) -> str:
    """sha256 over the files (names and bytes) and the library versions."""
    h = hashlib.sha256()
    for name, path in files:
        h.update(name.encode())
        h.update(path.read_bytes())
    h.update(json.dumps(versions, sort_keys=True).encode())
    return h.hexdigest()


@cache
def code_version() -> str:
    """``<package version>+<12 hex>`` over everything that computes a cached result, or ``$PRUNECOMP_CODE_VERSION``.

    Covered: every ``prunecomp/`` source and shipped config (QA task YAMLs), every ``tasks/`` module, and the
    versions of the libraries that change numbers (:data:`NUMERIC_LIBRARIES`). A source hash rather than the version
    string alone: during development the version does not move while the scoring code does, and a cached step
    computed by older code must not be reused. Left out, on purpose: ``prunecomp/cli/`` (prints, changes no number),
    ``flows/`` (wiring: every number it keeps comes from a task, keyed here), the device and CUDA/driver version
    (CPU runs are deterministic; a cache shared between a CPU and a GPU machine should set the variable per
    machine), and the contents of the data files behind ``data_dir`` (immutable by convention: ``shared/data``
    ships SHA256SUMS; the calibration digest, which covers the token ids, enters every step key). Pin it with
    the environment variable to share caches across trivial edits on purpose.
    """
    pinned = os.environ.get(CODE_VERSION_ENV)
    if pinned:
        return pinned
    try:
        from importlib.metadata import version

        pkg = version("prunecomp")
    except Exception:  # not installed (e.g. a bare checkout on PYTHONPATH)
        pkg = "0"
    return f"{pkg}+{source_digest(code_files(), library_versions())[:12]}"


def model_state_hash(model: Any) -> str:
    """sha256 over the model config and every tensor of its state dict (name, dtype, shape, bytes).

    Hashes what the model *is*, independent of how the file was serialised, so a checkpoint written by an
    interrupted-and-resumed run and one from an uninterrupted run compare equal exactly when their tensors do.
    """
    import torch

    h = hashlib.sha256()
    config = model.config.to_dict()
    # Filled in or rewritten by save_pretrained (a GGUF-loaded model has no `architectures` until saved).
    for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures"):
        config.pop(volatile, None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
