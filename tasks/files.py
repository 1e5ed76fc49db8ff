"""Small reads from a local path or fsspec URL (the writes go through :mod:`prunecomp.models.storage`, atomically)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prunecomp.errors import PrunecompError
from prunecomp.models.redact import redact
from prunecomp.models.storage import is_remote

__all__ = ["exists", "list_dirs", "read_bytes", "read_json", "size"]


def read_bytes(uri: str) -> bytes:
    if not is_remote(uri):
        return Path(uri.removeprefix("file://")).expanduser().read_bytes()
    import fsspec

    try:
        with fsspec.open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise PrunecompError(redact(f"cannot read {uri!r}: {type(exc).__name__}: {exc}")) from exc


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def exists(uri: str) -> bool:
    if not is_remote(uri):
        return Path(uri.removeprefix("file://")).expanduser().exists()
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return bool(fs.exists(path))


def size(uri: str) -> int:
    """Bytes of the file at ``uri``."""
    if not is_remote(uri):
        return Path(uri.removeprefix("file://")).expanduser().stat().st_size
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return int(fs.size(path))


def list_dirs(uri: str) -> list[str]:
    """Names of the sub-folders of ``uri`` (empty when it does not exist)."""
    if not is_remote(uri):
        root = Path(uri.removeprefix("file://")).expanduser()
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if root.is_dir() else []
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if fs.isdir(p))
