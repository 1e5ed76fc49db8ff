"""Kill the compress flow for real (SIGKILL in a subprocess: mid-step, and mid-way through the final model's
write) and run it again: finished steps come from the cache, at most the interrupted one is recomputed (after one
load of the source and a replay of the finished steps), and the result is identical to an uninterrupted run."""

from __future__ import annotations

import json
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


def _complete(store: Path, kind: str = "steps") -> int:
    return len(list((store / kind).glob("*/_COMPLETE")))


def _run_and_kill(harness: dict[str, str], cfg: object, tmp_path: Path, where: str) -> None:
    """Run the flow in a subprocess until it stalls at ``where``, then SIGKILL its whole process group."""
    (tmp_path / "config.json").write_text(cfg.model_dump_json())  # type: ignore[attr-defined]
    stalled, log = tmp_path / "stalled", tmp_path / "driver.log"
    # join the harness's API and result storage; as a worker would, without the CLI's quiet environment
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "TRANSFORMERS_VERBOSITY")} | harness \
        | {"PYTHONPATH": str(ROOT)}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "orchestration" / "resume_driver.py"),
                                 str(tmp_path / "config.json"), str(stalled), where], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not stalled.exists():
                assert proc.poll() is None, f"driver exited early:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"{where} never reached:\n{log.read_text()[-3000:]}"
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    text = log.read_text()
    assert "Loading weights" not in text and "it/s]" not in text, text[-2000:]  # a worker's log stays readable


def _same_final(a: dict, b: dict, *, exact: bool = True) -> None:
    assert a["removed"] == b["removed"]
    x = load_file(Path(a["final"]["uri"]) / "model.safetensors")
    y = load_file(Path(b["final"]["uri"]) / "model.safetensors")
    assert x.keys() == y.keys()
    if exact:
        assert a["final"]["hash"] == b["final"]["hash"] and all(torch.equal(x[k], y[k]) for k in x)
    else:
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scoring", ["exact", "incremental"])
def test_kill_mid_step_then_resume(scoring: str, harness, tracking_uri, make_config, tmp_path: Path) -> None:
    """Exact scoring resumes bit for bit. Incremental scoring (the default) carries the scanner's cached layer
    boundaries from step to step in an uninterrupted run; a resumed run re-scores the interrupted step from a
    fresh scan, which equals the carried-over one up to float rounding: same layers, tensors within 1e-5."""
    from flows.cli import main
    from flows.compress import compress
    from tasks import working

    store = tmp_path / "store"
    prune = {"n_layers": 3, "scoring": scoring}
    cfg = make_config(str(store), tracking_uri, prune=prune, tracking={"log_and_register": False})
    _run_and_kill(harness, cfg, tmp_path, "step:1")
    assert _complete(store) == 1  # step 1 finished, step 2 was killed inside its task
    killed = json.loads((store / "runs" / cfg.run_id() / "lock.json").read_text())["flow_run_id"]

    status = CliRunner().invoke(main, ["status", cfg.run_id(), "--store", str(store)])
    assert status.exit_code == 0, status.output
    assert "running" in status.output and "yes" in status.output and "prunecomp resume" in status.output

    working.drop()  # this test process plays the fresh process of a resumed run
    before = working.stats()
    resumed = compress(config=cfg)
    assert (resumed["steps_reused"], resumed["steps_computed"]) == (1, 2)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # the killed run no longer shows as RUNNING forever
        assert client.read_flow_run(killed).state.type.value == "CRASHED"
    after = working.stats()  # one load of the source, one replayed step, then the working copy carried on
    assert (after["loads"] - before["loads"], after["replayed_steps"] - before["replayed_steps"]) == (1, 1)
    reference = compress(config=make_config(str(tmp_path / "reference"), tracking_uri, prune=prune,
                                            tracking={"log_and_register": False}))
    assert reference["steps_computed"] == 3
    _same_final(resumed, reference, exact=scoring == "exact")


def test_progressive_run_killed_between_a_step_and_its_refinement(harness, tracking_uri, make_config,
                                                                   tmp_path: Path) -> None:
    """refine_at=each: killed inside the fit that follows step 1 (its step part written, its gains not). The
    rerun reuses the teacher and step 1, refits after it (one load of the source, one replayed step), goes on, and
    writes exactly what an uninterrupted run writes."""
    from flows.compress import compress
    from tasks import working

    store = tmp_path / "store"
    prune = {"n_layers": 2, "refine": "norms+writers", "refine_at": "each", "refine_steps": 4, "refine_lr": 2e-2}
    cfg = make_config(str(store), tracking_uri, prune=prune, tracking={"log_and_register": False})
    _run_and_kill(harness, cfg, tmp_path, "refine:0")
    assert (_complete(store), _complete(store, "refined"), _complete(store, "teacher")) == (1, 0, 1)
    working.drop()
    before = working.stats()
    resumed = compress(config=cfg)
    after = working.stats()
    assert (resumed["steps_reused"], resumed["steps_computed"]) == (1, 1)
    assert [s["refine"]["reused"] for s in resumed["steps"]] == [False, False]
    assert (after["loads"] - before["loads"], after["replayed_steps"] - before["replayed_steps"]) == (1, 1)
    assert _complete(store, "refined") == 2
    reference = compress(config=make_config(str(tmp_path / "reference"), tracking_uri, prune=prune,
                                            tracking={"log_and_register": False}))
    _same_final(resumed, reference)
    assert resumed["final"]["hash"] == resumed["steps"][-1]["refine"]["digest"]


def test_kill_during_final_write_then_resume(harness, tracking_uri, make_config, tmp_path: Path) -> None:
    """Killed inside the final model's atomic write: nothing half-written is taken for a result, every step is
    reused, and the rerun writes the same tensors as an uninterrupted run."""
    from flows.compress import compress
    from tasks import working

    store = tmp_path / "store"
    cfg = make_config(str(store), tracking_uri, prune={"n_layers": 2}, tracking={"log_and_register": False})
    _run_and_kill(harness, cfg, tmp_path, "final")
    assert _complete(store) == 2 and _complete(store, "final") == 0
    left = list((store / "final").glob(".*.tmp-*"))
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file()  # the killed writer's temp folder
    working.drop()
    resumed = compress(config=cfg)
    assert (resumed["steps_reused"], resumed["steps_computed"]) == (2, 0)
    assert Path(resumed["final"]["uri"], "_COMPLETE").is_file()
    assert not list((store / "final").glob(".*"))  # its temp folder was cleaned up, not left forever
    reference = compress(config=make_config(str(tmp_path / "reference"), tracking_uri, prune={"n_layers": 2},
                                            tracking={"log_and_register": False}))
    _same_final(resumed, reference)


def test_cli_rejects_bad_options_before_work(tmp_path: Path) -> None:
    from flows.cli import main

    result = CliRunner().invoke(main, ["run", "--layers", "0", "--store", str(tmp_path / "s")])
    assert result.exit_code == 2 and "n_layers" in result.output
    result = CliRunner().invoke(main, ["resume", "no-such-run", "--store", str(tmp_path / "s")])
    assert result.exit_code == 2 and "no run 'no-such-run'" in result.output
    assert not (tmp_path / "s").exists()


def test_a_second_run_of_the_same_parameters_waits_its_turn(harness, tracking_uri, make_config,
                                                            tmp_path: Path) -> None:
    """Two real processes, same parameters, same store: the second fails at once naming the first, which is not
    disturbed; once the first is gone (SIGKILL), the next run takes the stale lock over and finishes."""
    from flows.compress import compress

    store = tmp_path / "store"
    cfg = make_config(str(store), tracking_uri, prune={"n_layers": 2}, tracking={"log_and_register": False})
    (tmp_path / "config.json").write_text(cfg.model_dump_json())
    stalled, log = tmp_path / "stalled", tmp_path / "first.log"
    env = os.environ | harness | {"PYTHONPATH": str(ROOT)}
    driver = str(ROOT / "tests" / "orchestration" / "resume_driver.py")
    with log.open("w") as out:
        first = subprocess.Popen([sys.executable, driver, str(tmp_path / "config.json"), str(stalled), "step:0"],
                                 cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not stalled.exists():
                assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            second = subprocess.run([sys.executable, driver, str(tmp_path / "config.json"), str(tmp_path / "x"),
                                     "none"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert second.returncode != 0
            assert "is already running" in second.stdout + second.stderr and f"pid {first.pid}" in (
                second.stdout + second.stderr)
            assert first.poll() is None  # the first run was not disturbed
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    lock = store / "runs" / cfg.run_id() / "lock.json"
    assert lock.is_file()  # a SIGKILLed run cannot release it...
    done = compress(config=cfg)  # ...but its process is gone: the lock is taken over
    assert done["removed"] and not lock.exists()


def test_full_disk_under_the_store_then_rerun(harness, tracking_uri, make_config, tmp_path: Path) -> None:
    """The store on a real filesystem too small for the final model: the run fails with the one clear error,
    keeps every finished step, and once there is space the rerun reuses them and writes what an uninterrupted
    run writes."""
    from flows.compress import compress
    from prunecomp.errors import PrunecompError
    from tasks import working
    from tests.small_disk import grow, small_filesystem

    with small_filesystem(tmp_path / "small-store", "400k") as mnt:
        try:
            cfg = make_config(str(mnt / "store"), tracking_uri, prune={"n_layers": 2},
                              tracking={"log_and_register": False})
            with pytest.raises(PrunecompError, match="no space left on the device"):
                compress(config=cfg)
            assert _complete(mnt / "store") == 2 and _complete(mnt / "store", "final") == 0
            assert not list((mnt / "store" / "final").glob(".*"))  # no half-written temp folder
            grow(mnt, "8m")
            working.drop()
            resumed = compress(config=cfg)
            assert (resumed["steps_reused"], resumed["steps_computed"]) == (2, 0)
            reference = compress(config=make_config(str(tmp_path / "reference"), tracking_uri,
                                                    prune={"n_layers": 2}, tracking={"log_and_register": False}))
            _same_final(resumed, reference)
        finally:
            working.drop()
