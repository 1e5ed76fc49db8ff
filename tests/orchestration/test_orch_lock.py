"""The run lock holds for as long as its run lives, and only that long: a background heartbeat, a token check
before every write, and pid probes only where the pid means the same process (same host, boot, container and pid
namespace)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from prunecomp.errors import PrunecompError

pytestmark = pytest.mark.orchestration

DEAD_PID = 2**22 + 12345  # above the default pid_max: no process has it


class Log:
    """A logger stand-in that keeps what it was told."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, msg: str, *args: Any) -> None:
        self.lines.append(msg % args)


def _read(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def _lock_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("prunecomp-lock-") and t.is_alive()]


def _wait_for(cond: Any, timeout: float = 10.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


def test_heartbeat_advances_during_a_long_task_without_explicit_beats(tmp_path: Path, monkeypatch) -> None:
    """A step, the dense evaluation or the final write may outlast the stale limit: the heartbeat must move while
    the flow is busy, from a thread that ends with the block and writes nothing after it."""
    from tasks.locks import run_lock

    monkeypatch.setenv("PRUNECOMP_LOCK_BEAT_S", "0.05")
    uri = tmp_path / "runs" / "r" / "lock.json"
    with run_lock(str(uri), "r") as lock:
        first = _read(uri)["heartbeat"]
        assert _wait_for(lambda: _read(uri)["heartbeat"] > first)  # no lock.beat() call: the "long task"
        assert _read(uri)["token"] == lock.owner["token"] and lock.lost is None
        assert len(_lock_threads()) == 1
    assert not uri.exists() and _lock_threads() == []
    time.sleep(0.2)
    assert not uri.exists()  # no beat recreated it after the release


def test_beat_interval_is_configurable_and_bounded_by_the_stale_limit(monkeypatch) -> None:
    from tasks.locks import beat_interval

    monkeypatch.delenv("PRUNECOMP_LOCK_BEAT_S", raising=False)
    monkeypatch.delenv("PRUNECOMP_LOCK_STALE_S", raising=False)
    assert beat_interval() == 60
    monkeypatch.setenv("PRUNECOMP_LOCK_BEAT_S", "5")
    assert beat_interval() == 5
    monkeypatch.setenv("PRUNECOMP_LOCK_STALE_S", "6")
    assert beat_interval() == 2  # a live run beats at least twice before anyone may call it dead


def test_beat_with_a_foreign_token_does_not_overwrite(tmp_path: Path, monkeypatch) -> None:
    """Taken over while it was frozen: the old holder neither overwrites the new holder's lock (explicit beat or
    background thread) nor removes it, and its next explicit beat raises."""
    from tasks.locks import run_lock

    monkeypatch.setenv("PRUNECOMP_LOCK_BEAT_S", "3600")  # only the explicit beat writes here
    uri = tmp_path / "lock.json"
    log = Log()
    with run_lock(str(uri), "r", log) as lock:
        lock.beat()  # ours: refreshed
        assert _read(uri)["heartbeat"] >= lock.owner["started"]
        other = _read(uri) | {"token": "new-holder", "pid": DEAD_PID, "heartbeat": 123.0}
        uri.write_text(json.dumps(other))
        with pytest.raises(PrunecompError, match="lost its lock"):
            lock.beat()
        assert _read(uri) == other
        assert lock.lost and any("lost its lock" in line for line in log.lines)
        with pytest.raises(PrunecompError, match="lost its lock"):
            lock.beat()  # and stays lost
    assert _read(uri) == other  # not ours to remove


def test_background_beat_stops_when_the_lock_is_taken(tmp_path: Path, monkeypatch) -> None:
    from tasks.locks import run_lock

    monkeypatch.setenv("PRUNECOMP_LOCK_BEAT_S", "0.05")
    uri = tmp_path / "lock.json"
    log = Log()
    with run_lock(str(uri), "r", log) as lock:
        other = _read(uri) | {"token": "new-holder", "heartbeat": 123.0}
        uri.write_text(json.dumps(other))
        assert _wait_for(lambda: lock.lost is not None)
        assert _wait_for(lambda: _lock_threads() == [])  # the heartbeat stopped
        assert _read(uri) == other
        with pytest.raises(PrunecompError, match="lost its lock"):
            lock.beat()
    uri.unlink()
    with run_lock(str(uri), "r", log) as lock:  # a deleted lock is lost too (someone judged the run dead)
        uri.unlink()
        with pytest.raises(PrunecompError, match="deleted"):
            lock.beat()
    assert not uri.exists()


def _record(**kw: Any) -> dict[str, Any]:
    from tasks.locks import machine

    now = time.time()
    return {"run_id": "r", **machine(), "pid": DEAD_PID, "started": now, "heartbeat": now, "token": "theirs"} | kw


@pytest.mark.parametrize("pid", [1, DEAD_PID, os.getpid()])
@pytest.mark.parametrize("other", [{"boot": "another-boot"}, {"container": "another-container"},
                                   {"pidns": "pid:[1]"}])
def test_a_same_named_host_in_another_boot_or_container_is_judged_by_its_heartbeat(
        tmp_path: Path, monkeypatch, pid: int, other: dict[str, str]) -> None:
    """A reused pod name with pid 1 (alive everywhere), a pid that does not exist here or our own pid: none says
    anything about a process in another container or boot. A fresh heartbeat keeps the lock; a stale one loses it."""
    from tasks.locks import run_lock

    monkeypatch.setenv("PRUNECOMP_LOCK_STALE_S", "600")
    uri = tmp_path / "lock.json"
    held = _record(pid=pid, host=socket.gethostname(), **other)
    uri.write_text(json.dumps(held))
    with pytest.raises(PrunecompError, match="already running"), run_lock(str(uri), "r"):
        pass
    assert _read(uri) == held
    uri.write_text(json.dumps(held | {"heartbeat": time.time() - 601}))
    seen: list[str] = []
    with run_lock(str(uri), "r", on_stale=lambda h, why: seen.append(why)) as lock:
        assert _read(uri)["token"] == lock.owner["token"]
    assert len(seen) == 1 and "no heartbeat" in seen[0]


def test_a_record_without_boot_and_container_is_never_probed(tmp_path: Path) -> None:
    """A lock written without the identity (by another tool, say) has a pid nobody can interpret."""
    from tasks.locks import run_lock

    uri = tmp_path / "lock.json"
    legacy = {"run_id": "r", "host": socket.gethostname(), "pid": DEAD_PID, "started": time.time(),
              "heartbeat": time.time(), "token": "old"}
    uri.write_text(json.dumps(legacy))
    with pytest.raises(PrunecompError, match="already running"), run_lock(str(uri), "r"):
        pass


def test_same_boot_and_container_a_dead_pid_is_taken_over_at_once(tmp_path: Path) -> None:
    """Where the pid does mean the same process, a dead one (or our own pid under a token this process does not
    hold: an earlier process that had our pid) frees the lock without waiting for the heartbeat to go stale."""
    from tasks.locks import run_lock

    uri = tmp_path / "lock.json"
    for pid in (DEAD_PID, os.getpid()):
        uri.write_text(json.dumps(_record(pid=pid)))
        seen: list[str] = []
        with run_lock(str(uri), "r", on_stale=lambda h, why, seen=seen: seen.append(why)):
            pass
        assert len(seen) == 1 and "gone" in seen[0]
    with run_lock(str(uri), "r"), pytest.raises(PrunecompError, match="already running"), run_lock(str(uri), "r"):
        pass  # this process's own live lock is live


def test_s3_lock_beats_in_the_background_and_respects_a_new_holder(s3, monkeypatch) -> None:
    import s3fs

    from tasks.locks import run_lock

    monkeypatch.setenv("PRUNECOMP_LOCK_BEAT_S", "0.2")
    fs = s3fs.S3FileSystem()
    uri = "s3://prunecomp/lock-beat-test/run/lock.json"

    def read() -> dict[str, Any]:
        fs.invalidate_cache()
        return dict(json.loads(fs.cat(uri)))

    with run_lock(uri, "r", Log()) as lock:
        first = read()["heartbeat"]
        assert _wait_for(lambda: read()["heartbeat"] > first)
        other = read() | {"token": "new-holder"}
        fs.pipe(uri, json.dumps(other).encode())
        assert _wait_for(lambda: lock.lost is not None)
        assert read() == other
    assert read() == other
    fs.rm(uri)
