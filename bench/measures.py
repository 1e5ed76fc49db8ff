"""The one definition of the words the result tables use, shared by every bench script and the results document
(docs/EVALUATION.md): a module of its own so that no script imports another to get it."""

from __future__ import annotations

__all__ = ["recovered"]


def recovered(x: float, naive: float, dense: float) -> float:
    """Share (%) of the naive removal's perplexity degradation that a result ``x`` recovers:
    ``100 * (naive - x) / (naive - dense)``. 100% = back to the dense model, 0% = no better than naive, negative =
    worse than naive (naive: ``--compensation none`` with the same metric and mode)."""
    return 100.0 * (naive - x) / (naive - dense)
