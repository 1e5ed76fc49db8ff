"""Promotion: move a registered model's alias (``champion``) to a version only through gates.

:func:`promote_version` refuses, with one message that says what to do instead, whatever would let
the alias move quietly to the wrong version:

* files that are not a finished, whole checkpoint matching the version
  (:func:`tasks.mlflow_model.check_version_files`);
* gates that check nothing: none at all, unknown metric names, NaN metrics (:mod:`tasks.gates`);
* a comparison with a champion evaluated differently: every version carries the digest of its evaluation
  settings (:func:`eval_settings_tags`), and ``vs_champion`` gates compare only equal digests;
* two promotions racing. Promotions of one registered model are serialized by a lock kept in the registry itself
  (:func:`promotion_lock`: a registered model ``<name>.promotion-lock``, created atomically because the registry
  refuses a second model of one name), so it holds for every promoter of that registry whatever store each one
  uses. Under it the champion is read, the gates decided, and the alias read again just before it moves
  (compare-and-set: an alias that moved is decided against again), so of two concurrent promotions the better
  version ends champion.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from pydantic import ValidationError

from prunecomp.errors import PrunecompError
from prunecomp.models.redact import redact
from tasks.gates import Decision, GateFailed, MetricGate, decide
from tasks.tracking import EVAL_DIGEST_TAG, EVAL_SETTINGS_TAG, client

__all__ = ["LOCK_SUFFIX", "promote_task", "promote_version", "promotion_lock", "version_metrics"]


def version_metrics(c: Any, name: str, version: str) -> dict[str, float]:
    """The final metrics of the run that produced a model version."""
    mv = c.get_model_version(name, version)
    if not mv.run_id:
        return {}
    return {k: float(v) for k, v in c.get_run(mv.run_id).data.metrics.items()}


def _alias_version(c: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


_DELIBERATE = ("or, to replace the champion deliberately, promote with gates that do not compare with it (a "
               "gates file without vs_champion gates)")


def _incomparable(candidate: Mapping[str, str], champion: Mapping[str, str], champion_version: str) -> str | None:
    """Why the candidate's metrics (its tags: ``candidate``) cannot be compared with the champion's, or ``None``."""
    mine, theirs = candidate.get(EVAL_DIGEST_TAG), champion.get(EVAL_DIGEST_TAG)
    if theirs is None:
        return (f"champion version {champion_version} has unknown evaluation settings (no {EVAL_DIGEST_TAG} tag: "
                "registered by an older prunecomp or by hand), so its metrics cannot be compared; register the "
                f"champion's model again from a run of this prunecomp, {_DELIBERATE}")
    if mine is None:
        return (f"this version has unknown evaluation settings (no {EVAL_DIGEST_TAG} tag: registered by an older "
                "prunecomp or by hand), so its metrics cannot be compared with the champion's; register it from a "
                f"run of this prunecomp, {_DELIBERATE}")
    if mine != theirs:
        return (f"evaluated differently from champion version {champion_version} "
                f"({candidate.get(EVAL_SETTINGS_TAG, mine)} vs {champion.get(EVAL_SETTINGS_TAG, theirs)}), so "
                "their metrics are not comparable; evaluate the candidate with the champion's settings (the compress "
                f"flow with the same evaluation section), {_DELIBERATE}")
    return None


LOCK_SUFFIX = ".promotion-lock"
LOCK_WAIT_S = 300.0
"""How long a promotion waits for another promotion of the same registered model (one takes seconds; a 70B
version's file check on S3 some more)."""
LOCK_STALE_S = 1800.0
"""A promotion lock held longer than this is a dead promoter's leftover (on another host, where its pid cannot
be probed) and is taken over."""
_LOCK_TAG = "prunecomp.promotion_lock"


def _lock_owner(c: Any, lock: str) -> dict[str, Any] | None:
    """Who holds the lock (host, pid, since, token), ``{}`` when unreadable, ``None`` when nobody holds it."""
    from mlflow.exceptions import MlflowException

    try:
        raw = c.get_registered_model(lock).tags.get(_LOCK_TAG)
    except MlflowException:
        return None
    try:
        return dict(json.loads(raw)) if raw else {}
    except ValueError:
        return {}


def _lock_stale(owner: Mapping[str, Any], stale_s: float) -> str | None:
    """Why the promotion that holds the lock is gone, or ``None`` while it may still be running."""
    from prunecomp.models.storage import pid_alive

    if owner.get("host") == socket.gethostname() and not pid_alive(int(owner.get("pid") or 0)):
        return f"process {owner.get('pid')} on this host is gone"
    age = time.time() - float(owner.get("since") or 0)
    return f"held for {age:.0f} s (over {stale_s:.0f} s)" if age > stale_s else None


def _drop_lock(c: Any, lock: str, token: str | None) -> None:
    """Remove the lock if ``token`` still holds it (a lock taken over meanwhile is not ours to remove)."""
    owner = _lock_owner(c, lock)
    if owner is not None and owner.get("token") == token:
        with contextlib.suppress(Exception):
            c.delete_registered_model(lock)


@contextlib.contextmanager
def promotion_lock(c: Any, name: str, *, wait_s: float = LOCK_WAIT_S,
                   stale_s: float = LOCK_STALE_S) -> Iterator[None]:
    """Hold the promotion lock of registered model ``name`` (see the module docstring), waiting up to ``wait_s``
    for another promotion to finish; a holder whose process is gone is taken over."""
    from mlflow.exceptions import MlflowException

    lock = f"{name}{LOCK_SUFFIX}"
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        owner = {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        try:
            c.create_registered_model(lock, tags={_LOCK_TAG: json.dumps(owner)},
                                      description=f"held while a promotion of {name} decides and moves an alias; "
                                                  "removed when it ends")
            break
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise PrunecompError(redact(f"cannot take the promotion lock of {name!r} ({exc.error_code}: "
                                            f"{str(exc)[:200]}); check the tracking server and run again")) from exc
        held = _lock_owner(c, lock)
        stale = held is not None and _lock_stale(held, stale_s) is not None
        if stale:
            _drop_lock(c, lock, held.get("token") if held else None)  # then race the others for the create
        if time.monotonic() > deadline:
            who = f"host {held.get('host')}, pid {held.get('pid')}" if held else "another process"
            raise PrunecompError(
                f"another promotion of {name!r} is in progress ({who}); waited {wait_s:.0f} s. Run this one again "
                f"when it has finished; if that process is gone, delete the registered model {lock!r}")
        if not stale:
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
    try:
        yield
    finally:
        _drop_lock(c, lock, token)


def _gates(gates: Iterable[MetricGate | Mapping[str, Any]]) -> list[MetricGate]:
    """The gates, validated; at least one (a promotion that checks nothing would move the alias to anything)."""
    try:
        checked = [MetricGate.model_validate(g) for g in gates]
    except ValidationError as exc:
        raise PrunecompError("invalid promotion gate: " + "; ".join(str(e["msg"]) for e in exc.errors())) from exc
    if not checked:
        raise PrunecompError("no promotion gates given; pass at least one (the default gates, or a gates file "
                             "with a non-empty `gates:` list)")
    return checked


def promote_version(*, tracking_uri: str, name: str, version: str | None,
                    gates: Iterable[MetricGate | Mapping[str, Any]], alias: str = "champion",
                    lock_wait_s: float = LOCK_WAIT_S) -> dict[str, Any]:
    """Move ``alias`` to ``version`` (default: the newest) when every gate passes; raise :class:`GateFailed`
    naming the failing gates, or a :class:`PrunecompError` for a version that must not be promoted, leaving the
    registry untouched. Promoting the current champion again is a no-op. See the module docstring for what is
    refused and how concurrent promotions are serialized."""
    from mlflow.exceptions import MlflowException

    from tasks.mlflow_model import check_version_files

    checked = _gates(gates)
    c = client(tracking_uri)
    try:
        versions = c.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        raise PrunecompError(redact(f"cannot read registered model {name!r}: {exc}")) from exc
    if not versions:
        raise PrunecompError(f"registered model {name!r} has no versions (run the compress flow first)")
    if version is None:
        version = str(max(int(v.version) for v in versions))
    elif version not in {str(v.version) for v in versions}:
        raise PrunecompError(f"registered model {name!r} has no version {version}")

    def unchanged() -> dict[str, Any]:
        return {"name": name, "version": version, "alias": alias, "changed": False, "previous": version,
                "decision": Decision(passed=True, results=[]).model_dump()}

    if _alias_version(c, name, alias) == version:
        return unchanged()
    mv = c.get_model_version(name, version)
    problem = check_version_files(str(mv.source), mv.tags.get("checkpoint_hash"))
    if problem is not None:  # the alias only ever points at a finished, whole checkpoint matching the version
        raise PrunecompError(redact(
            f"version {version} of {name!r} is not a loadable MLflow Model ({problem}); not promoted to {alias!r} "
            "and the registry is unchanged: run the compress run that registered it again (its final model is "
            "written again), or promote another version"))
    candidate = version_metrics(c, name, version)
    with promotion_lock(c, name, wait_s=lock_wait_s):
        for _ in range(5):
            current = _alias_version(c, name, alias)
            if current == version:
                return unchanged()
            champion, incomparable = None, None
            if current is not None:
                champion = version_metrics(c, name, current)
                incomparable = _incomparable(mv.tags, c.get_model_version(name, current).tags, current)
            decision = decide(checked, candidate, champion, incomparable=incomparable)
            if not decision.passed:
                raise GateFailed(decision, f"{name}/{version}")
            if _alias_version(c, name, alias) != current:  # moved since it was read: decide again against it
                continue
            c.set_registered_model_alias(name, alias, version)
            c.set_model_version_tag(name, version, f"gates.{alias}",
                                    json.dumps([r.model_dump() for r in decision.results]))
            return {"name": name, "version": version, "alias": alias, "changed": True, "previous": current,
                    "decision": decision.model_dump()}
    raise PrunecompError(f"the {alias!r} alias of {name!r} kept moving while this promotion decided (a promoter "
                         "that does not take the lock?); this one changed nothing, run it again")


def _task() -> Any:
    """The Prefect task wrapper (never cached: the alias move is idempotent by itself)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(name="mlflow-promote", cache_policy=NO_CACHE)(promote_version)


promote_task = _task()
