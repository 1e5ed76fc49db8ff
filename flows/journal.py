"""A run's journal, ``<store>/runs/<run_id>/run.json``: what the run has done so far, written (redacted) when it
starts, after every kept step and when it completes; ``prunecomp status`` and ``resume`` read it."""

from __future__ import annotations

from typing import Any

from prunecomp.models.storage import write_json
from tasks.settings import Locations, redact_all

__all__ = ["Journal", "journal_uri"]


def journal_uri(loc: Locations, run_id: str) -> str:
    """``<store>/runs/<run_id>/run.json``: what a run has done so far (read by ``prunecomp status``)."""
    return loc.child("runs", run_id, "run.json")


class Journal:
    """The journal of one run; every write is atomic and carries no credentials."""

    def __init__(self, loc: Locations, run_id: str, config: dict[str, Any], code: str) -> None:
        self.uri = journal_uri(loc, run_id)
        self.doc: dict[str, Any] = {"run_id": run_id, "status": "running", "config": config, "store": loc.store,
                                    "code_version": code, "steps": []}
        self._write()

    def steps(self, steps: list[dict[str, Any]]) -> None:
        """The steps done so far (after each kept step: a resumed run reads where it stands)."""
        self.doc["steps"] = steps
        self._write()

    def complete(self, steps: list[dict[str, Any]], *, final: dict[str, Any], mlflow: dict[str, Any] | None,
                 stop_reason: str) -> None:
        self.doc.update(status="completed", steps=steps, final=final, mlflow=mlflow, stop_reason=stop_reason)
        self._write()

    def _write(self) -> None:
        write_json(self.uri, redact_all(self.doc))
