"""One exception type for every user-facing failure.

The CLI turns a :class:`PrunecompError` into one line on stderr and a non-zero exit; anything else is a bug and
keeps its traceback. Messages name the offending argument and what was expected.
"""

from __future__ import annotations

__all__ = ["EvaluationError", "PrunecompError"]


class PrunecompError(ValueError):
    """Bad input or an environment problem the user can fix (never a bug in prunecomp)."""


class EvaluationError(PrunecompError):
    """A bad evaluation request (unknown task, bad limit, missing or corrupt data file), with what was expected.

    A :class:`PrunecompError` (hence still a ``ValueError``) so the CLI reports it as one ``error: ...`` line with
    exit code 2 instead of a traceback.
    """
