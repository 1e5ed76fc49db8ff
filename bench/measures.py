"""The one definition of the words the result tables use, shared by every bench script and the results document
(docs/EVALUATION.md), and what every results file records about the run (the commit, the machine's load): a
module of its own so that no script imports another to get it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["commit", "machine_load", "recovered", "stamp"]


def machine_load() -> dict[str, object]:
    """The load average and the processes using CPU besides this one (a ratio is only as good as the quiet)."""
    busy = subprocess.run(["ps", "-eo", "pcpu=,comm="], capture_output=True, text=True).stdout.splitlines()
    others = [line.strip() for line in busy if line.strip() and float(line.split()[0]) >= 5.0]
    return {"loadavg": os.getloadavg(), "busy_processes": others}


def commit(tree: Path) -> str:
    """The checkout's commit, ``+dirty`` when it has uncommitted changes to tracked files."""
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head + ("+dirty" if dirty else "")


def recovered(x: float, naive: float, dense: float) -> float:
    """Share (%) of the naive removal's perplexity degradation that a result ``x`` recovers:
    ``100 * (naive - x) / (naive - dense)``. 100% = back to the dense model, 0% = no better than naive, negative =
    worse than naive (naive: ``--compensation none`` with the same metric and mode)."""
    return 100.0 * (naive - x) / (naive - dense)


def stamp(tree: Path, load_before: dict[str, object]) -> dict[str, object]:
    """What a results file records about its run: the commit and the load before (``load_before``, taken when the
    run started) and after."""
    return {"commit": commit(tree), "load_before": load_before, "load_after": machine_load()}
