"""One run at a time per run id and store: a lock file beside the run's journal.

Two ``prunecomp run`` with the same parameters on the same store would compute the same steps into the same
places; the second one fails at once with a message saying who holds the run, instead of racing the first.

The lock (``<store>/runs/<run>/lock.json``) records host, pid and a heartbeat the flow refreshes after every
step. It is stale, and taken over with a log line, when its process is gone (same host) or its heartbeat is
older than ``$PRUNECOMP_LOCK_STALE_S`` (default 6 h: a run killed on another machine cannot be probed). It is
created atomically: ``O_EXCL`` on local disk, a conditional PUT (``If-None-Match: *``) on S3, so of two runs
starting together exactly one gets it. Taking over a dead holder's lock is delete-then-create, so two runs
taking over the same dead lock at the same instant still race for the create, and one of them fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prunecomp.errors import PrunecompError
from prunecomp.storage import is_remote, pid_alive, write_json
from tasks.files import read_json

__all__ = ["RunLock", "run_lock"]

STALE_ENV = "PRUNECOMP_LOCK_STALE_S"


class RunLock:
    """A held lock; :meth:`beat` refreshes its heartbeat."""

    def __init__(self, uri: str, owner: dict[str, Any]) -> None:
        self.uri, self.owner = uri, owner

    def beat(self) -> None:
        self.owner["heartbeat"] = time.time()
        write_json(self.uri, self.owner)

    def release(self) -> None:
        try:
            current = read_json(self.uri)
        except (FileNotFoundError, PrunecompError, ValueError):
            return
        if current.get("token") != self.owner["token"]:
            return  # taken over meanwhile: not ours to remove
        if is_remote(self.uri):
            import fsspec

            fs, path = fsspec.core.url_to_fs(self.uri)
            fs.rm(path)
        else:
            Path(self.uri).unlink(missing_ok=True)


def _stale(owner: dict[str, Any]) -> str | None:
    """Why ``owner`` no longer holds the run, or ``None`` when it may still be running."""
    limit = float(os.environ.get(STALE_ENV) or 6 * 3600)
    if owner.get("host") == socket.gethostname() and not pid_alive(int(owner.get("pid", 0))):
        return f"process {owner.get('pid')} on this host is gone"
    age = time.time() - float(owner.get("heartbeat", 0))
    if age > limit:
        return f"no heartbeat for {age / 3600:.1f} h (over ${STALE_ENV}={limit:.0f} s)"
    return None


def _create_remote(uri: str, owner: dict[str, Any]) -> bool:
    """Create the lock object only if it does not exist (S3 conditional write); False when it does."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    try:
        fs.pipe_file(path, json.dumps(owner).encode(), mode="create")
    except FileExistsError:
        return False
    return True


def _create_local(uri: str, owner: dict[str, Any]) -> bool:
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(owner, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return True


@contextmanager
def run_lock(uri: str, run_id: str, log: Any = None, *, extra: dict[str, Any] | None = None,
             on_stale: Callable[[dict[str, Any], str], None] | None = None) -> Iterator[RunLock]:
    """Hold the lock of ``run_id`` at ``uri`` for the block; a clear error when a live run holds it.

    ``extra`` is recorded in the lock (the orchestrator's run id); ``on_stale(held, why)`` is told about a dead
    holder's record when its lock is taken over (to mark its orchestrator run crashed); its errors are logged."""
    owner = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
             "heartbeat": time.time(), "token": os.urandom(8).hex(), **(extra or {})}
    for _ in range(3):
        if not is_remote(uri) and _create_local(uri, owner):
            break
        if is_remote(uri) and _create_remote(uri, owner):
            break
        try:
            held = dict(read_json(uri))
        except (FileNotFoundError, ValueError):
            continue  # released (or half-written) meanwhile: try again
        why = _stale(held)
        if why is None:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(held.get("started", 0))))
            raise PrunecompError(
                f"run {run_id!r} is already running (pid {held.get('pid')} on {held.get('host')}, since {since} "
                f"UTC); wait for it to finish, or, if that process is gone, delete {uri}")
        if log is not None:
            log.warning("taking over the lock of run %s: %s", run_id, why)
        if on_stale is not None:
            try:
                on_stale(held, why)
            except Exception as exc:  # bookkeeping of a dead run must not stop the live one
                if log is not None:
                    log.warning("could not update the dead run's record: %s", exc)
        if is_remote(uri):
            import fsspec

            fs, path = fsspec.core.url_to_fs(uri)
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)
        else:
            Path(uri).unlink(missing_ok=True)
    else:
        raise PrunecompError(f"could not take the lock of run {run_id!r} at {uri}")
    lock = RunLock(uri, owner)
    try:
        yield lock
    finally:
        lock.release()
