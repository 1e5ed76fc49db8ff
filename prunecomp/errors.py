"""One exception type for every user-facing failure.

The CLI turns a :class:`PrunecompError` into one line on stderr and a non-zero exit; anything else is a bug and
keeps its traceback. Messages name the offending argument and what was expected.
"""

from __future__ import annotations

__all__ = ["PrunecompError"]


class PrunecompError(ValueError):
    """Bad input or an environment problem the user can fix (never a bug in prunecomp)."""
