"""Task logic without a Prefect server (``task.fn()``), cache keys, gates and parameter models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from prunecomp.config import CalibrationConfig, PruneConfig
from prunecomp.models.storage import is_complete
from tasks.gates import DEFAULT_GATES, MetricGate, decide
from tasks.jobs import CalibrationJob, RefineJob, StepJob

pytestmark = pytest.mark.orchestration


def _step(**kw: object) -> StepJob:
    base = dict(store="/s", base_uri="/m", base_hash="p" * 64, parts=("/s/steps/a",), state_digest="x" * 64,
                calibration_uri="/s/c", calibration_digest="d", prune=PruneConfig(n_layers=2), step=0, batch_size=4,
                code="v1")
    return StepJob(**(base | kw))


def test_step_key_covers_what_determines_the_result() -> None:
    ref = _step()
    # where the base and the parts lie is not what they are (the hash and the digest are)
    assert _step(base_uri="/elsewhere").key == ref.key
    assert _step(parts=("/other/steps/a",)).key == ref.key
    assert _step(calibration_uri="/other").key == ref.key
    assert _step(prune=PruneConfig(n_layers=2, refine="norms")).key == ref.key  # refinement is its own task
    assert _step(prune=PruneConfig(n_layers=2, refine="norms", refine_loss="topk")).key == ref.key
    assert _step(prune=PruneConfig(n_layers=2, refit="sequential", refit_steps=7)).key == ref.key  # so is the refit
    for change in ({"base_hash": "q" * 64}, {"state_digest": "y" * 64}, {"calibration_digest": "e"}, {"step": 1},
                   {"batch_size": 2}, {"stream": True}, {"code": "v2"}, {"store": "s3://b/p"},
                   {"prune": PruneConfig(n_layers=2, metric="angular")},
                   {"prune": PruneConfig(n_layers=2, compensation="none")}):
        assert _step(**change).key != ref.key, change
    assert ref.uri == f"/s/steps/{ref.key}"
    # the windows of a reconstruction's fit and of its keep-or-decline: by digest, not by where they lie
    for name in ("fit", "check"):
        given = _step(**{f"{name}_uri": "/s/w", f"{name}_digest": "e"})
        assert given.key != ref.key and _step(**{f"{name}_uri": "/t/w", f"{name}_digest": "e"}).key == given.key
        assert _step(**{f"{name}_uri": "/s/w", f"{name}_digest": "f"}).key != given.key


def test_refine_key_covers_the_loss() -> None:
    """The refinement loss changes the fitted gains, so it is in the refine task's key (a run with the default
    ``tail`` loss does not reuse a gains part fitted with the ``topk`` loss)."""
    def job(**kw: object) -> RefineJob:
        base = dict(store="/s", base_uri="/m", base_hash="p" * 64, parts=("/s/steps/a",), state_digest="x" * 64,
                    calibration_uri="/s/c", calibration_digest="d", teacher_uri="/s/t", mode="channels", steps=8,
                    lr=1e-3, batch=2, topk=16, batch_size=4, code="v1")
        return RefineJob(**(base | kw))

    assert job().loss == "tail"
    assert job(loss="topk").key != job().key
    assert job(teacher_uri="/other").key == job().key
    # the held-out windows that decide whether the gains are folded: by digest, not by where they lie
    checked = job(check_uri="/s/d", check_digest="e")
    assert checked.key != job().key and job(check_uri="/t/d", check_digest="e").key == checked.key
    assert job(check_uri="/s/d", check_digest="f").key != checked.key


def test_calibration_key_ignores_batch_size_only() -> None:
    def job(**kw: object) -> CalibrationJob:
        return CalibrationJob(store="/s", model_uri="/m", model_hash="h", data_dir=None, code="v",
                              calibration=CalibrationConfig(**({"source": "tinystories"} | kw)))

    decision = CalibrationJob(store="/s", model_uri="/m", model_hash="h", data_dir=None, code="v",
                              calibration=CalibrationConfig(source="tinystories"), windows="decision")
    assert decision.key != job().key  # the held-out decision windows are not the calibration windows

    assert job(batch_size=1).key == job(batch_size=8).key
    assert len({job().key, job(n_samples=4).key, job(seq_len=64).key, job(seed=1).key, job(source="c4").key}) == 5


def test_gates_name_what_failed() -> None:
    champion = {"ppl_mean_pruned": 10.0, "ppl_ratio_mean": 1.5}
    better = decide(DEFAULT_GATES, {"ppl_mean_pruned": 9.0, "ppl_ratio_mean": 1.4}, champion)
    assert better.passed
    assert [r.name for r in better.results if "skipped" in r.detail] == ["min_qa_retained", "folds_not_worse"]
    hurt = decide(DEFAULT_GATES, {"ppl_mean_pruned": 9.0, "ppl_ratio_mean": 1.4, "fold_loss_ratio": 1.02}, champion)
    assert hurt.failed == ["folds_not_worse"]  # the final check: the run's folds made held-out loss worse
    fine = decide(DEFAULT_GATES, {"ppl_mean_pruned": 9.0, "ppl_ratio_mean": 1.4, "fold_loss_ratio": 0.97}, champion)
    assert fine.passed
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
    assert cfg.run_id().startswith("stories260k-bi-k2-") and cfg.model_name() == "prunecomp-stories260k-adhoc"
    assert make_config(str(tmp_path), "sqlite:///x.db").run_id() == cfg.run_id()  # same parameters, same run
    assert make_config(str(tmp_path), "sqlite:///x.db", prune={"metric": "angular"}).run_id() != cfg.run_id()
    for bad, match in (({"prune": {"metric": "nope"}}, "metric"), ({"prune": {"mode": "one-shot"}}, "iterative"),
                       ({"prune": {"n_layers": None}}, "how many"), ({"typo": 1}, "typo"),
                       ({"max_ppl_ratio": 0.5}, "max_ppl_ratio"), ({"quick_eval": None, "max_ppl_ratio": 2.0},
                                                                   "quick_eval")):
        with pytest.raises(ValidationError, match=match):
            make_config(str(tmp_path), "sqlite:///x.db", **bad)


def test_tasks_via_fn_exchange_recipe_parts(make_config, tmp_path: Path) -> None:
    """resolve -> calibrate -> two steps -> final write through ``.fn()``: steps write kilobyte recipe parts,
    the second reuses the first's working copy, a fresh process state replays them bit-identically, and a second
    call reuses the artifact."""
    from safetensors.torch import load_file

    from prunecomp.config import PruneConfig as PC
    from prunecomp.engine.loop import prune_and_compensate
    from prunecomp.models.sources import load_model
    from prunecomp.recipes.recipe import Recipe
    from tasks import working
    from tasks.calibrate import build_calibration, load_windows
    from tasks.jobs import FinalJob
    from tasks.model_io import resolve_model, write_final
    from tasks.prune import prune_one_step

    cfg = make_config(str(tmp_path), "sqlite:///x.db")
    src = resolve_model.fn(cfg.model)
    assert src["safetensors"] and src["num_layers"] == 5 and src["architecture"] == "LlamaForCausalLM"
    cal = build_calibration.fn(CalibrationJob(store=str(tmp_path), model_uri=src["load_uri"],
                                              model_hash=src["content_hash"], calibration=cfg.calibration,
                                              data_dir=cfg.data_dir))
    windows = load_windows(cal["uri"], cal["digest"])
    assert windows.ids.shape == (8, 128)
    working.drop()
    before = working.stats()
    parts: list[str] = []
    digest = Recipe(source={"content_hash": src["content_hash"]}).digest()
    prune = PC(n_layers=2, metric="bi", compensation="lsq")
    for step in range(2):
        job = StepJob(store=str(tmp_path), base_uri=src["load_uri"], base_hash=src["content_hash"], parts=tuple(parts),
                      state_digest=digest, calibration_uri=cal["uri"], calibration_digest=cal["digest"], prune=prune,
                      step=step, batch_size=8)
        meta = prune_one_step.fn(job)
        assert is_complete(job.uri) and prune_one_step.fn(job) == meta  # idempotent: read back, not recomputed
        size = sum(f.stat().st_size for f in Path(job.uri).iterdir())
        assert size < 64 * 1024, size  # a recipe part, not a model
        parts, digest = [*parts, meta["uri"]], meta["digest"]
    after = working.stats()
    assert after["loads"] - before["loads"] == 1 and after["replayed_steps"] == before["replayed_steps"]

    ref = load_model(str(cfg.model)).model  # the library loop on the same windows
    report = prune_and_compensate(ref, windows, prune, batch_size=8)
    source = {"content_hash": src["content_hash"], "architecture": "LlamaForCausalLM", "num_layers": 5}
    working.drop()  # a fresh process: load once, replay both steps
    final = write_final.fn(FinalJob(store=str(tmp_path), base_uri=src["load_uri"], base_hash=src["content_hash"],
                                    parts=tuple(parts), state_digest=digest, source=source))
    assert working.stats()["replayed_steps"] - after["replayed_steps"] == 2
    got = load_file(Path(final["uri"]) / "model.safetensors")
    want = ref.state_dict()
    assert report.removed == final["removed"]
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert (Path(final["uri"]) / "recipe.json").is_file() and (Path(final["uri"]) / "recipe.safetensors").is_file()
    with pytest.raises(Exception, match="no longer make the recorded state"):
        prune_one_step.fn(job.model_copy(update={"state_digest": "0" * 64}))
    from prunecomp.config import EvalConfig
    from tasks.evaluate import evaluate_checkpoint
    from tasks.jobs import EvalJob

    with pytest.raises(Exception, match="not the 000000000000 this evaluation was keyed by"):
        evaluate_checkpoint.fn(EvalJob(store=str(tmp_path), checkpoint_uri=final["uri"], checkpoint_hash="0" * 64,
                                       evaluation=EvalConfig(datasets=("tinystories",), seq_len=64, max_windows=1),
                                       data_dir=cfg.data_dir))


def test_code_version_covers_what_computes_cached_results(tmp_path: Path) -> None:
    """Sources of prunecomp/ and tasks/, the shipped QA task YAMLs and the numeric libraries' versions all enter
    the code version; an edit to any of them changes it. The CLI package does not."""
    from tasks.keys import NUMERIC_LIBRARIES, code_files, library_versions, source_digest

    names = {name for name, _ in code_files()}
    assert {"prunecomp/engine/loop.py", "tasks/prune.py", "tasks/evaluate.py",
            "prunecomp/evaluation/tasks/piqa.yaml"} <= names
    assert not any(n.startswith("prunecomp/cli") for n in names) and "prunecomp/method/guard.py" in names
    assert set(library_versions()) == set(NUMERIC_LIBRARIES) and library_versions()["torch"].startswith("2.")
    a, b = tmp_path / "a.py", tmp_path / "b.yaml"
    a.write_text("x = 1\n")
    b.write_text("task: piqa\n")
    files, versions = [("a.py", a), ("b.yaml", b)], {"torch": "2.13.0"}
    ref = source_digest(files, versions)
    b.write_text("task: piqa\nnum_fewshot: 1\n")
    assert source_digest(files, versions) != ref
    b.write_text("task: piqa\n")
    assert source_digest(files, versions) == ref
    assert source_digest(files, {"torch": "2.14.0"}) != ref


def test_content_hash_covers_the_tokenizer(stories, tmp_path: Path) -> None:
    import shutil

    from prunecomp.models.sources import content_hash, resolve_source

    copy = tmp_path / "m"
    shutil.copytree(stories, copy)
    ref = content_hash(resolve_source(str(copy)))
    cfg = copy / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("}", ', "model_max_length": 7}', 1))
    assert content_hash(resolve_source(str(copy))) != ref


def test_resume_runs_in_the_store_its_journal_was_found_in(make_config, tmp_path: Path) -> None:
    """A run started with $PRUNECOMP_STORE has no store in its parameters; resuming it must stay in that store."""
    from flows.cli import resume_config

    cfg = make_config(None, "sqlite:///x.db")
    journal = {"config": cfg.model_dump(mode="json"), "store": str(tmp_path / "elsewhere")}
    assert resume_config(journal).tracking.store == str(tmp_path / "elsewhere")
    assert resume_config(journal).run_id() == cfg.run_id()  # the run id ignores where results are kept
    assert resume_config(journal, "sqlite:///y.db").tracking.tracking_uri == "sqlite:///y.db"
    explicit = make_config(str(tmp_path / "s"), "sqlite:///x.db")
    assert resume_config({"config": explicit.model_dump(mode="json"),
                          "store": "/other"}).tracking.store == str(tmp_path / "s")


def test_s3_run_lock_is_created_atomically_and_taken_over_when_dead(s3) -> None:
    """On S3 the lock is a conditional PUT: of two holders exactly one gets it, even when both saw no lock."""
    import json as _json
    import socket

    import s3fs

    from prunecomp.errors import PrunecompError
    from tasks.locks import _create_remote, machine, run_lock

    uri = "s3://prunecomp/locks-test/run/lock.json"
    assert _create_remote(uri, {"who": "first"}) and not _create_remote(uri, {"who": "second"})
    fs = s3fs.S3FileSystem()
    assert _json.loads(fs.cat(uri))["who"] == "first"
    fs.rm(uri)
    with run_lock(uri, "run") as held:
        with pytest.raises(PrunecompError, match="already running"), run_lock(uri, "run"):
            pass
        assert _json.loads(fs.cat(uri))["token"] == held.owner["token"]
    assert not fs.exists(uri)  # released
    dead = {"run_id": "run", **machine(), "pid": 2**22 + 12345, "started": 0, "heartbeat": 0, "token": "dead"}
    assert dead["host"] == socket.gethostname()  # a dead pid is probed only on the same host, boot and container
    fs.pipe(uri, _json.dumps(dead).encode())
    seen = []
    with run_lock(uri, "run", on_stale=lambda h, why: seen.append((h["token"], why))) as held:
        assert _json.loads(fs.cat(uri))["token"] == held.owner["token"] != "dead"
    assert seen and seen[0][0] == "dead" and "gone" in seen[0][1]


def test_recipe_part_with_layers_round_trips_through_s3(s3) -> None:
    """A part holding fitted layers is written to S3 one tensor at a time and read back lazily from one local copy
    per process (fetched to disk, not through memory), with the same tensors and digest."""
    from prunecomp.recipes.recipe import Recipe, RecipeStep
    from tasks import working
    from tasks.working import read_part, write_part

    layers = {"model.layers.1.mlp.up_proj.weight": torch.randn(6, 4),
              "model.layers.1.input_layernorm.weight": torch.randn(4).to(torch.bfloat16)}
    part = RecipeStep(removed=2, current=2, scale=1.25, layers=layers)
    uri = "s3://prunecomp/parts-test/steps/k1"
    write_part(uri, part, {"uri": uri})
    back = read_part(uri)
    assert isinstance(back, RecipeStep) and back.layers is not None and sorted(back.layers) == sorted(layers)
    for name, t in layers.items():
        assert back.layers[name].dtype == t.dtype and torch.equal(back.layers[name], t)
    source = {"content_hash": "h"}
    assert Recipe(source=source, steps=(back,)).digest() == Recipe(source=source, steps=(part,)).digest()
    local = working._FETCHED[f"{uri}/tensors.safetensors"]
    assert local.is_file()
    read_part(uri)
    assert working._FETCHED[f"{uri}/tensors.safetensors"] == local  # fetched once
