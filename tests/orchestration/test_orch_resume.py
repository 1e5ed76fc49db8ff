"""Kill the compress flow for real (SIGKILL, mid-step, in a subprocess) and run it again: finished steps come
from the cache, the interrupted one is recomputed, and the result is identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

pytestmark = pytest.mark.orchestration

ROOT = Path(__file__).resolve().parents[2]


def _complete(store: Path) -> int:
    return len(list((store / "checkpoints").glob("*/_COMPLETE")))


def test_kill_mid_step_then_resume(harness, tracking_uri, make_config, tmp_path: Path) -> None:
    from flows.cli import main
    from flows.compress import compress

    store = tmp_path / "store"
    cfg = make_config(str(store), tracking_uri, prune={"n_layers": 3}, tracking={"log_and_register": False})
    (tmp_path / "config.json").write_text(cfg.model_dump_json())
    stalled, log = tmp_path / "stalled", tmp_path / "driver.log"
    env = os.environ | harness | {"PYTHONPATH": str(ROOT)}  # join the harness's API and result storage
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "orchestration" / "resume_driver.py"),
                                 str(tmp_path / "config.json"), str(stalled), "1"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not stalled.exists():
                assert proc.poll() is None, f"driver exited early:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"step 2 never started:\n{log.read_text()[-3000:]}"
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _complete(store) == 1  # step 1 finished, step 2 was killed mid-scoring

    status = CliRunner().invoke(main, ["status", cfg.run_id(), "--store", str(store)])
    assert status.exit_code == 0, status.output
    assert "running" in status.output and "yes" in status.output and "prunecomp resume" in status.output

    resumed = compress(config=cfg)
    assert (resumed["steps_reused"], resumed["steps_computed"]) == (1, 2)
    reference = compress(config=make_config(str(tmp_path / "reference"), tracking_uri, prune={"n_layers": 3},
                                            tracking={"log_and_register": False}))
    assert reference["steps_computed"] == 3
    assert resumed["removed"] == reference["removed"]
    assert resumed["final"]["hash"] == reference["final"]["hash"]
    a = load_file(Path(resumed["final"]["uri"]) / "model.safetensors")
    b = load_file(Path(reference["final"]["uri"]) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_rejects_bad_options_before_work(tmp_path: Path) -> None:
    from flows.cli import main

    result = CliRunner().invoke(main, ["run", "--layers", "0", "--store", str(tmp_path / "s")])
    assert result.exit_code == 2 and "n_layers" in result.output
    result = CliRunner().invoke(main, ["resume", "no-such-run", "--store", str(tmp_path / "s")])
    assert result.exit_code == 2 and "no run 'no-such-run'" in result.output
    assert not (tmp_path / "s").exists()
