"""The ``compress`` flow: source model -> calibration cache -> k x (score -> prune -> compensate -> recipe part ->
quick eval) -> [refit] -> [refine] -> final model, written once -> full evaluation -> MLflow run + registered model
version.

Every box is a cached task keyed by what determines its result (:mod:`tasks.jobs`). Steps exchange recipe parts
(kilobytes), not models: one working copy of the model stays in the process from step to step
(:mod:`tasks.working`), and a killed run re-run with the same parameters loads the source once, replays the
finished steps and picks up after them. The flow itself only wires tasks, checks the quality floor and writes the
audit trail.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from prefect import flow, get_run_logger

from flows.params import CompressConfig
from flows.runners import task_runner
from prunecomp.calibration import check_context
from prunecomp.config import EvalConfig
from prunecomp.data import resolve_data_dir
from prunecomp.errors import PrunecompError
from prunecomp.final_check import line as final_line
from prunecomp.incremental import PER_CANDIDATE_METRICS
from prunecomp.outputs import check_store
from prunecomp.quiet import quiet_libraries
from prunecomp.recipe import Recipe
from prunecomp.refit import describe_refit, mean_errors
from prunecomp.storage import is_complete, write_json
from tasks import working
from tasks.artifacts import RunProgress, publish_step, publish_summary, summary_markdown
from tasks.caching import run_cached
from tasks.calibrate import build_calibration
from tasks.candidates import CandidateJob, score_candidates, split
from tasks.evaluate import evaluate_checkpoint
from tasks.jobs import CalibrationJob, EvalJob, FinalJob, ModelJob, RefineJob, RefitJob, StepJob, TeacherJob
from tasks.keys import code_version
from tasks.locks import RunLock, run_lock
from tasks.model_io import materialize_model, resolve_model, write_final
from tasks.prune import prune_one_step
from tasks.refine import refine_state, teacher_predictions
from tasks.refit import refit_state
from tasks.settings import Locations, configure_s3, locations, redact, redact_all
from tasks.tracking import log_run_task, register_task

__all__ = ["compress", "journal_uri", "run_metrics"]


def journal_uri(loc: Locations, run_id: str) -> str:
    """``<store>/runs/<run_id>/run.json``: what a run has done so far (read by ``prunecomp status``)."""
    return loc.child("runs", run_id, "run.json")


def _mean(d: dict[str, float] | None) -> float | None:
    return sum(d.values()) / len(d) if d else None


def run_metrics(ppl: dict[str, dict[str, float]], qa: dict[str, Any] | None, n_removed: int,
                check: dict[str, Any] | None = None) -> dict[str, float]:
    """The final metrics promotion gates read: per-corpus and mean perplexity, ratios, QA retention, and the final
    check's ``fold_loss_ratio`` (held-out NLL with what was folded / without it: above 1, the folds hurt)."""
    out: dict[str, float] = {"layers_removed": float(n_removed)}
    if check is not None:
        out["fold_loss_ratio"] = check["loss"] / check["uncompensated_loss"]
    for name, v in ppl.items():
        out[f"ppl_{name}_dense"], out[f"ppl_{name}_pruned"] = v["dense"], v["pruned"]
        out[f"ppl_{name}_ratio"] = v["pruned"] / v["dense"]
    if ppl:
        out["ppl_mean_dense"] = sum(v["dense"] for v in ppl.values()) / len(ppl)
        out["ppl_mean_pruned"] = sum(v["pruned"] for v in ppl.values()) / len(ppl)
        out["ppl_ratio_mean"] = out["ppl_mean_pruned"] / out["ppl_mean_dense"]
    if qa and qa.get("dense") is not None and qa.get("pruned") is not None:
        out["qa_average_dense"], out["qa_average_pruned"] = qa["dense"], qa["pruned"]
        out["qa_retained"] = qa["pruned"] / qa["dense"] if qa["dense"] else 0.0
    return out


def _preflight(config: CompressConfig, loc: Locations) -> str | None:
    """Checks that need no model: the store is reachable and writable (bounded retries), the data dir exists."""
    configure_s3()
    check_store(loc.store, sources=[config.model], probe=loc.child("runs", config.run_id()))
    data_dir = resolve_data_dir(config.data_dir)
    return str(data_dir) if data_dir is not None else None


def _base(config: CompressConfig, source: dict[str, Any], store: str) -> tuple[dict[str, Any], bool]:
    """The run's base model: the source itself when it is safetensors, else its one materialised copy."""
    if source["safetensors"]:
        return {"uri": source["load_uri"], "hash": source["content_hash"], "num_layers": source["num_layers"],
                "materialized": False, "weight_bytes": source["weight_bytes"]}, False
    meta, cached = run_cached(materialize_model, ModelJob(
        store=store, source_uri=config.model, revision=config.revision, source_hash=source["content_hash"],
        allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code))
    from tasks.keys import record_source, source_stamps

    # the store's copy as this run found it: the jobs on it carry the record, their loads check it
    record_source(meta["uri"], meta["hash"], source_stamps(meta["uri"]))
    return dict(meta) | {"materialized": True}, cached


def _memory_budget() -> int:
    """Bytes a whole model may take in memory: 60% of what is available (GPU memory on CUDA)."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0] * 0.6)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return int(info.get("MemAvailable", 0) * 0.6)
    except OSError:
        return 1 << 62


def _stream(config: CompressConfig, base: dict[str, Any]) -> tuple[bool, str]:
    """``config.stream_layers``, or (when unset) whether the model does not fit the memory budget; and why."""
    if config.stream_layers is not None:
        return config.stream_layers, "stream_layers set in the run's parameters"
    need, budget = int(base.get("weight_bytes") or 0), _memory_budget()
    if need <= budget:
        return False, f"weights {need / 2**30:.2f} GiB fit the in-memory budget {budget / 2**30:.1f} GiB"
    why_not = _not_streamable(config, base)
    if why_not is None:
        return True, (f"automatic: weights {need / 2**30:.2f} GiB exceed the in-memory budget {budget / 2**30:.2f} "
                      "GiB, so streaming layers (one decoder layer in memory at a time; stream_layers: false to "
                      "override)")
    return False, (f"weights {need / 2**30:.2f} GiB exceed the in-memory budget {budget / 2**30:.2f} GiB, but "
                   f"the run cannot stream ({why_not}): loading it anyway")


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
    run_id = config.run_id()
    store, code = loc.store, code_version()
    journal: dict[str, Any] = {"run_id": run_id, "status": "running", "config": config.model_dump(mode="json"),
                               "store": store, "code_version": code, "steps": []}
    write_json(journal_uri(loc, run_id), redact_all(journal))
    log.info("run %s: store %s, code %s", run_id, redact(store), code)

    source = resolve_model(config.model, config.revision, config.allow_pickle)
    base, cached = _base(config, source, store)
    n_src = int(base["num_layers"])
    k = config.prune.layers_to_remove(n_src)
    removable = n_src - len(config.prune.protected(n_src))
    if removable < k:
        raise PrunecompError(f"protected layers leave {removable} removable layers, but {k} must be removed")
    arch = source.get("architecture") or (base.get("source") or {}).get("architecture")
    if source.get("max_positions"):  # windows longer than the model's context are refused, not silently used
        limits = {"max_position_embeddings": source["max_positions"]}
        check_context(limits, config.calibration.seq_len, "calibration.seq_len")
        check_context(limits, config.evaluation.seq_len, "evaluation.seq_len")
        if config.quick_eval is not None:
            check_context(limits, config.quick_eval.seq_len, "quick_eval.seq_len")
    stream, stream_reason = _stream(config, base)
    if config.stream_layers is None and "exceed" in stream_reason:
        log.warning(stream_reason)
    if stream and (why_not := _not_streamable(config, base)) is not None:
        raise PrunecompError(why_not)
    log.info("model %s: %d layers, removing %d%s%s", source["uri"], n_src, k, " (cached)" if cached else "",
             ", layer-streamed" if stream else "")
    # time for memory: not when streaming, where memory is what the run is short of
    warm = _prewarm_tracking(loc.tracking_uri) if config.tracking.log_and_register and not stream else None
    cal, _ = run_cached(build_calibration, CalibrationJob(store=store, model_uri=base["uri"], model_hash=base["hash"],
                                                          calibration=config.calibration, data_dir=data_dir))

    def state(parts: list[str], digest: str) -> dict[str, Any]:
        return {"store": store, "base_uri": base["uri"], "base_hash": base["hash"], "parts": tuple(parts),
                "state_digest": digest, "stream": stream}

    def evaluate(parts: list[str], digest: str, evaluation: Any, qa: bool = False,
                 check: bool = False) -> dict[str, Any]:
        s = state(parts, digest)
        job = EvalJob(store=store, checkpoint_hash=digest, base_uri=s["base_uri"], base_hash=s["base_hash"],
                      parts=s["parts"], stream=stream, evaluation=evaluation, data_dir=data_dir,
                      qa_tasks=config.qa_tasks if qa else (), qa_limit=config.qa_limit if qa else None,
                      final_check=config.calibration if check else None)
        return dict(run_cached(evaluate_checkpoint, job)[0])

    def quick(parts: list[str], digest: str) -> dict[str, float] | None:
        if config.quick_eval is None or not config.quick_eval.datasets:
            return None
        return dict(evaluate(parts, digest, config.quick_eval)["perplexity"])

    parts: list[str] = []
    digest = Recipe(source={"content_hash": base["hash"]}).digest()
    dense_quick = quick(parts, digest)
    p = config.prune
    fits = 0 if p.refine == "none" else (k if p.refine_at == "each" else 1)
    progress = RunProgress(run_id, 1 + k + fits + (p.refit != "none") + 2 + config.tracking.log_and_register)
    dense_eval = evaluate(parts, digest, config.evaluation, qa=True)  # now, while the working copy is dense
    progress.advance("dense model evaluated")
    fit = _teacher(config, store, base, cal, data_dir) if fits else None  # also while the copy is dense

    def fit_state(parts: list[str], digest: str) -> tuple[dict[str, Any], bool]:
        assert fit is not None
        return run_cached(refine_state, RefineJob(
            **state(parts, digest), calibration_uri=fit["windows"]["uri"],
            calibration_digest=fit["windows"]["digest"], teacher_uri=fit["teacher"]["uri"], mode=p.refine,
            steps=p.refine_steps, lr=p.refine_lr, batch=p.refine_batch, topk=p.refine_topk, loss=p.refine_loss,
            batch_size=config.calibration.batch_size))

    local = {}  # block reconstruction's windows, when not the calibration ones (they then enter the step keys)
    if p.reconstruct != "none" and p.refine_samples is not None:
        windows = fit["windows"] if fit else _fit_windows(config, store, base, cal, data_dir)
        local = {"fit_uri": windows["uri"], "fit_digest": windows["digest"]}
    parent_ppl = dense_quick
    steps: list[dict[str, Any]] = []
    stop_reason = f"removed the {k} requested layers"
    for step in range(k):
        job = StepJob(**state(parts, digest), calibration_uri=cal["uri"], calibration_digest=cal["digest"],
                      prune=config.prune, step=step, batch_size=config.calibration.batch_size, **local)
        workers: list[str] = []
        if (config.parallel_candidates > 1 and config.prune.metric in PER_CANDIDATE_METRICS and not stream
                and not is_complete(job.uri)):
            removed_so_far = [s["record"]["chosen"] for s in steps]
            scores, workers = _fan_out(config, job, n_src, removed_so_far)
            job = job.model_copy(update={"candidate_scores": scores})
        meta, cached = run_cached(prune_one_step, job)
        after = quick([*parts, meta["uri"]], meta["digest"])
        entry = {"step": step, "uri": meta["uri"], "digest": meta["digest"], "record": meta["record"],
                 "reused": cached, "ppl_before": parent_ppl, "ppl_after": after, "kept": True,
                 "candidate_workers": workers}
        rec = meta["record"]
        log.info("step %d/%d: removed layer %d, s=%.4f, quick ppl %s -> %s%s", step + 1, k, rec["chosen"],
                 rec["applied_scale"], _fmt(_mean(parent_ppl)), _fmt(_mean(after)), " (cached)" if cached else "")
        if rec.get("reconstruct"):
            r = rec["reconstruct"]
            log.info("step %d/%d: reconstructed layer(s) %s (%s, %d steps): relative error %.4f -> %.4f", step + 1,
                     k, r["layers"], r["side"], r["steps"], r["loss_before"], r["loss_after"])
        new_parts, new_digest = [*parts, meta["uri"]], meta["digest"]
        if fits and p.refine_at == "each":  # progressive: the next step scores the refined model
            progress.advance(f"step {step + 1}/{k}: removed layer {rec['chosen']}{' (cached)' if cached else ''}")
            rmeta, rcached = fit_state(new_parts, new_digest)
            refined_ppl = quick([*new_parts, rmeta["uri"]], rmeta["digest"])
            entry["refine"] = {"uri": rmeta["uri"], "digest": rmeta["digest"], "report": rmeta["refine"],
                               "reused": rcached, "ppl_before": after, "ppl_after": refined_ppl}
            log.info("step %d/%d refined (%s, %d steps): calibration KL %.4f -> %.4f, quick ppl %s -> %s%s",
                     step + 1, k, p.refine, p.refine_steps, rmeta["refine"]["loss_before"],
                     rmeta["refine"]["loss_after"], _fmt(_mean(after)), _fmt(_mean(refined_ppl)),
                     " (cached)" if rcached else "")
            new_parts, new_digest, after = [*new_parts, rmeta["uri"]], rmeta["digest"], refined_ppl
            entry["ppl_after"] = after
            publish_step(run_id, entry)
            progress.advance(f"step {step + 1}/{k}: refined{' (cached)' if rcached else ''}")
        else:
            publish_step(run_id, entry)
            progress.advance(f"step {step + 1}/{k}: removed layer {rec['chosen']}{' (cached)' if cached else ''}")
        ratio = (_mean(after) or 0.0) / (_mean(dense_quick) or 1.0)
        if config.max_ppl_ratio is not None and ratio > config.max_ppl_ratio:
            entry["kept"] = False
            stop_reason = (f"quality floor: step {step + 1} raised quick perplexity {ratio:.2f}x over dense "
                           f"(max {config.max_ppl_ratio}); kept {step} removed layers")
            log.warning(stop_reason)
            steps.append(entry)
            break
        steps.append(entry)
        journal["steps"] = steps
        write_json(journal_uri(loc, run_id), redact_all(journal))
        lock.beat()
        parts, digest, parent_ppl = new_parts, new_digest, after
    kept = [s for s in steps if s["kept"]]
    refitted: dict[str, Any] | None = None
    if p.refit != "none" and kept:  # after the last kept step, before the end refinement
        windows = fit["windows"] if fit else _fit_windows(config, store, base, cal, data_dir)
        meta, cached = run_cached(refit_state, RefitJob(
            **state(parts, digest), calibration_uri=windows["uri"], calibration_digest=windows["digest"],
            steps=p.refit_steps, lr=p.refit_lr, batch=p.reconstruct_batch))
        progress.advance(f"refitted{' (cached)' if cached else ''}")
        after = quick([*parts, meta["uri"]], meta["digest"])
        refitted = {"uri": meta["uri"], "digest": meta["digest"], "report": meta["refit"], "reused": cached,
                    "ppl_before": parent_ppl, "ppl_after": after}
        log.info("%s; quick ppl %s -> %s%s", describe_refit(meta["refit"]), _fmt(_mean(parent_ppl)),
                 _fmt(_mean(after)), " (cached)" if cached else "")
        parts, digest, parent_ppl = [*parts, meta["uri"]], meta["digest"], after
    refined: dict[str, Any] | None = None
    if fits and p.refine_at == "end" and kept:
        meta, cached = fit_state(parts, digest)
        progress.advance(f"refined ({p.refine})")
        after = quick([*parts, meta["uri"]], meta["digest"])
        refined = {"uri": meta["uri"], "digest": meta["digest"], "report": meta["refine"], "reused": cached,
                   "ppl_before": parent_ppl, "ppl_after": after}
        log.info("refine (%s, %d steps): calibration KL %.4f -> %.4f, quick ppl %s -> %s%s", p.refine,
                 p.refine_steps, meta["refine"]["loss_before"], meta["refine"]["loss_after"],
                 _fmt(_mean(parent_ppl)), _fmt(_mean(after)), " (cached)" if cached else "")
        parts, digest = [*parts, meta["uri"]], meta["digest"]

    fjob = FinalJob(**state(parts, digest), source={"content_hash": base["hash"], "architecture": arch,
                                                    "num_layers": n_src, "uri": source["uri"]},
                    report=redact_all({"run_id": run_id, "config": config.model_dump(mode="json"), "source": source}))
    final, final_cached = run_cached(write_final, fjob)
    progress.advance("final model written")
    log.info("final model (%d layers removed) %s: %s", len(kept), "reused" if final_cached else "written",
             redact(final["uri"]))
    final_eval = evaluate(parts, digest, config.evaluation, qa=True)  # shares its cache with the evaluate flow
    progress.advance("final model evaluated")
    check = evaluate(parts, digest, EvalConfig(datasets=()), check=True).get("final_check") if kept else None
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
        "run_id": run_id, "config": config.model_dump(mode="json"), "code_version": code, "source": source,
        "base": {"uri": redact(base["uri"]), "hash": base["hash"], "num_layers": n_src,
                 "materialized": base["materialized"]},
        "calibration": cal, "stream_layers": stream, "stream_reason": stream_reason,
        "steps": steps, "removed": [s["record"]["chosen"] for s in kept], "stop_reason": stop_reason,
        "refit": refitted, "refine": refined, "recipe": {"digest": digest, "parts": parts}, "final_check": check,
        "final": {"uri": final["uri"], "hash": final["hash"]}, "perplexity": ppl, "qa": qa, "metrics": metrics,
        "steps_reused": sum(s["reused"] for s in steps), "steps_computed": sum(not s["reused"] for s in steps),
        "store": store, "run_dir": loc.child("runs", run_id), "tracking_uri": loc.tracking_uri,
    }
    if stream:  # streaming is short of memory: free the model's shell before MLflow's share of the run
        working.drop()
    if warm is not None:
        warm.join(timeout=300)  # never two first-time initialisations of the tracking store at once
    summary = redact_all(summary)  # what is written, logged, returned and sent to MLflow carries no credentials
    if config.tracking.log_and_register and kept:
        summary["mlflow"] = _track(config, loc, summary, metrics, final_uri=final["uri"])
        progress.advance(f"registered version {summary['mlflow']['version']}")
    summary["seconds"] = time.perf_counter() - t0
    markdown = summary_markdown(summary)
    write_json(loc.child("runs", run_id, "report.json"), summary)
    publish_summary(run_id, markdown)
    journal.update(status="completed", steps=steps, final=summary["final"], mlflow=summary.get("mlflow"),
                   stop_reason=stop_reason)
    write_json(journal_uri(loc, run_id), redact_all(journal))
    log.info("run %s done in %.1f s: %d steps reused, %d computed", run_id, summary["seconds"],
             summary["steps_reused"], summary["steps_computed"])
    return summary


def _fit_windows(config: CompressConfig, store: str, base: dict[str, Any], cal: dict[str, Any],
                 data_dir: str | None) -> dict[str, Any]:
    """The windows refinement and block reconstruction fit on: the calibration windows, or their own cached
    superset with ``refine_samples``."""
    if config.prune.refine_samples is None:
        return cal
    windows, _ = run_cached(build_calibration, CalibrationJob(
        store=store, model_uri=base["uri"], model_hash=base["hash"], data_dir=data_dir,
        calibration=config.calibration.model_copy(update={"n_samples": config.prune.refine_samples})))
    return dict(windows)


def _teacher(config: CompressConfig, store: str, base: dict[str, Any], cal: dict[str, Any],
             data_dir: str | None) -> dict[str, Any]:
    """The refinement windows (:func:`_fit_windows`) and the dense model's predictions on them (one cached task,
    computed on the dense working copy)."""
    p = config.prune
    windows = _fit_windows(config, store, base, cal, data_dir)
    teacher, _ = run_cached(teacher_predictions, TeacherJob(
        store=store, base_uri=base["uri"], base_hash=base["hash"], calibration_uri=windows["uri"],
        calibration_digest=windows["digest"], topk=p.refine_topk, batch_size=config.calibration.batch_size))
    return {"windows": windows, "teacher": teacher}


def _not_streamable(config: CompressConfig, base: dict[str, Any]) -> str | None:
    """Why this run cannot be layer-streamed, or ``None`` when it can: the streamed backend's capabilities
    (:mod:`prunecomp.backends`), and its one input format."""
    from prunecomp.backends import STREAMED, refusal

    why = refusal(STREAMED, config.prune, qa=bool(config.qa_tasks))
    if why is not None:
        return why
    if base.get("materialized"):
        return "layer streaming reads safetensors sources; this one (GGUF or pickle) is materialised in memory first"
    return None


def _fan_out(config: CompressConfig, job: StepJob, n_src: int, removed: list[int]) -> tuple[dict[int, float],
                                                                                         list[str]]:
    """Score this step's candidates in ``config.parallel_candidates`` tasks on the flow's task runner."""
    protected = config.prune.protected(n_src)
    cands = [i for i in range(n_src) if i not in protected and i not in removed]
    jobs = [CandidateJob(store=job.store, base_uri=job.base_uri, base_hash=job.base_hash, parts=job.parts,
                         state_digest=job.state_digest, calibration_uri=job.calibration_uri,
                         calibration_digest=job.calibration_digest, metric=config.prune.metric, candidates=chunk,
                         batch_size=job.batch_size)
            for chunk in split(cands, config.parallel_candidates)]
    results = [f.result() for f in score_candidates.map(job=jobs)]
    scores = {int(k): float(v) for r in results for k, v in r["scores"].items()}
    return scores, sorted({r["worker"] for r in results})


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _track(config: CompressConfig, loc: Locations, summary: dict[str, Any], metrics: dict[str, float], *,
           final_uri: str) -> dict:
    """Log the run to MLflow (params, metrics, report, plots, the recipe) and register the final model as a new
    model version with lineage tags. The weights are not copied: the version's source is the final model in the
    store, so a run leaves one copy of them (see the README). The tags include the digest of the evaluation
    settings (corpora, windows, sequence length, QA tasks, dtype, device type): promotion compares a version's
    metrics with the champion's only when these are equal."""
    from tasks.tracking import eval_settings_tags

    prune = config.prune
    tags = {
        "method": {"magnitude": "prune&comp", "guarded": "prune&comp-guarded", "lsq": "prune&comp+lsq"}.get(
            prune.compensation, "naive-depth-pruning")
        + ("" if prune.reconstruct == "none" else f"+reconstruct-{prune.reconstruct}")
        + ("" if prune.refit == "none" else f"+refit-{prune.refit}")
        + ("" if prune.refine == "none" else f"+refine-{prune.refine}{'-each' if prune.refine_at == 'each' else ''}"),
        "metric": prune.metric, "compensation": prune.compensation,
        "final_check": (summary.get("final_check") or {}).get("verdict", "not run"),
        "guard_decisions": ",".join((s["record"].get("guard") or {}).get("decision", "-")
                                    for s in summary["steps"] if s["kept"]),
        "layers_removed": str(summary["removed"]), "n_layers_removed": str(len(summary["removed"])),
        "source_model": summary["source"]["uri"], "source_hash": summary["source"]["content_hash"],
        "calibration_digest": summary["calibration"]["digest"],
        "calibration_origin": summary["calibration"]["origin"], "code_version": summary["code_version"],
        "checkpoint_uri": summary["final"]["uri"], "checkpoint_hash": summary["final"]["hash"],
        "prunecomp_run": summary["run_id"],
    } | eval_settings_tags(config.evaluation, config.qa_tasks, config.qa_limit)
    report = {k: v for k, v in summary.items() if k != "mlflow"}
    run_key = f"{summary['run_id']}-{summary['final']['hash'][:12]}"
    run = log_run_task(tracking_uri=loc.tracking_uri, artifact_root=loc.mlflow_artifacts,
                       experiment=config.tracking.experiment, run_key=run_key, run_name=summary["run_id"],
                       params=summary["config"] | {"code_version": summary["code_version"]},
                       steps=[s for s in summary["steps"] if s["kept"]], metrics=metrics, tags=tags, report=report,
                       summary_md=summary_markdown(summary), model_uri=summary["final"]["uri"],
                       recipe_uri=final_uri)  # read with the real URI; everything sent is redacted
    version = register_task(tracking_uri=loc.tracking_uri, name=config.model_name(), run_id=run["run_id"],
                            source=summary["final"]["uri"], tags=tags, model_id=run["model_id"] or None,
                            description=f"{summary['source']['uri']} minus layers {summary['removed']} "
                                        f"({tags['method']}, {prune.metric})")
    return {"run_id": run["run_id"], "model_id": run["model_id"], "model_uri": run["model_uri"], **version}
