"""Subprocess of the kill-and-resume test: runs the compress flow with step ``N`` stalled mid-scoring (after its
first calibration batch), and announces the stall in a file so the test can SIGKILL this process right there.

Usage: python resume_driver.py CONFIG_JSON SIGNAL_FILE N
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import tasks.prune as prune_task
from flows.compress import compress
from flows.params import CompressConfig


def main() -> None:
    config_path, signal_path, stall_step = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    real = prune_task.prune_step

    def stalled(*args: Any, step: int, **kwargs: Any) -> Any:
        if step != stall_step:
            return real(*args, step=step, **kwargs)

        def stall() -> None:
            signal_path.write_text(str(step))
            time.sleep(600)

        return real(*args, step=step, **(kwargs | {"on_batch": stall}))

    prune_task.prune_step = stalled
    compress(config=CompressConfig.model_validate_json(Path(config_path).read_text()))


if __name__ == "__main__":
    main()
