"""Task logic without a Prefect server (``task.fn()``), cache keys, gates and parameter models."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from prunecomp.config import CalibrationConfig, PruneConfig
from prunecomp.storage import is_complete
from tasks.gates import DEFAULT_GATES, MetricGate, decide
from tasks.jobs import CalibrationJob, StepJob

pytestmark = pytest.mark.orchestration


def _step(**kw: object) -> StepJob:
    base = dict(store="/s", parent_uri="/s/a", parent_hash="p" * 64, calibration_uri="/s/c", calibration_digest="d",
                prune=PruneConfig(n_layers=2), step=0, batch_size=4, code="v1")
    return StepJob(**(base | kw))


def test_step_key_covers_what_determines_the_result() -> None:
    ref = _step()
    assert _step(parent_uri="/elsewhere").key == ref.key  # where the parent lies is not what it is
    assert _step(calibration_uri="/other").key == ref.key
    for change in ({"parent_hash": "q" * 64}, {"calibration_digest": "e"}, {"step": 1}, {"batch_size": 2},
                   {"code": "v2"}, {"store": "s3://b/p"}, {"prune": PruneConfig(n_layers=2, metric="angular")},
                   {"prune": PruneConfig(n_layers=2, compensation="none")}):
        assert _step(**change).key != ref.key, change
    assert ref.uri == f"/s/checkpoints/{ref.key}"


def test_calibration_key_ignores_batch_size_only() -> None:
    def job(**kw: object) -> CalibrationJob:
        return CalibrationJob(store="/s", model_uri="/m", model_hash="h", data_dir=None, code="v",
                              calibration=CalibrationConfig(**({"source": "tinystories"} | kw)))

    assert job(batch_size=1).key == job(batch_size=8).key
    assert len({job().key, job(n_samples=4).key, job(seq_len=64).key, job(seed=1).key, job(source="c4").key}) == 5


def test_gates_name_what_failed() -> None:
    champion = {"ppl_mean_pruned": 10.0, "ppl_ratio_mean": 1.5}
    better = decide(DEFAULT_GATES, {"ppl_mean_pruned": 9.0, "ppl_ratio_mean": 1.4}, champion)
    assert better.passed
    assert [r.name for r in better.results if "skipped" in r.detail] == ["min_qa_retained"]
    tie = decide(DEFAULT_GATES, {"ppl_mean_pruned": 10.0, "ppl_ratio_mean": 1.5}, champion)
    assert tie.failed == ["beat_champion"]  # a tie does not move the champion
    bad = decide(DEFAULT_GATES, {"ppl_mean_pruned": 50.0, "ppl_ratio_mean": 7.0, "qa_retained": 0.5}, None)
    assert bad.failed == ["max_ppl_increase", "min_qa_retained"]
    assert decide([MetricGate(name="need_qa", metric="qa_retained", threshold=0.9,
                              direction="higher_is_better")], {}, None).failed == ["need_qa"]
    with pytest.raises(ValidationError, match="exactly one"):
        MetricGate(name="both", metric="x", threshold=1.0, vs_champion=True)


def test_compress_parameters_are_validated(make_config, tmp_path: Path) -> None:
    cfg = make_config(str(tmp_path), "sqlite:///x.db")
    assert cfg.run_id().startswith("stories260k-bi-k2-") and cfg.model_name() == "prunecomp-stories260k"
    assert make_config(str(tmp_path), "sqlite:///x.db").run_id() == cfg.run_id()  # same parameters, same run
    assert make_config(str(tmp_path), "sqlite:///x.db", prune={"metric": "angular"}).run_id() != cfg.run_id()
    for bad, match in (({"prune": {"metric": "nope"}}, "metric"), ({"prune": {"mode": "one-shot"}}, "iterative"),
                       ({"prune": {"n_layers": None}}, "how many"), ({"typo": 1}, "typo"),
                       ({"max_ppl_ratio": 0.5}, "max_ppl_ratio"), ({"quick_eval": None, "max_ppl_ratio": 2.0},
                                                                   "quick_eval")):
        with pytest.raises(ValidationError, match=match):
            make_config(str(tmp_path), "sqlite:///x.db", **bad)


def test_tasks_via_fn_write_reusable_checkpoints(make_config, tmp_path: Path) -> None:
    """materialize -> calibrate -> one step through ``.fn()``; a second call reuses the artifact, and the
    checkpoint reloads to exactly the recorded tensors."""
    from tasks.calibrate import build_calibration, load_windows
    from tasks.jobs import ModelJob
    from tasks.keys import model_state_hash
    from tasks.model_io import load_checkpoint, materialize_model, resolve_model
    from tasks.prune import prune_one_step

    cfg = make_config(str(tmp_path), "sqlite:///x.db")
    src = resolve_model.fn(cfg.model)
    base = materialize_model.fn(ModelJob(store=str(tmp_path), source_uri=cfg.model, source_hash=src["content_hash"]))
    assert base["num_layers"] == 5 and is_complete(base["uri"])
    cal = build_calibration.fn(CalibrationJob(store=str(tmp_path), model_uri=base["uri"], model_hash=base["hash"],
                                              calibration=cfg.calibration, data_dir=cfg.data_dir))
    assert load_windows(cal["uri"], cal["digest"]).ids.shape == (8, 128)
    job = StepJob(store=str(tmp_path), parent_uri=base["uri"], parent_hash=base["hash"], calibration_uri=cal["uri"],
                  calibration_digest=cal["digest"], prune=cfg.prune, step=0, batch_size=8)
    meta = prune_one_step.fn(job)
    assert meta["record"]["chosen"] == 2 and meta["record"]["layers_after"] == 4
    assert prune_one_step.fn(job) == meta  # idempotent: read back, not recomputed
    assert model_state_hash(load_checkpoint(meta["uri"]).model) == meta["hash"]
    with pytest.raises(Exception, match="changed since it was recorded"):
        prune_one_step.fn(job.model_copy(update={"parent_hash": "0" * 64}))
