"""PPL-on-skip candidates fanned out over Prefect task runners: threads, and a local Dask cluster of 2 worker
processes. The decisions must equal the library's in-process loop, and the shares must really run elsewhere."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.orchestration


def _reference(stories: Path, n_layers: int) -> tuple[list[int], list[dict[int, float]]]:
    """The library loop, in this process, on the same calibration windows the flow builds."""
    from prunecomp.config import PruneConfig
    from prunecomp.corpora.calibration import calibration_windows
    from prunecomp.engine.loop import prune_and_compensate
    from prunecomp.models.sources import load_model

    lm = load_model(str(stories))
    cal = calibration_windows(lm.tokenizer, "tinystories", n_samples=8, seq_len=128,
                              data_dir=stories.parents[1] / "data")
    report = prune_and_compensate(copy.deepcopy(lm.model), cal, PruneConfig(metric="ppl", n_layers=n_layers),
                                  batch_size=8)
    return report.removed, [s.scores for s in report.steps]


@pytest.mark.parametrize("runner", ["threads", "dask"])
def test_candidates_fan_out_and_match_the_library(harness, tracking_uri, make_config, stories, tmp_path,
                                                  runner: str) -> None:
    from flows.compress import compress
    from flows.runners import task_runner

    cfg = make_config(str(tmp_path / "store"), tracking_uri, prune={"metric": "ppl", "n_layers": 2},
                      parallel_candidates=2, quick_eval=None, tracking={"log_and_register": False})
    summary = compress.with_options(task_runner=task_runner(runner, 2))(config=cfg)
    removed, scores = _reference(stories, 2)
    assert summary["removed"] == removed
    for step, ref in zip(summary["steps"], scores, strict=True):
        got = {int(k): v for k, v in step["record"]["scores"].items() if v is not None}
        assert got.keys() == {k for k, v in ref.items() if v != float("inf")}
        assert all(got[k] == pytest.approx(ref[k], rel=1e-4) for k in got)
        workers = step["candidate_workers"]
        assert len(workers) == (2 if runner == "dask" else 1)  # two processes vs the flow's own process
        pids = {int(w.rsplit(":", 1)[1]) for w in workers}
        assert (os.getpid() in pids) == (runner == "threads")
