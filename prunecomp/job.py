"""The whole job as one library call: load -> calibrate -> dense perplexity -> prune & compensate -> perplexity ->
save. The CLI's ``prune`` and ``run`` call it; orchestrators that checkpoint per step use the pieces instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from prunecomp.calibration import TokenWindows, calibration_windows, check_context, evaluation_windows
from prunecomp.checkpoint import save_pruned
from prunecomp.compress import compress
from prunecomp.config import CalibrationConfig, EvalConfig, PruneConfig
from prunecomp.dense import dense_layers, source_layer_weights
from prunecomp.errors import PrunecompError
from prunecomp.evaluation.perplexity import perplexity
from prunecomp.final_check import run_final_check
from prunecomp.levels import DEFAULT_LEVEL, Level
from prunecomp.outputs import check_output
from prunecomp.planning import check_plan
from prunecomp.recipe import Recipe
from prunecomp.refine import RefineReport
from prunecomp.refit import describe_refit
from prunecomp.report import StepRecord
from prunecomp.sources import content_hash, load_model, resolve_source

__all__ = ["JobConfig", "JobResult", "Progress", "evaluate_perplexities", "run_job"]


class JobConfig(BaseModel):
    """Everything one pruning job needs; validated before any work starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    revision: str | None = None
    prune: PruneConfig = PruneConfig(n_layers=5)
    calibration: CalibrationConfig = CalibrationConfig()
    evaluation: EvalConfig | None = EvalConfig()
    data_dir: str | None = None
    out: str | None = None
    overwrite: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    stream_layers: bool = False
    quality: Level = DEFAULT_LEVEL
    """The quality level ``prune`` was built from (:mod:`prunecomp.levels`); recorded, ``prune`` holds its settings."""
    quality_overridden: dict[str, Any] = Field(default_factory=dict)
    """Fields the user set against the level: ``{field: {"level": ..., "given": ...}}``."""


@dataclass
class JobResult:
    provenance: dict[str, Any]
    report: dict[str, Any]
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)  # dataset -> {dense, pruned}
    out: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)


class Progress:
    """What the job reports while it works; the CLI renders it, tests ignore it."""

    def start(self, label: str, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def step(self, record: StepRecord) -> None: ...
    def message(self, text: str) -> None: ...


def evaluate_perplexities(model: Any, tokenizer: Any, evaluation: EvalConfig, data_dir: str | None,
                          progress: Progress) -> dict[str, float]:
    """Perplexity on every configured corpus."""
    out = {}
    for name in evaluation.datasets:
        windows = evaluation_windows(tokenizer, name, seq_len=evaluation.seq_len,
                                     max_windows=evaluation.max_windows, data_dir=data_dir)
        progress.start(f"perplexity {name}", windows.n)
        out[name] = perplexity(model, windows.ids, batch_size=evaluation.batch_size,
                               on_batch=lambda n: progress.advance(n))
    return out


def _check_windows(model_config: Any, config: JobConfig) -> None:
    check_context(model_config, config.calibration.seq_len, "--calib-seq-len")
    if config.evaluation is not None and config.evaluation.datasets:
        check_context(model_config, config.evaluation.seq_len, "--eval-seq-len")
    if config.prune.refine != "none":
        check_context(model_config, config.calibration.seq_len, "--calib-seq-len (refinement windows)")


def run_job(config: JobConfig, progress: Progress | None = None,
            on_step: Callable[[StepRecord, Any], None] | None = None) -> JobResult:
    """Run the job end to end; nothing is written unless every step succeeded.

    ``stream_layers`` keeps one decoder layer in memory at a time (:mod:`prunecomp.streamed`), for models larger
    than memory; it needs safetensors weights and supports BI/angular with guarded, magnitude or no compensation.
    After pruning, the final check (:mod:`prunecomp.final_check`) compares held-out calibration loss with and
    without what the run folded; the report's ``final_check`` says which was better.
    """
    progress = progress or Progress()
    if config.out:
        check_output(config.out, sources=[config.model], overwrite=config.overwrite)
    if config.stream_layers:
        return _run_streamed(config, progress, on_step)
    times: dict[str, float] = {}
    t = time.perf_counter()
    progress.message(f"loading model {config.model or 'SmolLM2-135M-Instruct (default)'}")
    lm = load_model(config.model, config.revision, allow_pickle=config.allow_pickle,
                    trust_remote_code=config.trust_remote_code)
    if config.out:  # where the source really lies (a hub snapshot, a downloaded s3:// folder)
        check_output(config.out, sources=[lm.source.local_dir], overwrite=config.overwrite)
    check_plan(lm.model, config.prune)  # --layers / --protect against the real depth, before any compute
    _check_windows(lm.model.config, config)
    times["load"] = time.perf_counter() - t
    t = time.perf_counter()
    cal = calibration_windows(lm.tokenizer, config.calibration.source, n_samples=config.calibration.n_samples,
                              seq_len=config.calibration.seq_len, seed=config.calibration.seed,
                              data_dir=config.data_dir)
    times["calibration_data"] = time.perf_counter() - t
    ppl: dict[str, dict[str, float]] = {}
    if config.evaluation is not None:
        t = time.perf_counter()
        for name, value in evaluate_perplexities(lm.model, lm.tokenizer, config.evaluation, config.data_dir,
                                                 progress).items():
            ppl[name] = {"dense": value}
        times["eval_dense"] = time.perf_counter() - t
    t = time.perf_counter()
    batches = -(-cal.n // config.calibration.batch_size)

    progressive = config.prune.refine != "none" and config.prune.refine_at == "each"

    def observe(record: StepRecord, model: Any) -> None:
        progress.step(record)
        if on_step is not None:
            on_step(record, model)
        if progressive:
            progress.message(f"  refining ({config.prune.refine}, {config.prune.refine_steps} steps) before "
                             "the next scoring")
        elif config.prune.refit != "none" and record.step + 1 == config.prune.layers_to_remove(record.step + 1
                                                                                             + record.layers_after):
            progress.message(f"refitting every layer after the first gap to the dense model's streams "
                             f"({config.prune.refit_steps} steps each)")
        else:
            progress.start(f"step {record.step + 2}: scoring layers", batches)

    def refined(done: RefineReport, step: StepRecord | None, _model: Any) -> None:
        if step is not None:
            progress.message(f"  refined: calibration KL to the dense model {done.loss_before:.4f} -> "
                             f"{done.loss_after:.4f} in {done.seconds:.0f} s")
            progress.start(f"step {step.step + 2}: scoring layers", batches)

    progress.start("step 1: scoring layers", batches)
    refine_windows = _fit_windows(config, lm.tokenizer)
    # opened when the refit runs (a GGUF source is loaded a second time): nothing is held while layers are pruned
    dense = None if config.prune.refit == "none" else partial(dense_layers, lm, allow_pickle=config.allow_pickle,
                                                              trust_remote_code=config.trust_remote_code)

    def refitted(done: Any) -> None:
        progress.message(f"  {describe_refit(done.to_dict())}")

    report = compress(lm.model, cal, config.prune, batch_size=config.calibration.batch_size, on_step=observe,
                      on_batch=lambda: progress.advance(1), calibration_config=config.calibration,
                      refine_windows=refine_windows, on_refine=refined, dense=dense, on_refit=refitted)
    times["prune"] = time.perf_counter() - t
    t = time.perf_counter()
    progress.message("final check: held-out calibration loss with and without what was folded")
    check = run_final_check(lm.model, lm.tokenizer, report.recipe(lm.provenance()), config.calibration,
                            config.data_dir,
                            originals=partial(source_layer_weights, lm, allow_pickle=config.allow_pickle,
                                              trust_remote_code=config.trust_remote_code))
    times["final_check"] = time.perf_counter() - t
    if config.evaluation is not None:
        t = time.perf_counter()
        for name, value in evaluate_perplexities(lm.model, lm.tokenizer, config.evaluation, config.data_dir,
                                                 progress).items():
            ppl[name]["pruned"] = value
        times["eval_pruned"] = time.perf_counter() - t
    report_dict = report.to_dict()
    report_dict["final_check"] = None if check is None else check.to_dict()
    report_dict["source"] = lm.provenance()
    report_dict["perplexity"] = ppl
    report_dict["quality"] = _quality(config)
    if config.evaluation is not None:
        report_dict["evaluation"] = config.evaluation.model_dump(mode="json")
    if config.out:
        t = time.perf_counter()
        progress.message(f"saving pruned model to {config.out}")
        save_pruned(lm.model, lm.tokenizer, config.out, report=report_dict,
                    recipe=_recorded(report.recipe(lm.provenance()), config), overwrite=config.overwrite)
        times["save"] = time.perf_counter() - t
    return JobResult(provenance=lm.provenance(), report=report_dict, perplexity=ppl, out=config.out,
                     seconds=times)


def _quality(config: JobConfig) -> dict[str, Any]:
    """The report's record of the level and what the user overrode (the effective settings are its config)."""
    return {"level": config.quality, "overridden": dict(config.quality_overridden)}


def _recorded(recipe: Recipe, config: JobConfig) -> Recipe:
    """The saved recipe also says which quality level the run was built from and what was overridden (metadata:
    not part of the recipe's digest, which covers what the tensors are)."""
    return replace(recipe, config={**recipe.config, "quality": _quality(config)})


def _fit_windows(config: JobConfig, tokenizer: Any) -> TokenWindows | None:
    """The windows refinement, block reconstruction and the refit fit on: ``refine_samples`` windows of the
    calibration source (same seed and length), or None to fit on the calibration windows themselves."""
    p = config.prune
    fits = p.refine != "none" or p.reconstruct != "none" or p.refit != "none"
    if not fits or p.refine_samples is None:
        return None
    return calibration_windows(tokenizer, config.calibration.source, n_samples=p.refine_samples,
                               seq_len=config.calibration.seq_len, seed=config.calibration.seed,
                               data_dir=config.data_dir)


def _run_streamed(config: JobConfig, progress: Progress,
                  on_step: Callable[[StepRecord, Any], None] | None) -> JobResult:
    """:func:`run_job` with the layer-streamed model: same steps, same result shape."""
    from transformers import AutoTokenizer

    from prunecomp.streamed import StreamedModel, check_streamed, streamed_prune

    times: dict[str, float] = {}
    t = time.perf_counter()
    source = resolve_source(config.model, config.revision)
    if source.gguf_file is not None:
        raise PrunecompError("--stream-layers reads safetensors folders; this model is a GGUF file (load it "
                             "without streaming, or convert it with save_pretrained)")
    if config.out:
        check_output(config.out, sources=[source.local_dir], overwrite=config.overwrite)
    progress.message(f"opening {source.uri} layer by layer")
    sm = StreamedModel(source.local_dir)
    check_streamed(sm, config.prune)
    _check_windows(sm.model.config, config)
    tokenizer = AutoTokenizer.from_pretrained(source.local_dir)
    provenance = {"uri": source.uri, "kind": source.kind, "revision": source.revision,
                  "content_hash": content_hash(source), "gguf_file": None,
                  "architecture": type(sm.model).__name__, "streamed": True}
    times["load"] = time.perf_counter() - t
    cal = calibration_windows(tokenizer, config.calibration.source, n_samples=config.calibration.n_samples,
                              seq_len=config.calibration.seq_len, seed=config.calibration.seed,
                              data_dir=config.data_dir)

    def ppl_all() -> dict[str, float]:
        assert config.evaluation is not None
        out = {}
        for name in config.evaluation.datasets:
            windows = evaluation_windows(tokenizer, name, seq_len=config.evaluation.seq_len,
                                         max_windows=config.evaluation.max_windows, data_dir=config.data_dir)
            progress.message(f"perplexity {name} ({windows.n} windows, layer by layer)")
            out[name] = sm.perplexity(windows.ids, batch_size=config.evaluation.batch_size)
        return out

    ppl: dict[str, dict[str, float]] = {}
    if config.evaluation is not None:
        t = time.perf_counter()
        ppl = {name: {"dense": v} for name, v in ppl_all().items()}
        times["eval_dense"] = time.perf_counter() - t

    def observe(record: StepRecord, model: Any) -> None:
        progress.step(record)
        if on_step is not None:
            on_step(record, model)
        if config.prune.refine != "none" and config.prune.refine_at == "each":
            progress.message(f"  refining ({config.prune.refine}, {config.prune.refine_steps} steps) before "
                             "the next scoring")

    def refined(done: RefineReport, step: StepRecord | None, _model: Any) -> None:
        if step is not None:
            progress.message(f"  refined: calibration KL to the dense model {done.loss_before:.4f} -> "
                             f"{done.loss_after:.4f} in {done.seconds:.0f} s")

    fit_on = _fit_windows(config, tokenizer)
    t = time.perf_counter()
    report = streamed_prune(sm, cal.ids, config.prune, batch_size=config.calibration.batch_size, on_step=observe,
                            fit_ids=None if fit_on is None else fit_on.ids)
    report.calibration = {"origin": cal.origin, "digest": cal.digest, "n_samples": cal.n, "seq_len": cal.seq_len,
                          "config": config.calibration.model_dump(mode="json")}
    times["prune"] = time.perf_counter() - t
    t = time.perf_counter()
    progress.message("final check: held-out calibration loss with and without what was folded (layer by layer)")
    check = run_final_check(sm.model, tokenizer, report.recipe(provenance), config.calibration, config.data_dir,
                            nll=partial(sm.mean_nll, batch_size=config.calibration.batch_size), sourced=sm.sourced)
    times["final_check"] = time.perf_counter() - t
    if config.evaluation is not None:
        t = time.perf_counter()
        for name, value in ppl_all().items():
            ppl[name]["pruned"] = value
        times["eval_pruned"] = time.perf_counter() - t
    report_dict = report.to_dict() | {"source": provenance, "perplexity": ppl, "quality": _quality(config),
                                      "final_check": None if check is None else check.to_dict()}
    if config.evaluation is not None:
        report_dict["evaluation"] = config.evaluation.model_dump(mode="json")
    if config.out:
        t = time.perf_counter()
        progress.message(f"saving pruned model to {config.out} layer by layer")
        sm.save(config.out, tokenizer=tokenizer, report=report_dict,
                recipe=_recorded(report.recipe(provenance), config), overwrite=config.overwrite)
        times["save"] = time.perf_counter() - t
    return JobResult(provenance=provenance, report=report_dict, perplexity=ppl, out=config.out, seconds=times)
