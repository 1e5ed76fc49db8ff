"""Subprocess of the kill-and-resume tests: runs the compress flow and stalls at a chosen point, announcing the
stall in a file so the test can SIGKILL this process right there.

Usage: python resume_driver.py CONFIG_JSON SIGNAL_FILE WHERE
WHERE is ``step:N`` (inside step N's task, with the working copy checked out at its parent state), ``refine:N``
(inside the N-th refinement task, counted from 0, after its step's part was written), ``final``
(inside the final model's atomic write, after the weights were written to the temporary folder) or ``none``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import prunecomp.recipes.checkpoint as checkpoint
import tasks.prune as prune_task
import tasks.refine as refine_task
from flows.compress import compress
from flows.params import CompressConfig


def main() -> None:
    config_path, signal_path, where = sys.argv[1], Path(sys.argv[2]), sys.argv[3]

    def stall(what: str) -> None:
        signal_path.write_text(what)
        time.sleep(600)

    if where.startswith("step:"):
        stall_step = int(where.split(":")[1])
        real_step = prune_task.prune_step

        def stalled_step(*args: Any, step: int, **kwargs: Any) -> Any:
            if step == stall_step:
                stall(where)
            return real_step(*args, step=step, **kwargs)

        prune_task.prune_step = stalled_step
    elif where.startswith("refine:"):
        stall_fit, calls = int(where.split(":")[1]), [0]
        real_refine = refine_task.refine

        def stalled_refine(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] - 1 == stall_fit:
                stall(where)
            return real_refine(*args, **kwargs)

        refine_task.refine = stalled_refine
    elif where == "final":
        real_write = checkpoint.write_dir

        def stalled_write(uri: str, fill: Any, **kwargs: Any) -> Any:
            def fill_then_stall(tmp: Path) -> None:
                fill(tmp)
                stall(where)

            return real_write(uri, fill_then_stall, **kwargs)

        checkpoint.write_dir = stalled_write
    elif where != "none":
        raise SystemExit(f"unknown stall point {where!r}")
    compress(config=CompressConfig.model_validate_json(Path(config_path).read_text()))


if __name__ == "__main__":
    main()
