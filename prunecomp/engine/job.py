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
from torch import nn

from prunecomp.config import CalibrationConfig, EvalConfig, PruneConfig
from prunecomp.corpora.calibration import (
    TokenWindows,
    calibration_windows,
    check_context,
    evaluation_windows,
)
from prunecomp.engine.compress import compress
from prunecomp.engine.dense import dense_layers, source_layer_weights
from prunecomp.engine.final_check import decision_windows, held_out_config, run_final_check
from prunecomp.engine.loop import check_runs
from prunecomp.errors import PrunecompError
from prunecomp.evaluation.perplexity import perplexity
from prunecomp.levels import DEFAULT_LEVEL, Level
from prunecomp.method.refine import RefineReport
from prunecomp.method.refit import describe_refit
from prunecomp.models.outputs import check_output
from prunecomp.models.sources import content_hash, load_model, resolve_source
from prunecomp.recipes.checkpoint import save_pruned
from prunecomp.recipes.recipe import Recipe
from prunecomp.recipes.report import StepRecord

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
                          progress: Progress, *, streamed: Any = None) -> dict[str, float]:
    """Perplexity on every configured corpus; ``streamed``: a layer-streamed model (``model`` is then its
    skeleton), evaluated one layer at a time."""
    out = {}
    for name in evaluation.datasets:
        windows = evaluation_windows(tokenizer, name, seq_len=evaluation.seq_len,
                                     max_windows=evaluation.max_windows, data_dir=data_dir)
        if streamed is not None:
            progress.message(f"perplexity {name} ({windows.n} windows, layer by layer)")
            out[name] = streamed.perplexity(windows.ids, batch_size=evaluation.batch_size)
            continue
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


@dataclass
class _Held:
    """The model a job works on, however it is held: ``target`` is what the loop prunes (the ``nn.Module``, or the
    :class:`~prunecomp.engine.streamed.StreamedModel`); the rest is what the job needs that depends on how it is
    held."""

    target: Any
    tokenizer: Any
    provenance: dict[str, Any]
    originals: Callable[[dict[int, int]], Any] | None  # in memory: the source's weights of rewritten layers
    save: Callable[..., str]
    dense: Callable[[], Any] | None = None

    @property
    def streamed(self) -> Any:
        """The :class:`~prunecomp.engine.streamed.StreamedModel`, or None in memory."""
        return None if isinstance(self.target, nn.Module) else self.target

    @property
    def model(self) -> Any:
        """The HF model (a skeleton whose layers stay on disk when streamed)."""
        return self.target if self.streamed is None else self.target.model

    @property
    def how(self) -> str:
        """Said in progress messages."""
        return "" if self.streamed is None else " (layer by layer)"


def _open(config: JobConfig, progress: Progress) -> _Held:
    """Load the source in memory, or open it layer by layer (``stream_layers``)."""
    if config.stream_layers:
        from transformers import AutoTokenizer

        from prunecomp.engine.streamed import StreamedModel

        source = resolve_source(config.model, config.revision)
        if source.gguf_file is not None:
            raise PrunecompError("--stream-layers reads safetensors folders; this model is a GGUF file (load it "
                                 "without streaming, or convert it with save_pretrained)")
        if config.out:
            check_output(config.out, sources=[source.local_dir], overwrite=config.overwrite)
        progress.message(f"opening {source.uri} layer by layer")
        sm = StreamedModel(source.local_dir)
        provenance = {"uri": source.uri, "kind": source.kind, "revision": source.revision,
                      "content_hash": content_hash(source), "gguf_file": None,
                      "architecture": type(sm.model).__name__, "streamed": True}
        return _Held(sm, AutoTokenizer.from_pretrained(source.local_dir), provenance, None, partial(sm.save))
    progress.message(f"loading model {config.model or 'SmolLM2-135M-Instruct (default)'}")
    lm = load_model(config.model, config.revision, allow_pickle=config.allow_pickle,
                    trust_remote_code=config.trust_remote_code)
    if config.out:  # where the source really lies (a hub snapshot, a downloaded s3:// folder)
        check_output(config.out, sources=[lm.source.local_dir], overwrite=config.overwrite)
    opened = {"allow_pickle": config.allow_pickle, "trust_remote_code": config.trust_remote_code}
    return _Held(lm.model, lm.tokenizer, lm.provenance(), partial(source_layer_weights, lm, **opened),
                 lambda uri, **kw: save_pruned(lm.model, uri=uri, **kw),
                 # opened when the refit runs (a GGUF source is loaded a second time): nothing held while pruning
                 None if config.prune.refit == "none" else partial(dense_layers, lm, **opened))


def run_job(config: JobConfig, progress: Progress | None = None,
            on_step: Callable[[StepRecord, Any], None] | None = None) -> JobResult:
    """Run the job end to end; nothing is written unless every step succeeded.

    ``stream_layers`` keeps one decoder layer in memory at a time (:mod:`prunecomp.engine.streamed`), for models larger
    than memory; it needs safetensors weights, and stages it cannot run are refused before any work
    (:func:`prunecomp.engine.stages.refusal`). Either way the same loop runs
    (:func:`prunecomp.engine.compress.compress`). After pruning, the final check (:mod:`prunecomp.engine.final_check`)
    compares held-out calibration loss with and without what the run folded; the report's ``final_check`` says which
    was better.
    """
    progress = progress or Progress()
    if config.out:
        check_output(config.out, sources=[config.model], overwrite=config.overwrite)
    times: dict[str, float] = {}
    t = time.perf_counter()
    held = _open(config, progress)
    check_runs(held.target, config.prune)  # the backend's capabilities, --layers / --protect: before any compute
    _check_windows(held.model.config, config)
    times["load"] = time.perf_counter() - t
    t = time.perf_counter()
    cal = calibration_windows(held.tokenizer, config.calibration.source, n_samples=config.calibration.n_samples,
                              seq_len=config.calibration.seq_len, seed=config.calibration.seed,
                              data_dir=config.data_dir)
    times["calibration_data"] = time.perf_counter() - t
    ppl: dict[str, dict[str, float]] = {}
    if config.evaluation is not None:
        t = time.perf_counter()
        for name, value in evaluate_perplexities(held.model, held.tokenizer, config.evaluation, config.data_dir,
                                                 progress, streamed=held.streamed).items():
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
            progress.start(f"step {record.step + 2}: scoring layers{held.how}", batches)

    def refined(done: RefineReport, step: StepRecord | None, _model: Any) -> None:
        if step is not None:
            progress.message(f"  refined: calibration KL to the dense model {done.loss_before:.4f} -> "
                             f"{done.loss_after:.4f} in {done.seconds:.0f} s")
            progress.start(f"step {step.step + 2}: scoring layers", batches)

    def refitted(done: Any) -> None:
        progress.message(f"  {describe_refit(done.to_dict())}")

    progress.start(f"step 1: scoring layers{held.how}", batches)
    report = compress(held.target, cal, config.prune, batch_size=config.calibration.batch_size, on_step=observe,
                      on_batch=lambda: progress.advance(1), calibration_config=config.calibration,
                      refine_windows=_fit_windows(config, held.tokenizer), on_refine=refined, dense=held.dense,
                      on_refit=refitted, check_windows=_decision_windows(config, held.tokenizer))
    times["prune"] = time.perf_counter() - t
    t = time.perf_counter()
    progress.message(f"final check: held-out calibration loss with and without what was folded{held.how}")
    recipe = report.recipe(held.provenance)
    check = run_final_check(held.target, held.tokenizer, recipe, held_out_config(config.calibration, config.prune),
                            config.data_dir, originals=held.originals)
    times["final_check"] = time.perf_counter() - t
    if config.evaluation is not None:
        t = time.perf_counter()
        for name, value in evaluate_perplexities(held.model, held.tokenizer, config.evaluation, config.data_dir,
                                                 progress, streamed=held.streamed).items():
            ppl[name]["pruned"] = value
        times["eval_pruned"] = time.perf_counter() - t
    report_dict = report.to_dict() | {"final_check": None if check is None else check.to_dict(),
                                      "source": held.provenance, "perplexity": ppl, "quality": _quality(config)}
    if config.evaluation is not None:
        report_dict["evaluation"] = config.evaluation.model_dump(mode="json")
    if config.out:
        t = time.perf_counter()
        progress.message(f"saving pruned model to {config.out}{held.how}")
        held.save(config.out, tokenizer=held.tokenizer, report=report_dict, recipe=_recorded(recipe, config),
                  overwrite=config.overwrite)
        times["save"] = time.perf_counter() - t
    return JobResult(provenance=held.provenance, report=report_dict, perplexity=ppl, out=config.out,
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
    if not p.fits or p.refine_samples is None:
        return None
    return calibration_windows(tokenizer, config.calibration.source, n_samples=p.refine_samples,
                               seq_len=config.calibration.seq_len, seed=config.calibration.seed,
                               data_dir=config.data_dir)


def _decision_windows(config: JobConfig, tokenizer: Any) -> TokenWindows | None:
    """The held-out windows on which the gains and the block reconstructions are kept or declined, when the run
    fits either and keeps held-out windows at all: the held-out draw continued after the final check's windows."""
    if not config.prune.decides_held_out or config.calibration.held_out == 0:
        return None
    return decision_windows(tokenizer, held_out_config(config.calibration, config.prune), config.data_dir)
