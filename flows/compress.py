"""The ``compress`` flow: source model -> calibration cache -> k x (score -> prune -> compensate -> recipe part ->
quick eval) -> [refit] -> [refine] -> final model, written once -> full evaluation -> MLflow run + registered model
version.

Every box is a cached task keyed by what determines its result (:mod:`tasks.jobs`). Steps exchange recipe parts
(kilobytes), not models: one working copy of the model stays in the process from step to step
(:mod:`tasks.working`), and a killed run re-run with the same parameters loads the source once, replays the
finished steps and picks up after them. The flow itself only wires tasks, checks the quality floor and writes the
audit trail, in named phases: :func:`_prepare` (source, base, placement, calibration), :func:`_dense` (the dense
model's evaluation and teacher), :func:`_remove_layers` (one cached step per removed layer), :func:`_fit_after`
(the refit and the end refinement), :func:`_finish` (final model, evaluation, check, registration). Beside it:
:mod:`flows.journal` (the run's journal), :mod:`flows.placement` (in memory or layer-streamed),
:mod:`flows.registration` (metrics and the MLflow side).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from prefect import flow, get_run_logger

from flows.journal import Journal
from flows.params import CompressConfig
from flows.placement import not_streamable, place
from flows.registration import run_metrics, track_run
from flows.run import Run, State, base_model, fan_out, teacher
from flows.runners import task_runner
from prunecomp.config import EvalConfig
from prunecomp.corpora.calibration import check_context
from prunecomp.corpora.data import resolve_data_dir
from prunecomp.engine.final_check import line as final_line
from prunecomp.engine.incremental import PER_CANDIDATE_METRICS
from prunecomp.errors import PrunecompError
from prunecomp.method.reconstruct import describe as describe_reconstruct
from prunecomp.method.refit import describe_refit, mean_errors
from prunecomp.models.outputs import check_store
from prunecomp.models.storage import is_complete, write_json
from prunecomp.quiet import quiet_libraries
from prunecomp.recipes.recipe import Recipe
from tasks import working
from tasks.artifacts import RunProgress, publish_step, publish_summary, summary_markdown
from tasks.caching import run_cached
from tasks.calibrate import build_calibration
from tasks.jobs import CalibrationJob, FinalJob, RefitJob, StepJob
from tasks.keys import code_version
from tasks.locks import RunLock, run_lock
from tasks.model_io import resolve_model, write_final
from tasks.prune import prune_one_step
from tasks.refit import refit_state
from tasks.settings import Locations, configure_s3, locations, redact, redact_all

__all__ = ["compress"]


def _mean(d: dict[str, float] | None) -> float | None:
    return sum(d.values()) / len(d) if d else None


def _preflight(config: CompressConfig, loc: Locations) -> str | None:
    """Checks that need no model: the store is reachable and writable (bounded retries), the data dir exists."""
    configure_s3()
    check_store(loc.store, sources=[config.model], probe=loc.child("runs", config.run_id()))
    data_dir = resolve_data_dir(config.data_dir)
    return str(data_dir) if data_dir is not None else None


def _prewarm_tracking(tracking_uri: str) -> threading.Thread:
    """Import MLflow and matplotlib and open the tracking store in a background thread while the model loads and
    scores: a few seconds of start-up that would otherwise be added at the end of every run. Failures are ignored
    here; the real call reports them."""

    def warm() -> None:
        with contextlib.suppress(Exception):
            import matplotlib.figure  # noqa: F401  (the run's plots)

            from tasks.tracking import client

            client(tracking_uri).search_experiments(max_results=1)

    thread = threading.Thread(target=warm, name="prunecomp-prewarm-mlflow", daemon=True)
    thread.start()
    return thread


@flow(name="compress", validate_parameters=True, task_runner=task_runner())
def compress(config: CompressConfig = CompressConfig()) -> dict[str, Any]:  # noqa: B008 - frozen, immutable
    """Prune ``config.prune`` layers from ``config.model`` one cached iteration (one recipe part) at a time.

    One run per run id and store at a time (:mod:`tasks.locks`): a second one fails at once, naming the first."""
    log = get_run_logger()
    for name in ("store", "tracking_uri"):
        value = getattr(config.tracking, name)
        if value and redact(value) != value:
            log.warning("tracking.%s carries credentials, and Prefect stores flow parameters in its database: set "
                        "%s in the worker's environment instead", name,
                        "PRUNECOMP_STORE" if name == "store" else "MLFLOW_TRACKING_URI")
    if config.model and redact(config.model) != config.model:
        log.warning("model carries credentials (a password, token or signature), and Prefect stores flow "
                    "parameters in its database: give them to the worker through its environment instead "
                    "(HF_TOKEN, the AWS credential chain)")
    loc = locations(config.tracking.store, config.tracking.tracking_uri)
    data_dir = _preflight(config, loc)
    quiet_libraries()  # a worker's log is the run's story: no weight-loading or download bars
    with run_lock(loc.child("runs", config.run_id(), "lock.json"), config.run_id(), log,
                  extra={"flow_run_id": _flow_run_id()},
                  on_stale=lambda held, why: _mark_crashed(held, why, log)) as lock:
        return _compress(config, loc, data_dir, lock, log)


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else None


def _mark_crashed(held: dict[str, Any], why: str, log: Any) -> None:
    """A run whose process died (SIGKILL, lost machine) stays RUNNING in Prefect forever: when its lock is taken
    over, mark its flow run Crashed through the Prefect API, with a log line."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    dead = held.get("flow_run_id")
    if not dead or dead == _flow_run_id():
        return
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(dead)
        if run.state is None or not run.state.is_running():
            return
        client.set_flow_run_state(dead, Crashed(message=f"its process died ({why}); resumed by flow run "
                                                        f"{_flow_run_id()}"), force=True)
    log.warning("marked flow run %r (%s) Crashed: %s", run.name, dead, why)


def _compress(config: CompressConfig, loc: Locations, data_dir: str | None, lock: RunLock, log: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    run = _prepare(config, loc, data_dir, log)
    state, dense_eval = _dense(run)
    steps, state, stop_reason = _remove_layers(run, state, lock)
    kept = [s for s in steps if s["kept"]]
    refitted, refined, state = _fit_after(run, state, bool(kept))
    return _finish(run, state, steps, stop_reason, refitted, refined, dense_eval, t0)


def _prepare(config: CompressConfig, loc: Locations, data_dir: str | None, log: Any) -> Run:
    """The source and the run's base model, checked against the request; where the model lives; the calibration
    windows. Nothing is pruned yet."""
    code = code_version()
    journal = Journal(loc, config.run_id(), config.model_dump(mode="json"), code)
    log.info("run %s: store %s, code %s", config.run_id(), redact(loc.store), code)
    source = resolve_model(config.model, config.revision, config.allow_pickle)
    base, cached = base_model(config, source, loc.store)
    n_src = int(base["num_layers"])
    k = config.prune.layers_to_remove(n_src)
    removable = n_src - len(config.prune.protected(n_src))
    if removable < k:
        raise PrunecompError(f"protected layers leave {removable} removable layers, but {k} must be removed")
    if source.get("max_positions"):  # windows longer than the model's context are refused, not silently used
        limits = {"max_position_embeddings": source["max_positions"]}
        check_context(limits, config.calibration.seq_len, "calibration.seq_len")
        check_context(limits, config.evaluation.seq_len, "evaluation.seq_len")
        if config.quick_eval is not None:
            check_context(limits, config.quick_eval.seq_len, "quick_eval.seq_len")
    placement = place(config, base)
    if config.stream_layers is None and placement.over_budget:
        log.warning(placement.reason)
    if placement.stream and (why_not := not_streamable(config, base)) is not None:
        raise PrunecompError(why_not)
    log.info("model %s: %d layers, removing %d%s%s", source["uri"], n_src, k, " (cached)" if cached else "",
             ", layer-streamed" if placement.stream else "")
    run = Run(config=config, loc=loc, log=log, data_dir=data_dir, code=code, journal=journal, source=source,
              base=base, base_cached=cached, k=k, placement=placement)
    # time for memory: not when streaming, where memory is what the run is short of
    run.warm = _prewarm_tracking(loc.tracking_uri) if config.tracking.log_and_register and not run.stream else None
    run.cal, _ = run_cached(build_calibration, CalibrationJob(
        store=run.store, model_uri=base["uri"], model_hash=base["hash"], calibration=config.calibration,
        data_dir=data_dir))
    return run


def _dense(run: Run) -> tuple[State, dict[str, Any]]:
    """The dense model's quick and full evaluation and, for the gains, its predictions: now, while the working
    copy is dense."""
    digest = Recipe(source={"content_hash": run.base["hash"]}).digest()
    state = State([], digest, run.quick([], digest))
    p = run.config.prune
    run.progress = RunProgress(run.run_id, 1 + run.k + run.fits + (p.refit != "none") + 2
                               + run.config.tracking.log_and_register)
    dense_eval = run.evaluate([], digest, run.config.evaluation, qa=True)
    run.progress.advance("dense model evaluated")
    if run.fits:
        run.fit = teacher(run.config, run.store, run.base, run.cal, run.data_dir)
    return state, dense_eval


def _remove_layers(run: Run, state: State, lock: RunLock) -> tuple[list[dict[str, Any]], State, str]:
    """One cached step per removed layer (with its gains fit when refinement is progressive), the quick
    perplexity after each, the quality floor; the journal after every kept step."""
    config, p, log, k = run.config, run.config.prune, run.log, run.k
    local = {}  # block reconstruction's windows, when not the calibration ones (they then enter the step keys)
    if p.reconstruct != "none" and p.refine_samples is not None:
        windows = run.fit_windows()
        local = {"fit_uri": windows["uri"], "fit_digest": windows["digest"]}
    check = run.decision_windows() if p.reconstruct != "none" else None
    if check is not None:  # the held-out windows each reconstruction must improve (in the step keys too)
        local |= {"check_uri": check["uri"], "check_digest": check["digest"]}
    dense_ppl = state.ppl
    steps: list[dict[str, Any]] = []
    stop_reason = f"removed the {k} requested layers"
    for step in range(k):
        job = StepJob(**run.state(state.parts, state.digest), calibration_uri=run.cal["uri"],
                      calibration_digest=run.cal["digest"], prune=p, step=step,
                      batch_size=config.calibration.batch_size, **local)
        workers: list[str] = []
        if (config.parallel_candidates > 1 and p.metric in PER_CANDIDATE_METRICS and not run.stream
                and not is_complete(job.uri)):
            scores, workers = fan_out(config, job, int(run.base["num_layers"]),
                                       [s["record"]["chosen"] for s in steps])
            job = job.model_copy(update={"candidate_scores": scores})
        meta, cached = run_cached(prune_one_step, job)
        after = run.quick([*state.parts, meta["uri"]], meta["digest"])
        entry = {"step": step, "uri": meta["uri"], "digest": meta["digest"], "record": meta["record"],
                 "reused": cached, "ppl_before": state.ppl, "ppl_after": after, "kept": True,
                 "candidate_workers": workers}
        rec = meta["record"]
        log.info("step %d/%d: removed layer %d, s=%.4f, quick ppl %s -> %s%s", step + 1, k, rec["chosen"],
                 rec["applied_scale"], _fmt(_mean(state.ppl)), _fmt(_mean(after)), " (cached)" if cached else "")
        if rec.get("reconstruct"):
            log.info("step %d/%d: %s", step + 1, k, describe_reconstruct(rec["reconstruct"]))
        new = state.then(meta, after)
        removed = f"step {step + 1}/{k}: removed layer {rec['chosen']}{' (cached)' if cached else ''}"
        if run.fits and p.refine_at == "each":  # progressive: the next step scores the refined model
            run.progress.advance(removed)
            rmeta, rcached = run.refine(new.parts, new.digest)
            refined_ppl = run.quick([*new.parts, rmeta["uri"]], rmeta["digest"])
            entry["refine"] = {"uri": rmeta["uri"], "digest": rmeta["digest"], "report": rmeta["refine"],
                               "reused": rcached, "ppl_before": after, "ppl_after": refined_ppl}
            log.info("step %d/%d refined (%s, %d steps): calibration KL %.4f -> %.4f, quick ppl %s -> %s%s",
                     step + 1, k, p.refine, p.refine_steps, rmeta["refine"]["loss_before"],
                     rmeta["refine"]["loss_after"], _fmt(_mean(after)), _fmt(_mean(refined_ppl)),
                     " (cached)" if rcached else "")
            new = new.then(rmeta, refined_ppl)
            entry["ppl_after"] = refined_ppl
            publish_step(run.run_id, entry)
            run.progress.advance(f"step {step + 1}/{k}: refined{' (cached)' if rcached else ''}")
        else:
            publish_step(run.run_id, entry)
            run.progress.advance(removed)
        ratio = (_mean(new.ppl) or 0.0) / (_mean(dense_ppl) or 1.0)
        if config.max_ppl_ratio is not None and ratio > config.max_ppl_ratio:
            entry["kept"] = False
            stop_reason = (f"quality floor: step {step + 1} raised quick perplexity {ratio:.2f}x over dense "
                           f"(max {config.max_ppl_ratio}); kept {step} removed layers")
            log.warning(stop_reason)
            steps.append(entry)
            break
        steps.append(entry)
        run.journal.steps(steps)
        lock.beat()
        state = new
    return steps, state, stop_reason


def _fit_after(run: Run, state: State, kept: bool) -> tuple[dict[str, Any] | None, dict[str, Any] | None, State]:
    """After the last kept step: the sequential refit, then the gains fitted at the end (each cached)."""
    p, log = run.config.prune, run.log
    refitted: dict[str, Any] | None = None
    if p.refit != "none" and kept:
        windows = run.fit_windows()
        meta, cached = run_cached(refit_state, RefitJob(
            **run.state(state.parts, state.digest), calibration_uri=windows["uri"],
            calibration_digest=windows["digest"], steps=p.refit_steps, lr=p.refit_lr, batch=p.reconstruct_batch))
        run.progress.advance(f"refitted{' (cached)' if cached else ''}")
        after = run.quick([*state.parts, meta["uri"]], meta["digest"])
        refitted = {"uri": meta["uri"], "digest": meta["digest"], "report": meta["refit"], "reused": cached,
                    "ppl_before": state.ppl, "ppl_after": after}
        log.info("%s; quick ppl %s -> %s%s", describe_refit(meta["refit"]), _fmt(_mean(state.ppl)),
                 _fmt(_mean(after)), " (cached)" if cached else "")
        state = state.then(meta, after)
    refined: dict[str, Any] | None = None
    if run.fits and p.refine_at == "end" and kept:
        meta, cached = run.refine(state.parts, state.digest)
        run.progress.advance(f"refined ({p.refine})")
        after = run.quick([*state.parts, meta["uri"]], meta["digest"])
        refined = {"uri": meta["uri"], "digest": meta["digest"], "report": meta["refine"], "reused": cached,
                   "ppl_before": state.ppl, "ppl_after": after}
        log.info("refine (%s, %d steps): calibration KL %.4f -> %.4f, quick ppl %s -> %s%s", p.refine,
                 p.refine_steps, meta["refine"]["loss_before"], meta["refine"]["loss_after"],
                 _fmt(_mean(state.ppl)), _fmt(_mean(after)), " (cached)" if cached else "")
        state = state.then(meta, after)
    return refitted, refined, state


def _finish(run: Run, state: State, steps: list[dict[str, Any]], stop_reason: str, refitted: dict[str, Any] | None,
            refined: dict[str, Any] | None, dense_eval: dict[str, Any], t0: float) -> dict[str, Any]:
    """The final model, written once; its evaluation and the final check; the report, the journal and, when asked,
    the MLflow run and registered version."""
    config, loc, log, source, base = run.config, run.loc, run.log, run.source, run.base
    kept = [s for s in steps if s["kept"]]
    n_src = int(base["num_layers"])
    arch = source.get("architecture") or (base.get("source") or {}).get("architecture")
    fjob = FinalJob(**run.state(state.parts, state.digest),
                    source={"content_hash": base["hash"], "architecture": arch, "num_layers": n_src,
                            "uri": source["uri"]},
                    report=redact_all({"run_id": run.run_id, "config": config.model_dump(mode="json"),
                                       "source": source}))
    final, final_cached = run_cached(write_final, fjob)
    run.progress.advance("final model written")
    log.info("final model (%d layers removed) %s: %s", len(kept), "reused" if final_cached else "written",
             redact(final["uri"]))
    final_eval = run.evaluate(state.parts, state.digest, config.evaluation, qa=True)  # shared with the evaluate flow
    run.progress.advance("final model evaluated")
    check = (run.evaluate(state.parts, state.digest, EvalConfig(datasets=()), check=True).get("final_check")
             if kept else None)
    if check is not None:
        (log.warning if check["verdict"] == "worse" else log.info)(final_line(check))
    ppl = {name: {"dense": v, "pruned": final_eval["perplexity"][name]}
           for name, v in dense_eval["perplexity"].items()}
    qa = None
    if dense_eval.get("qa") and final_eval.get("qa"):
        qa = {"dense": dense_eval["qa"].get("average"), "pruned": final_eval["qa"].get("average"),
              "tasks": {"dense": dense_eval["qa"].get("tasks"), "pruned": final_eval["qa"].get("tasks")}}
    metrics = run_metrics(ppl, qa, len(kept), check)
    if refitted is not None and refitted["report"]["layers"]:  # the refit's mean relative error per layer
        before, after = mean_errors(refitted["report"])
        metrics |= {"refit_error_before": before, "refit_error_after": after,
                    "refit_seconds": refitted["report"]["seconds"]}
    summary: dict[str, Any] = {
        "run_id": run.run_id, "config": config.model_dump(mode="json"), "code_version": run.code, "source": source,
        "base": {"uri": redact(base["uri"]), "hash": base["hash"], "num_layers": n_src,
                 "materialized": base["materialized"]},
        "calibration": run.cal, "stream_layers": run.stream, "stream_reason": run.placement.reason,
        "steps": steps, "removed": [s["record"]["chosen"] for s in kept], "stop_reason": stop_reason,
        "refit": refitted, "refine": refined, "recipe": {"digest": state.digest, "parts": state.parts},
        "final_check": check, "final": {"uri": final["uri"], "hash": final["hash"]}, "perplexity": ppl, "qa": qa,
        "metrics": metrics, "steps_reused": sum(s["reused"] for s in steps),
        "steps_computed": sum(not s["reused"] for s in steps), "store": run.store,
        "run_dir": loc.child("runs", run.run_id), "tracking_uri": loc.tracking_uri,
    }
    if run.stream:  # streaming is short of memory: free the model's shell before MLflow's share of the run
        working.drop()
    if run.warm is not None:
        run.warm.join(timeout=300)  # never two first-time initialisations of the tracking store at once
    summary = redact_all(summary)  # what is written, logged, returned and sent to MLflow carries no credentials
    if config.tracking.log_and_register and kept:
        summary["mlflow"] = track_run(config, loc, summary, metrics, final_uri=final["uri"])
        run.progress.advance(f"registered version {summary['mlflow']['version']}")
    summary["seconds"] = time.perf_counter() - t0
    write_json(loc.child("runs", run.run_id, "report.json"), summary)
    publish_summary(run.run_id, summary_markdown(summary))
    run.journal.complete(steps, final=summary["final"], mlflow=summary.get("mlflow"), stop_reason=stop_reason)
    log.info("run %s done in %.1f s: %d steps reused, %d computed", run.run_id, summary["seconds"],
             summary["steps_reused"], summary["steps_computed"])
    return summary


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
