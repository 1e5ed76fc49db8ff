"""One run at a time per run id and store: a lock file beside the run's journal, kept alive by a heartbeat.

Two ``prunecomp run`` with the same parameters on the same store would compute the same steps into the same
places; the second one fails at once with a message saying who holds the run, instead of racing the first.

The lock (``<store>/runs/<run>/lock.json``) records who holds it (host name, boot id, container id, pid
namespace, pid), a random token and a heartbeat. It is created atomically: ``O_EXCL`` on local disk, a
conditional PUT (``If-None-Match: *``) on S3, so of two runs starting together exactly one gets it.

Why a background heartbeat: a single step, the dense evaluation, the final write or a QA evaluation can each run
for hours, so a heartbeat written only between steps would look dead during the longest, most expensive parts of
a run. A daemon thread refreshes it every ``$PRUNECOMP_LOCK_BEAT_S`` seconds (default 60, at most a third of the
stale limit) for exactly as long as the lock is held; it stops, and has stopped writing, before the block exits.
The flow's explicit :meth:`RunLock.beat` calls still refresh it and are where a lost lock becomes an error.

Why every beat checks the token: a run frozen past the stale limit (a suspended machine, a long network
partition) may have been taken over meanwhile. Overwriting the new holder's lock would give two live runs of the
same id; instead the beat re-reads the lock, and when it holds another token (or is gone) the heartbeat stops, a
warning is logged and the next explicit :meth:`RunLock.beat` raises :class:`PrunecompError`. The read and the
write are two operations: a takeover that lands exactly between them is overwritten, and the new holder finds out
at its own next beat, so one of the two still stops.

Why the owner is more than host and pid: in containers a host name is a pod name that gets reused, every
container's first process is pid 1 (always alive, seen from anywhere), and the same pid means another process in
another pid namespace. A pid is probed only when the record's host name, boot id (``/proc/sys/kernel/random/
boot_id``), container id (from ``/proc/self/cgroup`` or ``/proc/self/mountinfo``, else the host name) and pid
namespace all equal this process's: then a dead pid (or our own pid under a token this process does not hold: an
earlier process that had our pid) means the holder is gone. Otherwise only the heartbeat counts: a lock is taken
over, with a log line, when it is older than ``$PRUNECOMP_LOCK_STALE_S`` (default 30 min, thirty missed beats).
Taking over is delete-then-create, so two runs taking over the same dead lock at the same instant still race for
the create, and one of them fails.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prunecomp.errors import PrunecompError
from prunecomp.models.redact import redact
from prunecomp.models.storage import is_remote, pid_alive, write_json
from tasks.files import read_json

__all__ = ["BEAT_ENV", "STALE_ENV", "RunLock", "beat_interval", "machine", "run_lock", "stale_limit"]

STALE_ENV = "PRUNECOMP_LOCK_STALE_S"
BEAT_ENV = "PRUNECOMP_LOCK_BEAT_S"
DEFAULT_STALE_S = 30 * 60.0
DEFAULT_BEAT_S = 60.0
IDENTITY = ("host", "boot", "container", "pidns")  # what must match before a pid is probed

_log = logging.getLogger(__name__)
_HELD: set[str] = set()  # tokens of the locks this process holds now


def stale_limit() -> float:
    """Seconds without a heartbeat after which a lock is taken over (``$PRUNECOMP_LOCK_STALE_S``)."""
    return float(os.environ.get(STALE_ENV) or DEFAULT_STALE_S)


def beat_interval() -> float:
    """Seconds between heartbeats (``$PRUNECOMP_LOCK_BEAT_S``), never more than a third of the stale limit, so a
    live run beats at least twice before anyone may call it dead."""
    wanted = float(os.environ.get(BEAT_ENV) or DEFAULT_BEAT_S)
    return max(0.01, min(wanted, stale_limit() / 3))


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


_CGROUP_ID = re.compile(r"[0-9a-f]{32,64}")
_MOUNT_ID = re.compile(r"/(?:containers|sandboxes|overlay-containers)/([0-9a-f]{64})/|/pods/([0-9a-f_-]{36})/")


def _container_id() -> str | None:
    """The container this process runs in, where Linux shows it: a 32-64 hex id in a cgroup path (Docker,
    containerd, CRI-O, podman on cgroup v1), else the container or pod folder a bind mount comes from (Docker's
    ``/etc/hostname``, a kubelet volume; cgroup v2 shows ``0::/`` inside a container)."""
    for line in (_read_text("/proc/self/cgroup") or "").splitlines():  # hierarchy:controllers:path
        found = _CGROUP_ID.findall(line.split(":", 2)[-1])
        if found:
            return str(found[-1])
    for line in (_read_text("/proc/self/mountinfo") or "").splitlines():
        match = _MOUNT_ID.search(line)
        if match:
            return match[1] or match[2]
    return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@functools.cache
def _machine() -> tuple[tuple[str, str | None], ...]:
    host = socket.gethostname()
    return (("host", host), ("boot", _read_text("/proc/sys/kernel/random/boot_id")),
            ("container", _container_id() or host), ("pidns", _pid_namespace()))


def machine() -> dict[str, str | None]:
    """Who this process is, beyond its pid: host name, boot id, container id (else the host name), pid namespace.
    Outside Linux the boot id and namespace are ``None`` on both sides, and the host name alone decides."""
    return dict(_machine())


def _same_machine(owner: dict[str, Any]) -> bool:
    """Whether ``owner``'s pid names a process this one can probe: same host, boot, container and pid namespace.
    A record that lacks them is never probed: its pid could name any process."""
    mine = machine()
    return all(owner.get(key) == mine[key] for key in IDENTITY)


def _stale(owner: dict[str, Any]) -> str | None:
    """Why ``owner`` no longer holds the run, or ``None`` when it may still be running."""
    pid = int(owner.get("pid") or 0)
    if pid > 0 and _same_machine(owner):
        if pid == os.getpid():
            if owner.get("token") not in _HELD:
                return f"its process {pid} is gone (this process has its pid now)"
        elif not pid_alive(pid):
            return f"process {pid} on this host is gone"
    limit = stale_limit()
    age = time.time() - float(owner.get("heartbeat") or 0)
    if age > limit:
        return f"no heartbeat for {age / 60:.1f} min (over ${STALE_ENV}={limit:.0f} s)"
    return None


def _delete(uri: str) -> None:
    if is_remote(uri):
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)
    else:
        Path(uri).unlink(missing_ok=True)


class RunLock:
    """A held lock. A daemon thread refreshes its heartbeat while it is held; :meth:`beat` refreshes it now and
    raises when the lock was lost; :attr:`lost` says why it was, else ``None``."""

    def __init__(self, uri: str, owner: dict[str, Any], *, interval: float | None = None, log: Any = None) -> None:
        self.uri, self.owner = uri, owner
        self.interval = interval if interval is not None else beat_interval()
        self.lost: str | None = None
        self._log = log if log is not None else _log
        self._mutex = threading.Lock()  # one refresh at a time, and none after release
        self._stop = threading.Event()
        self._released = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the heartbeat thread (daemon: a process that dies takes it along, and its heartbeat goes stale)."""
        _HELD.add(self.owner["token"])
        self._thread = threading.Thread(target=self._beat_loop, daemon=True,
                                        name=f"prunecomp-lock-{self.owner.get('run_id', '')}")
        self._thread.start()

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self._refresh():
                    return
            except Exception as exc:  # a storage hiccup: the next beat tries again; staleness takes many beats
                self._log.warning("could not refresh the heartbeat of run %s: %s", self.owner.get("run_id"),
                                  redact(f"{type(exc).__name__}: {exc}"))

    def _refresh(self) -> bool:
        """Write a new heartbeat if the lock is still ours; ``False``, with :attr:`lost` set, once it is not."""
        with self._mutex:
            if self._released or self.lost is not None:
                return False
            try:
                current = read_json(self.uri)
            except FileNotFoundError:
                current = None
            if not isinstance(current, dict) or current.get("token") != self.owner["token"]:
                self.lost = ("its lock was deleted" if current is None else
                             f"its lock is now held by pid {current.get('pid')} on {current.get('host')}")
                self._log.warning("run %s lost its lock (%s): stopping its heartbeat; its next step fails",
                                  self.owner.get("run_id"), self.lost)
                return False
            self.owner["heartbeat"] = time.time()
            write_json(self.uri, self.owner)
            return True

    def beat(self) -> None:
        """Refresh the heartbeat now; :class:`PrunecompError` when the lock is no longer ours (the run must stop
        before it writes anything more). A storage error is logged, not raised: the thread retries."""
        if self.lost is None:
            try:
                self._refresh()
            except Exception as exc:  # unreachable storage is not a lost lock
                self._log.warning("could not refresh the heartbeat of run %s: %s", self.owner.get("run_id"),
                                  redact(f"{type(exc).__name__}: {exc}"))
        if self.lost is not None:
            raise PrunecompError(f"run {self.owner.get('run_id')!r} lost its lock ({self.lost}): another process "
                                 "took the run over; this one stops here")

    def release(self) -> None:
        """Stop the heartbeat, then remove the lock if it is still ours. After this returns nothing writes it."""
        self._stop.set()
        with self._mutex:  # waits for a refresh in flight; none writes after this
            self._released = True
            try:
                current = read_json(self.uri)
            except (FileNotFoundError, PrunecompError, ValueError):
                current = None
            if isinstance(current, dict) and current.get("token") == self.owner["token"]:
                _delete(self.uri)  # not when taken over meanwhile: that lock is not ours to remove
            _HELD.discard(self.owner["token"])
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)  # it only waits on the stop event or the mutex: it ends at once


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
             on_stale: Callable[[dict[str, Any], str], None] | None = None,
             beat_s: float | None = None) -> Iterator[RunLock]:
    """Hold the lock of ``run_id`` at ``uri`` for the block, its heartbeat refreshed every ``beat_s`` seconds
    (default :func:`beat_interval`) by a thread that ends with the block; a clear error when a live run holds it.

    ``extra`` is recorded in the lock (the orchestrator's run id); ``on_stale(held, why)`` is told about a dead
    holder's record when its lock is taken over (to mark its orchestrator run crashed); its errors are logged."""
    now = time.time()
    owner = {**(extra or {}), "run_id": run_id, **machine(), "pid": os.getpid(), "started": now, "heartbeat": now,
             "token": os.urandom(8).hex()}
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
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(held.get("started") or 0)))
            age = time.time() - float(held.get("heartbeat") or 0)
            raise PrunecompError(
                f"run {run_id!r} is already running (pid {held.get('pid')} on {held.get('host')}, since {since} "
                f"UTC, last heartbeat {age:.0f} s ago); wait for it to finish, or, if that process is gone, delete "
                f"{redact(uri)}")
        if log is not None:
            log.warning("taking over the lock of run %s: %s", run_id, why)
        if on_stale is not None:
            try:
                on_stale(held, why)
            except Exception as exc:  # bookkeeping of a dead run must not stop the live one
                if log is not None:
                    log.warning("could not update the dead run's record: %s", exc)
        _delete(uri)
    else:
        raise PrunecompError(f"could not take the lock of run {run_id!r} at {redact(uri)}")
    lock = RunLock(uri, owner, interval=beat_s, log=log)
    lock.start()
    try:
        yield lock
    finally:
        lock.release()
