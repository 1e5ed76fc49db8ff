"""Whole flows under the Prefect test harness, with MLflow on sqlite and S3 on a local moto server."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from prunecomp.errors import PrunecompError

pytestmark = pytest.mark.orchestration


def test_two_step_run_on_s3_end_to_end(harness, s3, tracking_uri, make_config, tmp_path: Path) -> None:
    """Checkpoints and MLflow artifacts on S3: model registered with lineage tags, alias set, artifacts there."""
    import s3fs

    from flows.compress import compress
    from flows.evaluate import evaluate
    from flows.params import EvaluateConfig, PromoteConfig
    from flows.promote import promote
    from tasks.tracking import client

    cfg = make_config("s3://prunecomp/store", tracking_uri, tracking={"registered_model": "stories-s3"})
    summary = compress(config=cfg)
    assert summary["removed"] == [2, 1] and summary["steps_computed"] == 2
    fs = s3fs.S3FileSystem()
    final = summary["final"]["uri"].removeprefix("s3://")
    assert fs.exists(f"{final}/model.safetensors") and fs.exists(f"{final}/_COMPLETE")
    assert fs.exists(f"prunecomp/store/runs/{summary['run_id']}/report.json")
    m = summary["mlflow"]
    c = client(tracking_uri)
    mv = c.get_model_version("stories-s3", m["version"])
    assert mv.tags["source_hash"] == summary["source"]["content_hash"]
    assert mv.tags["calibration_digest"] == summary["calibration"]["digest"]
    assert mv.tags["metric"] == "bi" and mv.tags["layers_removed"] == "[2, 1]"
    # guarded compensation and the final check, as a registry user reads them
    assert mv.tags["compensation"] == "guarded" and len(mv.tags["guard_decisions"].split(",")) == 2
    assert mv.tags["gains"] == "none" and mv.tags["reconstruct"] == "none"  # nothing fitted
    assert mv.tags["final_check"] == summary["final_check"]["verdict"] in ("better", "same")
    assert c.get_run(summary["mlflow"]["run_id"]).data.metrics["fold_loss_ratio"] == pytest.approx(
        summary["final_check"]["loss"] / summary["final_check"]["uncompensated_loss"])
    assert mv.tags["code_version"] == summary["code_version"] and mv.tags["checkpoint_hash"] == summary["final"]["hash"]
    # one copy of the weights: the version's source is the final model in the store, MLflow holds its recipe
    assert mv.source == summary["final"]["uri"] and fs.exists(f"{final}/recipe.json")
    from prunecomp.recipes.recipe import read_recipe

    recipe = read_recipe(summary["final"]["uri"])  # straight from S3
    assert recipe.removed == [2, 1] and recipe.digest() == summary["final"]["hash"]
    assert recipe.source["architecture"] == "LlamaForCausalLM" and recipe.source["num_layers"] == 5
    names = {f.path for f in c.list_artifacts(m["run_id"])}
    assert {"report.json", "summary.md", "plots", "recipe"} <= names and "model" not in names
    assert {f.path for f in c.list_artifacts(m["run_id"], "recipe")} == {"recipe/recipe.json"}
    weights = [p for p in fs.find("prunecomp/store") if p.endswith(".safetensors") and "/calibration/" not in p]
    assert weights == [f"{final}/model.safetensors"], weights
    plots = {f.path for f in c.list_artifacts(m["run_id"], "plots")}
    assert {"plots/layer_scores.png", "plots/gap_scales.png"} <= plots
    history = c.get_metric_history(m["run_id"], "step_removed_layer")
    assert [(h.step, h.value) for h in history] == [(1, 2.0), (2, 1.0)]
    assert str(c.get_model_version_by_alias("stories-s3", "candidate").version) == m["version"]
    _assert_prefect_artifacts(summary["run_id"], n_steps=2)

    result = promote(config=PromoteConfig(registered_model="stories-s3", tracking_uri=tracking_uri,
                                          gates=[{"name": "max_ppl_increase", "metric": "ppl_ratio_mean",
                                                  "threshold": 50.0}]))
    assert result["changed"]
    assert str(c.get_model_version_by_alias("stories-s3", "champion").version) == m["version"]
    again = promote(config=PromoteConfig(registered_model="stories-s3", tracking_uri=tracking_uri))
    assert not again["changed"]  # idempotent

    ev = evaluate(config=EvaluateConfig(checkpoint="models:/stories-s3@champion", data_dir=cfg.data_dir,
                                        evaluation=cfg.evaluation, tracking=cfg.tracking))
    assert ev["cached"] and ev["perplexity"] == {k: v["pruned"] for k, v in summary["perplexity"].items()}


def _assert_prefect_artifacts(run_id: str, n_steps: int) -> None:
    """One table artifact per step (every layer's score) and one markdown summary, under stable keys."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    keys = [f"{run_id}-step-{i}" for i in range(1, n_steps + 1)] + [f"{run_id}-summary"]
    with get_client(sync_client=True) as pc:
        found = {a.key: a for a in pc.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[*keys, f"{run_id}-progress"])))}
    progress = found.pop(f"{run_id}-progress")  # the run's progress, as the UI shows it: done at the end
    assert progress.type == "progress" and float(progress.data) == 100.0 and "registered version" in \
        progress.description
    assert set(found) == set(keys)
    assert found[keys[0]].type == "table" and "removed original layer **2**" in found[keys[0]].description
    assert found[keys[-1]].type == "markdown" and "| dataset | dense | pruned | ratio |" in found[keys[-1]].data


def test_quality_floor_stops_and_keeps_the_last_good_step(harness, tracking_uri, make_config, tmp_path) -> None:
    """Floor 3x: step 1 (~2x the dense quick perplexity) is kept; step 2 (~12x) crosses it and is dropped."""
    from flows.compress import compress

    cfg = make_config(str(tmp_path / "store"), tracking_uri, prune={"n_layers": 3}, max_ppl_ratio=3.0,
                      tracking={"log_and_register": False})
    summary = compress(config=cfg)
    assert summary["removed"] == [2] and [s["kept"] for s in summary["steps"]] == [True, False]
    assert summary["final"]["hash"] == summary["steps"][0]["digest"] and "quality floor" in summary["stop_reason"]


def test_cache_invalidation(harness, tracking_uri, make_config, tmp_path: Path) -> None:
    """Same parameters: everything reused. Other calibration or metric: the steps are recomputed. A deleted
    checkpoint is recomputed, not handed back as a dangling URI."""
    from flows.compress import compress

    store = str(tmp_path / "store")
    no_mlflow = {"log_and_register": False, "store": store, "tracking_uri": tracking_uri}
    base = make_config(store, tracking_uri, tracking=no_mlflow, prune={"n_layers": 1})
    first = compress(config=base)
    assert (first["steps_reused"], first["steps_computed"]) == (0, 1)
    same = compress(config=base)
    assert (same["steps_reused"], same["steps_computed"]) == (1, 0)
    assert same["final"] == first["final"]
    other_cal = compress(config=make_config(store, tracking_uri, tracking=no_mlflow, prune={"n_layers": 1},
                                            calibration={"seed": 1}))
    assert other_cal["steps_computed"] == 1 and other_cal["calibration"]["digest"] != first["calibration"]["digest"]
    other_metric = compress(config=make_config(store, tracking_uri, tracking=no_mlflow,
                                               prune={"n_layers": 1, "metric": "angular"}))
    assert other_metric["steps_computed"] == 1
    assert other_metric["calibration"]["digest"] == first["calibration"]["digest"]  # calibration still cached
    shutil.rmtree(first["final"]["uri"])  # the final model is rewritten from the recipe; no step is recomputed
    redo = compress(config=base)
    assert redo["steps_computed"] == 0 and Path(redo["final"]["uri"], "_COMPLETE").is_file()
    assert redo["final"]["hash"] == first["final"]["hash"]
    shutil.rmtree(first["steps"][0]["uri"])  # a deleted recipe part is recomputed, not a dangling URI
    redo = compress(config=base)
    assert redo["steps_computed"] == 1 and redo["final"]["hash"] == first["final"]["hash"]


def test_gate_failure_leaves_the_champion_alone(harness, tracking_uri, stories, tmp_path: Path) -> None:
    """Two versions, v1 champion; v2 is worse: the flow fails naming the gate, and the alias stays on v1."""
    from flows.params import PromoteConfig
    from flows.promote import promote
    from prunecomp.config import EvalConfig
    from tasks.gates import GateFailed
    from tasks.mlflow_model import write_mlflow_model
    from tasks.promotion import promote_version
    from tasks.tracking import client, eval_settings_tags

    model = tmp_path / "model"  # a complete, loadable MLflow Model (promotion checks that first)
    shutil.copytree(stories, model)
    write_mlflow_model(model, architecture="LlamaForCausalLM", tokenizer_class="LlamaTokenizer",
                       dtype="torch.float32", source_name=str(stories))
    (model / "prunecomp_report.json").write_text(json.dumps({"pipeline": {"hash": "gated-model"}}))
    (model / "_COMPLETE").write_text("")
    tags = {"checkpoint_hash": "gated-model", **eval_settings_tags(EvalConfig(), device="cpu", dtype="float32")}
    c = client(tracking_uri)
    exp = c.create_experiment(f"gates-{time.time_ns()}", artifact_location=f"file:///tmp/gates-{time.time_ns()}")
    c.create_registered_model("gated")
    for ppl in (10.0, 12.0):
        run = c.create_run(exp)
        c.log_metric(run.info.run_id, "ppl_mean_pruned", ppl)
        c.log_metric(run.info.run_id, "ppl_ratio_mean", ppl / 5)
        c.create_model_version("gated", source=str(model), run_id=run.info.run_id, tags=tags)
    assert promote_version(tracking_uri=tracking_uri, name="gated", version="1",
                           gates=[*PromoteConfig(registered_model="gated").gates])["changed"]
    with pytest.raises(GateFailed, match="beat_champion") as info:
        promote(config=PromoteConfig(registered_model="gated", tracking_uri=tracking_uri))
    assert info.value.decision.failed == ["beat_champion"]
    with pytest.raises(GateFailed, match="max_ppl_increase"):
        promote_version(tracking_uri=tracking_uri, name="gated", version="2",
                        gates=[{"name": "max_ppl_increase", "metric": "ppl_ratio_mean", "threshold": 2.0}])
    assert str(c.get_model_version_by_alias("gated", "champion").version) == "1"
    assert "gates.champion" not in c.get_model_version("gated", "2").tags


def test_bad_parameters_are_rejected_before_any_work(harness, make_config, tmp_path: Path) -> None:
    from prefect.exceptions import ParameterTypeError

    from flows.compress import compress

    store = tmp_path / "store"
    good = make_config(str(store), "sqlite:///unused.db").model_dump(mode="json")
    for bad in (good | {"prune": good["prune"] | {"metric": "nope"}}, good | {"typo": True},
                good | {"calibration": good["calibration"] | {"n_samples": 0}}):
        with pytest.raises(ParameterTypeError):
            compress(config=bad)
    assert not store.exists()  # nothing was written: the flow body never ran
    with pytest.raises(PrunecompError, match="between 1 and 4"):  # needs the model's depth: first thing checked
        compress(config=make_config(str(store), "sqlite:///unused.db", prune={"n_layers": 5}))
    with pytest.raises(PrunecompError, match=r"calibration\.seq_len 100000 is longer than the model's context"):
        compress(config=make_config(str(store), "sqlite:///unused.db", calibration={"seq_len": 100000}))
    assert not (store / "steps").exists() and not (store / "calibration").exists()


def test_unreachable_s3_is_a_clear_error_after_bounded_retries(harness, make_config, monkeypatch,
                                                              port_factory) -> None:
    from flows.compress import compress

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port_factory()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-print-this-secret")
    t = time.perf_counter()
    with pytest.raises(PrunecompError, match=r"not writable.*(Could not connect|EndpointConnectionError)") as info:
        compress(config=make_config("s3://prunecomp/nowhere", "sqlite:///unused.db"))
    assert time.perf_counter() - t < 20
    assert "never-print-this-secret" not in str(info.value)


def test_refined_run_reuses_the_plain_runs_steps(harness, tracking_uri, make_config, tmp_path: Path) -> None:
    """--refine adds one cached task after the last step: the pruning steps of the plain run are reused, the final
    checkpoint is the refined one, and its quick perplexity is lower than the last step's."""
    from flows.compress import compress

    store = str(tmp_path / "store")
    no_mlflow = {"log_and_register": False, "store": store, "tracking_uri": tracking_uri}
    plain = compress(config=make_config(store, tracking_uri, tracking=no_mlflow))
    cfg = make_config(store, tracking_uri, tracking=no_mlflow,
                      prune={"refine": "norms+writers", "refine_steps": 12, "refine_lr": 2e-2, "refine_samples": 12})
    refined = compress(config=cfg)
    assert (refined["steps_reused"], refined["steps_computed"]) == (2, 0)
    assert refined["removed"] == plain["removed"] and refined["refine"] is not None
    assert refined["final"]["hash"] == refined["refine"]["digest"] != plain["final"]["hash"]
    assert refined["final"]["uri"] != plain["final"]["uri"]
    assert Path(refined["final"]["uri"], "_COMPLETE").is_file()
    report = refined["refine"]["report"]
    assert report["loss_after"] < report["loss_before"]
    assert sum(refined["refine"]["ppl_after"].values()) < sum(refined["refine"]["ppl_before"].values())
    again = compress(config=cfg)
    assert again["refine"]["reused"] and again["final"]["hash"] == refined["final"]["hash"]


def _decision(store: str | None) -> object:
    """The held-out windows the run's gains were kept or declined on (a decision calibration artifact), if any."""
    from tasks.calibrate import load_windows

    found = [w for w in (load_windows(str(p.parent)) for p in Path(str(store), "calibration").glob("*/_COMPLETE"))
             if "held-out" in w.origin]
    assert len(found) <= 1
    return found[0] if found else None


def _same_as_the_library(run: dict, cfg, model: object) -> None:
    """The pipeline's final model equals the library's compress() on the run's calibration windows, bit for bit."""
    from prunecomp.engine.compress import compress as compress_in_memory
    from prunecomp.models.sources import load_model
    from tasks.calibrate import load_windows

    lm = load_model(str(model))
    windows = load_windows(run["calibration"]["uri"])
    report = compress_in_memory(lm.model, windows, cfg.prune, batch_size=cfg.calibration.batch_size,
                                check_windows=_decision(cfg.tracking.store))
    assert report.removed == run["removed"]
    final = load_model(run["final"]["uri"]).model.state_dict()
    mine = lm.model.state_dict()
    assert final.keys() == mine.keys() and all(torch.equal(final[k], mine[k]) for k in final)


def test_progressive_run_matches_the_library(harness, tracking_uri, make_config, tmp_path: Path) -> None:
    """refine_at=each through the pipeline: a cached teacher, a refine task after every step, the next step scored
    on the refined state; the final model equals the library's compress() bit for bit, its recipe is the
    progressive (v2) one, the final check undoes every fit, and a rerun reuses every task."""
    from flows.compress import compress
    from prunecomp.recipes.recipe import read_recipe

    store = str(tmp_path / "store")
    prune = {"n_layers": 2, "refine": "norms+writers", "refine_at": "each", "refine_steps": 5, "refine_lr": 2e-2}
    cfg = make_config(store, tracking_uri, prune=prune, tracking={"registered_model": "stories-progressive"})
    run = compress(config=cfg)
    assert run["refine"] is None and len(run["steps"]) == 2
    for s in run["steps"]:
        fit = s["refine"]
        assert fit["report"]["steps"] == 5 and fit["report"]["loss_after"] < fit["report"]["loss_before"]
        assert s["ppl_after"] == fit["ppl_after"]  # the state the next step starts from is the refined one
    assert run["final"]["hash"] == run["steps"][-1]["refine"]["digest"]
    assert run["final_check"]["folded"].endswith("refine")
    assert len(list(Path(store, "teacher").glob("*/_COMPLETE"))) == 1  # computed once for both fits
    recipe = read_recipe(run["final"]["uri"])
    assert recipe.progressive and recipe.removed == run["removed"]

    _same_as_the_library(run, cfg, make_config(store, tracking_uri).model)
    from tasks.artifacts import step_description, summary_markdown

    assert "refined: KL" in summary_markdown(run)
    assert "Then refined (norms+writers, 5 steps)" in step_description(run["steps"][0])
    from tasks.tracking import client

    c = client(tracking_uri)  # the registry says how the version was made; MLflow has each fit's KL per step
    mv = c.get_model_version("stories-progressive", run["mlflow"]["version"])
    assert mv.tags["method"] == "prune&comp-guarded+refine-norms+writers-each"
    assert mv.tags["gains"] == ",".join("kept" if s["refine"]["report"]["kept"] else "declined"
                                        for s in run["steps"])  # each fit's held-out decision
    history = c.get_metric_history(run["mlflow"]["run_id"], "step_refine_kl_after")
    assert [(h.step, h.value) for h in history] == [(i + 1, s["refine"]["report"]["loss_after"])
                                                     for i, s in enumerate(run["steps"])]
    _assert_prefect_artifacts(run["run_id"], n_steps=2)

    from click.testing import CliRunner

    from flows.cli import main

    status = CliRunner().invoke(main, ["status", run["run_id"], "--store", store], env={"COLUMNS": "200"})
    assert status.exit_code == 0 and status.output.count("its fit yes") == 2, status.output
    again = compress(config=cfg)
    assert (again["steps_reused"], again["steps_computed"]) == (2, 0)
    assert all(s["refine"]["reused"] for s in again["steps"]) and again["final"]["hash"] == run["final"]["hash"]


def test_progressive_lsq_run_matches_the_library(harness, tracking_uri, make_config, tmp_path: Path) -> None:
    """compensation=lsq with refine_at=each through the pipeline: each step part carries its gap map, each fit
    its gains; the final model equals the library's compress() bit for bit and the final check undoes maps and
    gains in fold order."""
    from flows.compress import compress
    from prunecomp.recipes.recipe import read_recipe

    store = str(tmp_path / "store")
    prune = {"n_layers": 2, "compensation": "lsq", "refine": "norms+writers", "refine_at": "each",
             "refine_steps": 3, "refine_lr": 2e-2}
    cfg = make_config(store, tracking_uri, prune=prune, tracking={"registered_model": "stories-progressive-lsq"})
    run = compress(config=cfg)
    recipe = read_recipe(run["final"]["uri"])
    assert recipe.progressive and any(s.gap_map is not None for s in recipe.steps)
    assert run["final_check"]["folded"] == "scales+maps+refine" and run["final_check"]["verdict"] == "better"
    _same_as_the_library(run, cfg, make_config(store, tracking_uri).model)


def test_reconstructed_run_matches_the_library(harness, tracking_uri, make_config, tmp_path: Path) -> None:
    """reconstruct through the pipeline, fitted on windows of its own (refine_samples) and refined at the end: each
    step part carries the fitted layers, the final model equals the library's compress() bit for bit, the final
    check swaps the base's weights back in, MLflow and the Prefect description say what was fitted, and the fit
    windows are in the step keys."""
    from flows.compress import compress
    from prunecomp.engine.compress import compress as compress_in_memory
    from prunecomp.models.sources import load_model
    from prunecomp.recipes.recipe import FORMAT_LAYERS, read_recipe
    from tasks.artifacts import step_description
    from tasks.calibrate import load_windows
    from tasks.tracking import client

    store = str(tmp_path / "store")
    prune = {"n_layers": 2, "reconstruct": "after", "reconstruct_steps": 4, "refine_samples": 6,
             "refine": "norms", "refine_steps": 3, "refine_lr": 2e-2}
    cfg = make_config(store, tracking_uri, prune=prune, tracking={"registered_model": "stories-reconstruct"})
    run = compress(config=cfg)
    for s in run["steps"]:
        rec = s["record"]["reconstruct"]
        assert rec["side"] == "after" and rec["windows"] == 6 and rec["loss_after"] < rec["loss_before"]
        assert rec["check_windows"] == cfg.calibration.held_out  # kept or declined on the decision windows
        assert "Reconstructed layer(s)" in step_description(s)
    recipe = read_recipe(run["final"]["uri"])
    assert all(st.layers for st in recipe.steps) and recipe.refine is not None
    assert f'"{FORMAT_LAYERS}"' in Path(run["final"]["uri"], "recipe.json").read_text()
    assert run["final_check"]["folded"] == "scales+reconstruct+refine"
    lm = load_model(str(make_config(store, tracking_uri).model))
    windows = load_windows(run["calibration"]["uri"])
    six = [w for w in (load_windows(str(p.parent)) for p in Path(store, "calibration").glob("*/_COMPLETE"))
           if w.n == 6]  # the fit windows the run built (refine_samples)
    assert len(six) == 1
    report = compress_in_memory(lm.model, windows, cfg.prune, batch_size=cfg.calibration.batch_size,
                                refine_windows=six[0], check_windows=_decision(store))
    assert report.removed == run["removed"]
    final = load_model(run["final"]["uri"]).model.state_dict()
    mine = lm.model.state_dict()
    assert final.keys() == mine.keys() and all(torch.equal(final[k], mine[k]) for k in final)
    mv = client(tracking_uri).get_model_version("stories-reconstruct", run["mlflow"]["version"])
    assert mv.tags["method"] == "prune&comp-guarded+reconstruct-after+refine-norms"
    assert mv.tags["reconstruct"] == ",".join("kept" if s["record"]["reconstruct"]["kept"] else "declined"
                                              for s in run["steps"])
    history = client(tracking_uri).get_metric_history(run["mlflow"]["run_id"], "step_reconstruct_error_after")
    assert [h.step for h in history] == [1, 2]
    held = client(tracking_uri).get_metric_history(run["mlflow"]["run_id"], "step_reconstruct_check_error_after")
    assert [h.value for h in held] == [s["record"]["reconstruct"]["check_loss_after"] for s in run["steps"]]
    # the fit windows are in the step keys: other fit windows, other steps
    other = make_config(store, tracking_uri, prune=prune | {"refine_samples": 5},
                        tracking={"log_and_register": False})
    again = compress(config=other)
    assert again["steps_computed"] == 2


def test_refitted_run_matches_the_library(harness, tracking_uri, make_config, tmp_path: Path, monkeypatch) -> None:
    """refit='sequential' through the pipeline: its own task after the last step (the dense streams read layer by
    layer from the base checkpoint), before the end refinement; the final model equals the library's compress()
    bit for bit, the recipe holds the refitted layers, the final check swaps the base's weights back in, MLflow
    says what was done (a recipe sidecar over the size limit is named, not copied), and a second run reuses every
    step and the refit."""
    import tasks.tracking
    from flows.compress import compress
    from prunecomp.engine.compress import compress as compress_in_memory
    from prunecomp.engine.streamed import StreamedModel
    from prunecomp.models.sources import load_model, resolve_source
    from prunecomp.recipes.recipe import read_recipe
    from tasks.calibrate import load_windows
    from tasks.tracking import client

    store = str(tmp_path / "store")
    prune = {"n_layers": 2, "refit": "sequential", "refit_steps": 3, "refine_samples": 6, "refine": "norms",
             "refine_steps": 2}
    cfg = make_config(store, tracking_uri, prune=prune, tracking={"registered_model": "stories-refit"})
    monkeypatch.setattr(tasks.tracking, "RECIPE_TENSORS_LIMIT", 1000)  # whole layers: far over it
    run = compress(config=cfg)
    refit = run["refit"]["report"]
    first = min(run["removed"])
    assert refit["layers"] == [o for o in range(5) if o > first and o not in run["removed"]] and refit["windows"] == 6
    assert run["refine"] is not None and run["recipe"]["parts"][-2] == run["refit"]["uri"]
    recipe = read_recipe(run["final"]["uri"])
    assert recipe.steps[-1].layers and recipe.refine is not None
    assert "reconstruct" in run["final_check"]["folded"]
    source = str(make_config(store, tracking_uri).model)
    lm = load_model(source)
    six = [w for w in (load_windows(str(p.parent)) for p in Path(store, "calibration").glob("*/_COMPLETE"))
           if w.n == 6]
    dense = StreamedModel(resolve_source(source).local_dir, device="cpu", dtype=torch.float32)
    report = compress_in_memory(lm.model, load_windows(run["calibration"]["uri"]), cfg.prune,
                                batch_size=cfg.calibration.batch_size, refine_windows=six[0], dense=dense,
                                check_windows=_decision(store))
    assert report.removed == run["removed"] and report.refit["layers"] == refit["layers"]  # type: ignore[index]
    final = load_model(run["final"]["uri"]).model.state_dict()
    mine = lm.model.state_dict()
    assert final.keys() == mine.keys() and all(torch.equal(final[k], mine[k]) for k in final)
    mv = client(tracking_uri).get_model_version("stories-refit", run["mlflow"]["version"])
    assert mv.tags["method"] == "prune&comp-guarded+refit-sequential+refine-norms"
    got = client(tracking_uri).get_run(run["mlflow"]["run_id"]).data.metrics
    assert got["refit_error_after"] <= got["refit_error_before"]
    logged = {f.path for f in client(tracking_uri).list_artifacts(run["mlflow"]["run_id"], "recipe")}
    assert logged == {"recipe/recipe.json", "recipe/recipe.safetensors.uri"}
    again = compress(config=cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
        update={"log_and_register": False})}))
    assert again["steps_computed"] == 0 and again["refit"]["reused"]
    assert again["final"]["hash"] == run["final"]["hash"]


def _same_weights(in_memory: str, streamed: str, *, rtol: float, atol: float) -> None:
    """The in-memory final model (one file) and the streamed one (a shard per layer) hold the same tensors."""
    from safetensors.torch import load_file

    a = load_file(Path(in_memory) / "model.safetensors")
    b: dict = {}
    for f in Path(streamed).glob("model-*.safetensors"):
        b |= load_file(f)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=atol)


def test_streamed_pipeline_matches_in_memory(harness, tracking_uri, make_config, tmp_path: Path,
                                             monkeypatch) -> None:
    """stream_layers runs the same flow one decoder layer at a time: same layers removed, same final tensors up to
    float rounding, a final model with its recipe. Unset, it is chosen automatically (with a log line) when the
    weights exceed the memory budget."""

    import flows.compress as compress_module
    from prunecomp.recipes.recipe import read_recipe

    def no_mlflow(name: str) -> dict:
        return {"log_and_register": False, "store": str(tmp_path / name), "tracking_uri": tracking_uri}

    ref = compress_module.compress(config=make_config(str(tmp_path / "mem"), tracking_uri, tracking=no_mlflow("mem")))
    streamed = compress_module.compress(config=make_config(str(tmp_path / "st"), tracking_uri,
                                                           tracking=no_mlflow("st"), stream_layers=True))
    assert streamed["stream_layers"] and not ref["stream_layers"]
    assert streamed["removed"] == ref["removed"]
    _same_weights(ref["final"]["uri"], streamed["final"]["uri"], rtol=1e-5, atol=1e-6)
    for name, v in ref["perplexity"].items():
        assert abs(streamed["perplexity"][name]["pruned"] - v["pruned"]) < 1e-3 * v["pruned"]
    assert read_recipe(streamed["final"]["uri"]).removed == ref["removed"]

    import flows.placement

    monkeypatch.setattr(flows.placement, "memory_budget", lambda: 1024)  # nothing fits: stream by itself
    auto = compress_module.compress(config=make_config(str(tmp_path / "auto"), tracking_uri,
                                                       tracking=no_mlflow("auto")))
    assert auto["stream_layers"] and auto["removed"] == ref["removed"]
    assert auto["stream_reason"].startswith("automatic: weights") and "streaming layers" in auto["stream_reason"]
    with pytest.raises(Exception, match="layer streaming cannot run the lsq gap map"):
        compress_module.compress(config=make_config(str(tmp_path / "bad"), tracking_uri, tracking=no_mlflow("bad"),
                                                    stream_layers=True, prune={"compensation": "lsq"}))


def test_streamed_pipeline_reconstructs(harness, tracking_uri, make_config, tmp_path: Path) -> None:
    """stream_layers with reconstruct: each step's part carries the two fitted layers (written one tensor at a
    time from the spill files), the final model matches the in-memory pipeline's up to float rounding, its recipe
    replays, and the final check loads the base's weights for the rewritten layers (the same verdict and losses)."""

    import flows.compress as compress_module
    from prunecomp.recipes.recipe import read_recipe

    prune = {"n_layers": 2, "reconstruct": "both", "reconstruct_steps": 4, "refine_samples": 6}
    runs = {}
    for name, stream in (("mem", False), ("st", True)):
        runs[name] = compress_module.compress(config=make_config(
            str(tmp_path / name), tracking_uri, prune=prune, stream_layers=stream,
            tracking={"log_and_register": False, "store": str(tmp_path / name), "tracking_uri": tracking_uri}))
    ref, streamed = runs["mem"], runs["st"]
    assert streamed["stream_layers"] and streamed["removed"] == ref["removed"]
    for a, b in zip(ref["steps"], streamed["steps"], strict=True):
        assert b["record"]["reconstruct"]["layers"] == a["record"]["reconstruct"]["layers"]
        assert b["record"]["reconstruct"]["windows"] == 6
    _same_weights(ref["final"]["uri"], streamed["final"]["uri"], rtol=1e-3, atol=1e-4)
    recipe = read_recipe(streamed["final"]["uri"])
    assert all(st.layers for st in recipe.steps)
    check_a, check_b = ref["final_check"], streamed["final_check"]
    assert check_b["folded"] == check_a["folded"] and "reconstruct" in check_b["folded"]
    assert check_b["uncompensated_ppl"] == pytest.approx(check_a["uncompensated_ppl"], rel=1e-4)
    assert check_b["ppl"] == pytest.approx(check_a["ppl"], rel=1e-3)


def test_no_planted_password_in_anything_a_run_writes(harness, make_config, tmp_path: Path, capsys) -> None:
    """A tracking URI with a user and password: every file the run leaves in the store, the summary it returns
    and what it prints carry ``***`` instead of the password."""
    from flows.compress import compress

    secret = "PLANTED-s3cr3t"
    store = tmp_path / "store"
    cfg = make_config(str(store), f"postgresql://alice:{secret}@db.internal:5432/mlflow",
                      tracking={"log_and_register": False})
    summary = compress(config=cfg)
    assert secret not in json.dumps(summary, default=str)
    assert summary["tracking_uri"].startswith("postgresql://***@db.internal")
    leaked = [str(p) for p in store.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaked == []
    assert secret not in capsys.readouterr().out


def test_redaction_covers_nested_documents_and_mlflow_params() -> None:
    from tasks.settings import redact_all
    from tasks.tracking import _flatten

    doc = {"tracking": {"tracking_uri": "postgresql://u:pw@h/db", "store": "s3://key:secret@bucket/p"},
           "list": ["https://x:y@host/a", "no creds here: s3://bucket/x"], "n": 3}
    out = redact_all(doc)
    assert out["tracking"] == {"tracking_uri": "postgresql://***@h/db", "store": "s3://***@bucket/p"}
    assert out["list"] == ["https://***@host/a", "no creds here: s3://bucket/x"] and out["n"] == 3
    flat: dict[str, str] = {}
    _flatten("", out, flat)
    assert not any("pw" in v or "secret" in v for v in flat.values())


def test_cli_keeps_credentials_out_of_prefect_parameters(harness, stories, tmp_path: Path, monkeypatch) -> None:
    """`prunecomp run --tracking-uri` with a password: the run gets the URI through the environment, and the flow
    run's parameters that Prefect stores (and shows in its UI) never contain it. The pruning options reach the flow's
    parameters (``--refit``)."""
    from click.testing import CliRunner
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from flows.cli import main

    secret = "PLANTED-pr3fect"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(os, "environ", os.environ.copy())  # the CLI exports the URI: keep it out of other tests
    data = str(stories.parents[1] / "data")
    result = CliRunner().invoke(main, [
        "run", "--model", str(stories), "--layers", "1", "--calib-source", "tinystories", "--calib-samples", "4",
        "--calib-seq-len", "64", "--eval-datasets", "tinystories", "--eval-seq-len", "64", "--eval-max-windows", "2",
        "--quick-datasets", "", "--data-dir", data, "--store", str(tmp_path / "store"), "--no-register",
        "--run-name", "credentials", "--tracking-uri", f"postgresql://alice:{secret}@db.internal:5432/mlflow",
        "--refit", "sequential", "--refit-steps", "2", "--refine", "norms", "--refine-steps", "2",
        "--refine-loss", "topk"])
    assert result.exit_code == 0, result.output
    assert secret not in result.output, result.output
    assert "passed to the run through" in result.output
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="credentials")))
    assert runs and all(secret not in json.dumps(r.parameters, default=str) for r in runs)
    prune = json.loads(json.dumps(runs[0].parameters, default=str))["config"]["prune"]
    assert prune["refit"] == "sequential" and prune["refit_steps"] == 2
    assert prune["refine"] == "norms" and prune["refine_loss"] == "topk"
