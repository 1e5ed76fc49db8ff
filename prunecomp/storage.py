"""Write artifacts to a local path or any fsspec URL (s3://...) without ever leaving a half-written one.

Local: everything is written into a hidden temp folder beside the target and renamed into place (atomic on one
filesystem). Object stores have no atomic rename of a prefix, so there the files are uploaded first and a
``_COMPLETE`` marker last; :func:`is_complete` is what readers (and caches) check, and a failed upload removes what
it wrote.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prunecomp.errors import PrunecompError

__all__ = ["MARKER", "check_not_inside", "check_writable", "is_complete", "is_remote", "pid_alive", "write_dir",
           "write_json"]

MARKER = "_COMPLETE"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser()


def _fs(uri: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(uri)


def check_writable(uri: str, *, overwrite: bool = False) -> None:
    """Fail early (before any work) when ``uri`` cannot be written or already holds a result."""
    if not is_remote(uri):
        path = _local(uri)
        if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
            raise PrunecompError(f"output {uri!r} already exists and is not empty; pass --overwrite to replace it")
        parent = path.parent
        probe_root = parent
        while not probe_root.exists():
            probe_root = probe_root.parent
        if not probe_root.is_dir():
            raise PrunecompError(f"output {uri!r} is not writable: {str(probe_root)!r} is a file, not a folder")
        if not os.access(probe_root, os.W_OK):
            raise PrunecompError(f"output {uri!r} is not writable: no write permission on {str(probe_root)!r}")
        return
    try:
        fs, path = _fs(uri)
        if fs.exists(f"{path}/{MARKER}") and not overwrite:
            raise PrunecompError(f"output {uri!r} already holds a result; pass --overwrite to replace it")
        probe = f"{path}/.prunecomp-probe-{uuid.uuid4().hex[:8]}"
        fs.pipe(probe, b"")
        fs.rm(probe)
    except PrunecompError:
        raise
    except Exception as exc:
        raise PrunecompError(f"output {uri!r} is not writable: {type(exc).__name__}: {exc}") from exc


def check_not_inside(out: str, source: str | Path | None) -> None:
    """Refuse an output equal to or inside a local source folder: writing (or ``--overwrite``) there would destroy
    the model being read."""
    if source is None or is_remote(out) or is_remote(str(source)):
        return
    src = _local(str(source)).resolve()
    if src.is_file():
        src = src.parent
    if not src.is_dir():
        return
    target = _local(out).resolve()
    if target == src or src in target.parents:
        raise PrunecompError(f"output {out!r} is inside the source model folder {str(src)!r}; write it elsewhere "
                             "(the source is never modified)")


def is_complete(uri: str) -> bool:
    """True when ``uri`` holds a finished artifact folder."""
    if not is_remote(uri):
        path = _local(uri)
        return (path / MARKER).is_file()
    fs, path = _fs(uri)
    return bool(fs.exists(f"{path}/{MARKER}"))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with path.open("rb+") as fh:
                os.fsync(fh.fileno())
        else:
            _fsync_dir(path)
    _fsync_dir(root)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (stale-writer and stale-lock detection)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(target: Path, *, max_age_s: float = 3600.0) -> list[Path]:
    """Remove the temp folders a crashed (or SIGKILLed) writer left beside ``target``: ``.<name>.tmp-<pid>-*`` and
    ``.<name>.old-<pid>-*`` whose process is gone (same host), or, without a pid, older than ``max_age_s``."""
    removed = []
    for path in target.parent.glob(f".{target.name}.*-*"):
        kind, _, rest = path.name[len(target.name) + 2:].partition("-")
        if kind not in ("tmp", "old"):
            continue
        pid_text = rest.split("-", 1)[0]
        if "-" in rest and pid_text.isdigit():
            stale = int(pid_text) != os.getpid() and not pid_alive(int(pid_text))
        else:
            stale = time.time() - path.stat().st_mtime > max_age_s
        if stale:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_dir(uri: str, fill: Callable[[Path], None], *, overwrite: bool = False) -> str:
    """Create folder ``uri`` with the files ``fill(tmp_dir)`` writes, atomically; returns ``uri``."""
    if not is_remote(uri):
        target = _local(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(target)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            with _disk_errors(uri):
                fill(tmp)
                (tmp / MARKER).write_text("")
                _fsync_tree(tmp)  # the data is on disk before the rename makes it visible
            if target.exists():
                if not overwrite and any(target.iterdir()):
                    raise PrunecompError(f"output {uri!r} appeared while writing; not replacing it")
                old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
            _fsync_dir(target.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return uri
    fs, path = _fs(uri)
    with tempfile.TemporaryDirectory(prefix="prunecomp-") as tmp:
        with _disk_errors(f"{uri} (staged in {tempfile.gettempdir()})"):
            fill(Path(tmp))
        _upload_staged(fs, path, uri, Path(tmp))
    return uri


@contextlib.contextmanager
def _disk_errors(where: str) -> Iterator[None]:
    """A full disk (or quota) while writing an output is the user's to fix: one clear error, not a traceback from
    inside safetensors; the caller's cleanup leaves nothing half-written and the previous content in place."""
    try:
        yield
    except Exception as exc:
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if not (full or "No space left on device" in str(exc)):  # safetensors wraps the OSError in its own type
            raise
        raise PrunecompError(f"no space left on the device while writing {where}: nothing was written and any "
                             "previous content is untouched; free space (or choose another --out / store) and "
                             "run again") from exc


STAGING_MAX_AGE_S = 24 * 3600.0
"""A staging prefix older than this is a killed writer's leftover. Object stores have no pids and no rename, so
age is all there is; a day is far beyond any upload (a 140 GB model at 100 MB/s takes 25 minutes), so a live
writer's staging copy is never taken for a leftover."""


def clean_stale_staging(fs: Any, path: str, *, max_age_s: float = STAGING_MAX_AGE_S) -> list[str]:
    """Remove the staging prefixes ``<path>.staging-<unix time>-<id>`` that a crashed or SIGKILLed writer left
    beside ``path`` on an object store, once older than ``max_age_s`` (by the time in their name). Best effort:
    a listing or delete that fails is left for the next writer."""
    removed = []
    parent, _, name = path.rstrip("/").rpartition("/")
    try:
        siblings = fs.ls(parent, detail=False) if parent else []
    except Exception:
        return removed
    for entry in siblings:
        base = entry.rstrip("/").rsplit("/", 1)[-1]
        if not base.startswith(f"{name}.staging-"):
            continue
        stamp = base[len(name) + len(".staging-"):].split("-", 1)[0]
        if stamp.isdigit() and time.time() - int(stamp) > max_age_s:
            with contextlib.suppress(Exception):
                fs.rm(entry, recursive=True)
                removed.append(entry)
    return removed


def _upload_staged(fs: Any, path: str, uri: str, local: Path) -> None:
    """Object stores have no rename: upload everything to a staging prefix beside ``path`` first (a failure there
    leaves the old result untouched and removes the staging copy), then swap with server-side copies: drop the old
    marker, copy the staged files over, delete old files the new result does not have, write the marker last.
    The old result is only touched once the new one is complete in staging; if the swap itself fails, the folder
    reads as unfinished (no marker: it is recomputed, never taken for a result) and the error names the complete
    staged copy."""
    files = sorted(f.relative_to(local).as_posix() for f in local.rglob("*") if f.is_file())
    clean_stale_staging(fs, path)
    staging = f"{path}.staging-{int(time.time())}-{uuid.uuid4().hex[:12]}"
    try:
        for name in files:
            fs.put_file(str(local / name), f"{staging}/{name}")
    except Exception as exc:
        with contextlib.suppress(Exception):
            fs.rm(staging, recursive=True)
        raise PrunecompError(f"upload to {uri!r} failed; the previous content, if any, is untouched: {exc}") from exc
    try:
        if fs.exists(path):
            with contextlib.suppress(FileNotFoundError):
                fs.rm(f"{path}/{MARKER}")
            old = {p.removeprefix(path.rstrip("/") + "/") for p in fs.find(path)}
        else:
            old = set()
        for name in files:
            fs.copy(f"{staging}/{name}", f"{path}/{name}")
        for name in sorted(old - set(files) - {MARKER}):
            fs.rm(f"{path}/{name}")
        fs.pipe(f"{path}/{MARKER}", b"")
    except Exception as exc:
        raise PrunecompError(f"replacing {uri!r} failed midway; the complete new content is at "
                             f"{uri.split('://')[0]}://{staging} (the folder reads as unfinished): {exc}") from exc
    with contextlib.suppress(Exception):
        fs.rm(staging, recursive=True)


def write_json(uri: str, data: Any) -> str:
    """Write one JSON file atomically (temp + rename locally; a single PUT is atomic on object stores)."""
    payload = json.dumps(data, indent=2, default=str).encode()
    if is_remote(uri):
        fs, path = _fs(uri)
        fs.pipe(path, payload)
        return uri
    path = _local(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with tmp.open("wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return uri
