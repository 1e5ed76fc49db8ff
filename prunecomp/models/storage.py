"""Write artifacts to a local path or any fsspec URL (s3://...) without ever leaving a half-written one.

Local: everything is written into a hidden temp folder beside the target and renamed into place (atomic on one
filesystem). Object stores have no atomic rename of a prefix, so there the files are uploaded first and a
``_COMPLETE`` marker last; :func:`is_complete` is what readers (and caches) check, and a failed upload removes what
it wrote.

The marker is also a manifest: it lists the files prunecomp wrote. That is how a later write tells an earlier
prunecomp result (which ``--overwrite`` may replace) from a folder that holds anything else (which nothing here
ever deletes): :func:`check_replace`. Where an output may go at all (not over a source, not over ``/`` or the
working directory) is :mod:`prunecomp.models.outputs`.
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

__all__ = ["MARKER", "check_replace", "existing_files", "is_complete", "is_prunecomp_result", "is_remote",
           "pid_alive", "recover_interrupted", "write_dir", "write_json"]

MARKER = "_COMPLETE"
WRITING = "_WRITING"
"""On an object store, written before an earlier result's marker is removed and deleted after the new marker is
written: a swap that failed midway still reads as prunecomp's own folder (never as a complete result)."""
REPORT_FILE = "prunecomp_report.json"
"""The run report a pruned model's folder carries (:func:`prunecomp.recipes.checkpoint.save_pruned` writes it)."""
LEGACY_RESULT_FILES = (REPORT_FILE, "recipe.json")
"""An empty marker (written before markers were manifests) counts as prunecomp's when one of these is beside it."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser()


def _fs(uri: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(uri)


def manifest(files: list[str]) -> bytes:
    """The marker's content: who wrote the folder and which files (relative POSIX paths) it holds."""
    return json.dumps({"writer": "prunecomp", "files": sorted(files)}, indent=0).encode()


def _manifest_files(payload: bytes) -> set[str] | None:
    """The files a marker lists; ``None`` for an empty (older) marker or one prunecomp did not write."""
    try:
        doc = json.loads(payload.decode() or "null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(doc, dict) and doc.get("writer") == "prunecomp" and isinstance(doc.get("files"), list):
        return {str(f) for f in doc["files"]}
    return None


def existing_files(uri: str) -> list[str] | None:
    """Relative paths of the files under ``uri``; ``None`` when nothing is there, ``[]`` for an empty folder."""
    if not is_remote(uri):
        path = _local(uri)
        if not path.exists():
            return None
        if not path.is_dir():
            return ["."]
        return sorted(f.relative_to(path).as_posix() for f in path.rglob("*") if not f.is_dir())
    fs, path = _fs(uri)
    root = path.rstrip("/")
    with contextlib.suppress(FileNotFoundError):
        if fs.isfile(root):
            return ["."]
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return None
    return sorted(p.removeprefix(root + "/") for p in found if p != root) or None


def _read(uri: str, name: str) -> bytes | None:
    try:
        if not is_remote(uri):
            return (_local(uri) / name).read_bytes()
        fs, path = _fs(uri)
        return bytes(fs.cat_file(f"{path.rstrip('/')}/{name}"))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _foreign(uri: str, files: list[str]) -> list[str]:
    """The files under ``uri`` prunecomp cannot vouch for: not listed by its marker (or, mid-swap on an object
    store, its ``_WRITING`` note); with an empty, older marker, none when a prunecomp report or recipe is beside
    it."""
    present = set(files) - {MARKER, WRITING}
    best = sorted(present)
    for name in (MARKER, WRITING):
        if name not in files:
            continue
        payload = _read(uri, name) or b""
        listed = _manifest_files(payload)
        if listed is not None:
            best = min(best, sorted(present - listed), key=len)
        elif name == MARKER and not payload.strip() and any(f in present for f in LEGACY_RESULT_FILES):
            return []
    return best


def is_prunecomp_result(uri: str, files: list[str] | None = None) -> bool:
    """True when everything under ``uri`` was written by prunecomp (see :func:`_foreign`)."""
    files = existing_files(uri) if files is None else files
    if not files or "." in files or (MARKER not in files and WRITING not in files):
        return False
    return not _foreign(uri, files)


def check_replace(uri: str, *, overwrite: bool, option: str = "--overwrite") -> None:
    """Refuse to write over ``uri`` unless it is absent, an empty folder, or (with ``overwrite``) an earlier
    prunecomp result. The same rule on local disk and on object stores: nothing the user did not name and
    prunecomp did not write is ever replaced."""
    files = existing_files(uri)
    if not files:
        return
    if files == ["."]:
        raise PrunecompError(f"output {uri!r} is a file, not a folder; choose another output path")
    if not overwrite:
        raise PrunecompError(f"output {uri!r} already exists and is not empty; pass {option} to replace an earlier "
                             "prunecomp result there, or choose a new output path")
    if not is_prunecomp_result(uri, files):
        foreign = _foreign(uri, files) or files
        other = foreign[0] if len(foreign) == 1 else f"{foreign[0]} and {len(foreign) - 1} more"
        raise PrunecompError(f"output {uri!r} holds files prunecomp did not write (for example {other!r}); "
                             f"{option} replaces only an empty folder or an earlier prunecomp result: choose another "
                             "output path, or empty it yourself")


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


def recover_interrupted(target: Path, *, max_age_s: float = 3600.0) -> list[Path]:
    """Undo what a crashed (or SIGKILLed) writer left beside ``target``: a previous result it had moved aside
    (``.<name>.old-<pid>-*``) goes back in place when ``target`` is missing (the crash fell between the two
    renames of a replacement), then its temp folders are removed (see :func:`clean_stale_temps`)."""
    if not target.exists():
        for path in sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime,
                           reverse=True):
            if _stale_temp(target, path, max_age_s) and (path / MARKER).is_file():
                os.replace(path, target)
                _fsync_dir(target.parent)
                break
    return clean_stale_temps(target, max_age_s=max_age_s)


def _stale_temp(target: Path, path: Path, max_age_s: float) -> bool:
    rest = path.name[len(target.name) + 2:].partition("-")[2]
    pid_text = rest.split("-", 1)[0]
    if "-" in rest and pid_text.isdigit():
        return int(pid_text) != os.getpid() and not pid_alive(int(pid_text))
    return time.time() - path.stat().st_mtime > max_age_s


def clean_stale_temps(target: Path, *, max_age_s: float = 3600.0) -> list[Path]:
    """Remove the temp folders a crashed (or SIGKILLed) writer left beside ``target``: ``.<name>.tmp-<pid>-*`` and
    ``.<name>.old-<pid>-*`` whose process is gone (same host), or, without a pid, older than ``max_age_s``.
    Call :func:`recover_interrupted` instead where a moved-aside result may need restoring first."""
    removed = []
    for path in target.parent.glob(f".{target.name}.*-*"):
        kind = path.name[len(target.name) + 2:].partition("-")[0]
        if kind not in ("tmp", "old"):
            continue
        if _stale_temp(target, path, max_age_s):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _local_files(root: Path) -> list[str]:
    return [f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file()]


def write_dir(uri: str, fill: Callable[[Path], None], *, overwrite: bool = False, owned: bool = False) -> str:
    """Create folder ``uri`` with the files ``fill(tmp_dir)`` writes, atomically; returns ``uri``.

    What is already at ``uri`` is replaced only as :func:`check_replace` allows (``overwrite``: an earlier prunecomp
    result), checked before and again just before the swap. ``owned=True`` is for locations prunecomp alone names
    (the pipeline store's content-keyed folders), which it may always replace."""
    if not is_remote(uri):
        target = _local(uri)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PrunecompError(f"cannot create output {uri!r}: {exc.strerror or exc}") from exc
        recover_interrupted(target)
        if not owned:
            check_replace(uri, overwrite=overwrite)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
        except OSError as exc:
            raise PrunecompError(f"cannot write output {uri!r}: {exc.strerror or exc}") from exc
        try:
            with _disk_errors(uri):
                fill(tmp)
                (tmp / MARKER).write_bytes(manifest(_local_files(tmp)))
                _fsync_tree(tmp)  # the data is on disk before the rename makes it visible
            if target.exists():
                if not owned:
                    try:
                        check_replace(uri, overwrite=overwrite)
                    except PrunecompError as exc:
                        raise PrunecompError(f"output {uri!r} changed while writing; not replacing it ({exc})") \
                            from exc
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
    if not owned:
        check_replace(uri, overwrite=overwrite)
    with tempfile.TemporaryDirectory(prefix="prunecomp-") as tmp:
        with _disk_errors(f"{uri} (staged in {tempfile.gettempdir()})"):
            fill(Path(tmp))
        if not owned:  # checked again: another writer may have filled the prefix meanwhile
            check_replace(uri, overwrite=overwrite)
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
            old = {p.removeprefix(path.rstrip("/") + "/") for p in fs.find(path)}
            # before the old marker goes: the folder stays recognisably prunecomp's if the swap dies midway
            fs.pipe(f"{path}/{WRITING}", manifest(sorted((old | set(files)) - {MARKER, WRITING})))
            with contextlib.suppress(FileNotFoundError):
                fs.rm(f"{path}/{MARKER}")
        else:
            old = set()
        for name in files:
            fs.copy(f"{staging}/{name}", f"{path}/{name}")
        for name in sorted(old - set(files) - {MARKER, WRITING}):
            fs.rm(f"{path}/{name}")
        fs.pipe(f"{path}/{MARKER}", manifest(files))
        with contextlib.suppress(FileNotFoundError):
            fs.rm(f"{path}/{WRITING}")
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
