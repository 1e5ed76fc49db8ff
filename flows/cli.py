"""``prunecomp`` CLI: the library's commands plus the pipeline ones (``run``, ``resume``, ``status``, ``promote``,
``evaluate``), which run the Prefect flows.

Embedded defaults: with no Prefect server configured (``PREFECT_API_URL`` unset), each command starts Prefect's
temporary local server with its home under ``$PRUNECOMP_HOME/prefect`` (default ``./.prunecomp/prefect``); MLflow
uses ``sqlite:///$PRUNECOMP_HOME/mlflow.db``; files go to ``$PRUNECOMP_HOME/store``. Prefect reads its settings
when it is first imported, so they are set here, before that import, and only when the user has not set them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.run_config import build_config, csv
from prunecomp.cli import main as _lib
from prunecomp.cli import pruning_options, quiet_environment
from prunecomp.cli import user_errors as _errors
from prunecomp.cli.options import StagedCommand
from prunecomp.cli.parameters import load_config_file
from prunecomp.cli.render import effective_config, held_out_decision, on_windows
from prunecomp.engine.final_check import line as final_line
from prunecomp.errors import PrunecompError
from prunecomp.method.guard import guard_cell

__all__ = ["main"]

err = Console(stderr=True)
out = Console(soft_wrap=True)  # paths and URIs stay copyable on one line


@click.group(context_settings=dict(_lib.context_settings), help=_lib.help)
def main() -> None:
    """The library's commands (``prune``, ``apply``, ``eval``...) and the pipeline's (``run``, ``status``...)."""
    quiet_environment()
    if _lib.callback is not None:
        _lib.callback()


for _name, _command in _lib.commands.items():  # a group of its own: the library's group is left as it is
    main.add_command(_command, _name)


def _embedded_defaults() -> None:
    """Point Prefect at one local directory unless the user configured a server or a home of their own."""
    home = Path(os.environ.get("PRUNECOMP_HOME") or ".prunecomp").expanduser().resolve()
    if not os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_HOME"):
        (home / "prefect").mkdir(parents=True, exist_ok=True)  # Prefect creates its home without parents
        os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # too late if Prefect was
    # imported already: the console script (flows.entry) sets it first
    for key, value in (("DO_NOT_TRACK", "true"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                       ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("TQDM_DISABLE", "1"),
                       ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)


def _where_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--store", default=None, help="Checkpoints and caches: local folder or s3:// URL "
                     "(default $PRUNECOMP_STORE, else $PRUNECOMP_HOME/store)."),
        click.option("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, "
                     "else sqlite under $PRUNECOMP_HOME)."),
    ]):
        fn = option(fn)
    return fn


def _run_flow(config: Any, json_out: str | None, runner: str | None = None, *,
              overwrite: bool = False) -> dict[str, Any]:
    from prunecomp.models.outputs import check_file_output, write_output_json

    if json_out:  # before the run: a bad path costs an error line, not the run
        check_file_output(json_out, sources=[config.model], overwrite=overwrite)
    _embedded_defaults()
    from flows.compress import compress
    from flows.runners import task_runner

    err.print(f"run [bold]{config.run_id()}[/] (re-run the same command, or `prunecomp resume "
              f"{config.run_id()}`, to resume it)", highlight=False)
    err.print(escape(effective_config(config.model_dump(mode="json", exclude={"tracking"}), config.quality,
                                      config.quality_overridden)), highlight=False)
    options: dict[str, Any] = {"flow_run_name": config.run_id()}
    if runner is not None or config.parallel_candidates > 1:
        options["task_runner"] = task_runner(runner, config.parallel_candidates)
    summary = compress.with_options(**options)(config=config)
    _print_summary(summary)
    if json_out:
        write_output_json(json_out, summary, "run-summary")
    return summary


def _mean(d: dict[str, float] | None) -> str:
    return f"{sum(d.values()) / len(d):.3f}" if d else "-"


def _print_summary(summary: dict[str, Any]) -> None:
    steps = Table(title=f"Run {summary['run_id']}: removed layers (original indices)")
    for col in ("step", "layer", "score", "measured s", "folded", "guard", "quick ppl before", "quick ppl after",
                "time (s)", "cached"):
        steps.add_column(col, justify="right")
    for s in summary["steps"]:
        rec = s["record"]
        score = rec["scores"].get(str(rec["chosen"]))
        steps.add_row(str(rec["step"] + 1), str(rec["chosen"]) + ("" if s["kept"] else " (not kept)"),
                      "-" if score is None else f"{score:.4g}", f"{rec['measured_scale']:.4f}",
                      f"{rec['applied_scale']:.4f}", guard_cell(rec.get("guard")),
                      _mean(s["ppl_before"]), _mean(s["ppl_after"]), f"{rec['seconds']:.1f}",
                      "yes" if s["reused"] else "")
    out.print(steps)
    fits = [(f"after step {s['record']['step'] + 1}", s["refine"]) for s in summary["steps"] if s.get("refine")]
    if summary.get("refine"):
        fits.append(("after the last step", summary["refine"]))
    for when, fit in fits:
        r = fit["report"]
        out.print(f"refined {when} ({r['mode']}, {r['steps']} steps, {r.get('loss', 'topk')} loss): calibration KL "
                  f"to the dense model{on_windows(r)} {r['loss_before']:.4f} -> {r['loss_after']:.4f}, "
                  f"quick ppl {_mean(fit['ppl_before'])} -> "
                  f"{_mean(fit['ppl_after'])}{' (cached)' if fit['reused'] else ''}{held_out_decision(r)}",
                  highlight=False)
    check = summary.get("final_check")
    if check:
        out.print(("[bold red]" if check["verdict"] == "worse" else "") + final_line(check), highlight=False)
    if summary["perplexity"]:
        table = Table(title="Perplexity before/after")
        for col in ("dataset", "dense", "pruned", "ratio"):
            table.add_column(col, justify="right")
        for name, v in summary["perplexity"].items():
            table.add_row(name, f"{v['dense']:.2f}", f"{v['pruned']:.2f}", f"{v['pruned'] / v['dense']:.2f}x")
        out.print(table)
    out.print(f"stopped: {summary['stop_reason']}; steps reused {summary['steps_reused']}, computed "
              f"{summary['steps_computed']}; {summary['seconds']:.1f} s")
    out.print(f"final model (with its recipe.json): {summary['final']['uri']}")
    out.print(f"run dir (report.json, run.json): {summary['run_dir']}")
    tracking = summary["tracking_uri"]
    if summary.get("mlflow"):
        m = summary["mlflow"]
        out.print(f"MLflow: {tracking} run {m['run_id']}, registered model {m['name']} version {m['version']} "
                  f"(alias candidate)  ->  mlflow ui --backend-store-uri {tracking}")
    out.print(f"Prefect: {os.environ.get('PREFECT_API_URL') or 'temporary server, home ' + os.environ['PREFECT_HOME']}"
              " (prefect server start, then open the UI, to browse the flow runs and artifacts)")


@main.command("run", cls=StagedCommand)
@click.option("--config", default=None, help="YAML/JSON file of compress parameters (deployments/configs/*.yaml); "
              "the options below that you give replace its entries (flags win); unknown keys are errors.")
@pruning_options
@click.option("--parallel-candidates", type=int, default=1, show_default=True,
              help="Split PPL-on-skip candidate scoring into N tasks run by --task-runner.")
@click.option("--task-runner", default=None, help="threads (default), dask (local cluster of "
              "--parallel-candidates worker processes) or dask:<scheduler address> (also $PRUNECOMP_TASK_RUNNER).")
@click.option("--stream-layers/--no-stream-layers", default=None, help="One decoder layer in memory at a time "
              "(models larger than memory; safetensors; BI/angular, magnitude or no compensation). Default: "
              "automatic, when the weights do not fit the memory budget.")
@click.option("--quick-datasets", default="wikitext2", show_default=True, help="Per-step perplexity ('' = off).")
@click.option("--quick-max-windows", type=int, default=8, show_default=True)
@click.option("--max-ppl-ratio", type=float, default=None, help="Quality floor: stop when the quick perplexity "
              "exceeds this multiple of the dense one.")
@click.option("--qa-tasks", default=None, help="lm-eval tasks for the final evaluation (comma-separated).")
@click.option("--qa-limit", type=int, default=None)
@click.option("--registered-model", default=None, help="MLflow registered model (default prunecomp-<model>-adhoc; "
              "the deployments register under their own names).")
@click.option("--register/--no-register", default=True, show_default=True)
@click.option("--run-name", default=None, help="Run id (default: derived from the parameters).")
@click.option("--overwrite", is_flag=True, help="Replace a JSON file prunecomp wrote earlier at --json.")
@_where_options
@_errors
def run_cmd(json_out: str | None, task_runner: str | None, overwrite: bool, **kw: Any) -> None:
    """Run the compress flow end to end (cached, resumable): default SmolLM2-135M, k=5, BI, Prune&Comp, cpu
    preset. Prints perplexity before/after and where to look."""
    _run_flow(build_config(kw), json_out, task_runner, overwrite=overwrite)


def _journal(run: str, store: str | None) -> dict[str, Any]:
    from flows.journal import journal_uri
    from tasks.files import read_json
    from tasks.settings import configure_s3, locations, redact

    configure_s3()
    loc = locations(store)
    try:
        return dict(read_json(journal_uri(loc, run)))
    except FileNotFoundError as exc:
        raise PrunecompError(f"no run {run!r} in {redact(loc.store)} (see `prunecomp status`)") from exc


@main.command("resume")
@click.argument("run")
@click.option("--json", "json_out", default=None, help="Also write the run's summary as JSON to this path.")
@click.option("--overwrite", is_flag=True, help="Replace a JSON file prunecomp wrote earlier at --json.")
@click.option("--allow-pickle", is_flag=True, help="Needed again when RUN was started with it: the journal, in a "
              "possibly shared store, does not grant it.")
@click.option("--trust-remote-code", is_flag=True, help="Needed again when RUN was started with it, as "
              "--allow-pickle.")
@_where_options
@_errors
def resume_cmd(run: str, store: str | None, tracking_uri: str | None, json_out: str | None, overwrite: bool,
               allow_pickle: bool, trust_remote_code: bool) -> None:
    """Finish RUN with the parameters it was started with: finished steps come from the cache. A run started with
    --allow-pickle or --trust-remote-code needs the same flag again."""
    _run_flow(resume_config(_journal(run, store), tracking_uri, allow_pickle=allow_pickle,
                            trust_remote_code=trust_remote_code), json_out, overwrite=overwrite)


# options that let a model run code of its own: a resume must be asked for them again, never read them from a
# journal that anyone with write access to the store could have edited
_CODE_FLAGS = {"allow_pickle": "--allow-pickle", "trust_remote_code": "--trust-remote-code"}


def resume_config(journal: dict[str, Any], tracking_uri: str | None = None, *, allow_pickle: bool = False,
                  trust_remote_code: bool = False) -> Any:
    """The parameters a run was started with, pinned to the store its journal was found in (a run started with
    ``$PRUNECOMP_STORE`` has no store in its parameters: resumed from another shell it must not start over in the
    default store).

    ``allow_pickle`` / ``trust_remote_code`` are the resume command's own flags: a journal that records either
    option is refused unless the same flag is given again, since the journal lies in a store others may write
    (a flag the journal does not record changes nothing: the run keeps its parameters, hence its id)."""
    from flows.params import CompressConfig

    config = CompressConfig.model_validate(journal["config"])
    given = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    missing = [flag for name, flag in _CODE_FLAGS.items() if getattr(config, name) and not given[name]]
    if missing:
        run = journal.get("run_id") or config.run_id()
        raise PrunecompError(
            f"run {run!r} was started with {' and '.join(missing)}, which {'lets' if len(missing) == 1 else 'let'} "
            "the model run code of its own; a "
            f"resume does not take that from the run's journal: resume with `prunecomp resume {run} "
            f"{' '.join(missing)}` if you trust the model")
    update: dict[str, Any] = {}
    if config.tracking.store is None and journal.get("store"):
        update["store"] = journal["store"]
    if tracking_uri:
        update["tracking_uri"] = tracking_uri
    return config.model_copy(update={"tracking": config.tracking.model_copy(update=update)}) if update else config


@main.command("status")
@click.argument("run", required=False)
@_where_options
@_errors
def status_cmd(run: str | None, store: str | None, tracking_uri: str | None) -> None:
    """What RUN has done and what is cached (its checkpoints still in the store); without RUN, list runs."""
    from prunecomp.models.storage import is_complete
    from tasks.files import list_dirs
    from tasks.settings import locations

    if run is None:
        loc = locations(store)
        table = Table(title=f"Runs in {loc.store}")
        for col in ("run", "status", "steps done", "registered"):
            table.add_column(col)
        for name in list_dirs(loc.child("runs")):
            try:
                j = _journal(name, store)
            except PrunecompError:
                continue
            m = j.get("mlflow") or {}
            table.add_row(name, j["status"], str(len(j["steps"])), f"{m['name']} v{m['version']}" if m else "")
        out.print(table)
        return
    j = _journal(run, store)
    out.print(f"run {run}: {j['status']}" + (f" ({j['stop_reason']})" if j.get("stop_reason") else ""))
    k = j["config"]["prune"]["n_layers"] or f"fraction {j['config']['prune']['fraction']}"
    table = Table(title=f"Steps (of {k})")
    for col in ("step", "removed layer", "scale s", "recipe part (store/steps/...)", "cached"):
        table.add_column(col)
    for s in j["steps"]:
        rec = s["record"]
        cached = "yes" if is_complete(s["uri"]) else "no (will be recomputed)"
        if s.get("refine"):  # progressive refinement: the fit after this step is a part of its own
            cached += "; its fit " + ("yes" if is_complete(s["refine"]["uri"]) else "no (will be recomputed)")
        table.add_row(str(rec["step"] + 1), str(rec["chosen"]), f"{rec['applied_scale']:.4f}", s["uri"].rsplit("/")[-1],
                      cached)
    out.print(table)
    if j["status"] != "completed":
        out.print(f"resume with: prunecomp resume {run}")
    if j.get("mlflow"):
        m = j["mlflow"]
        out.print(f"registered: {m['name']} version {m['version']} (MLflow run {m['run_id']})")


@main.command("promote")
@click.argument("registered_model")
@click.option("--version", default=None, help="Version to promote (default: the newest).")
@click.option("--alias", default="champion", show_default=True)
@click.option("--gates", "gates_file", default=None, help="YAML file with a `gates:` list (default gates: mean "
              "perplexity ratio <= 3, QA retained >= 0.9 when measured, beats the champion's mean perplexity, the "
              "run's folds not worse than plain removal on held-out calibration windows).")
@click.option("--tracking-uri", default=None)
@_errors
def promote_cmd(registered_model: str, version: str | None, alias: str, gates_file: str | None,
                tracking_uri: str | None) -> None:
    """Move ALIAS (champion) to a version of REGISTERED_MODEL when every gate passes."""
    from flows.params import PromoteConfig

    params: dict[str, Any] = {"registered_model": registered_model, "version": version, "alias": alias,
                              "tracking_uri": tracking_uri}
    if gates_file:
        params["gates"] = load_config_file(gates_file).get("gates")
    config = PromoteConfig.model_validate(params)
    _embedded_defaults()
    from flows.promote import promote

    result = promote(config=config)
    for r in result["decision"]["results"]:
        out.print(f"  {'pass' if r['passed'] else 'FAIL'} {r['name']}: {r['detail']}", highlight=False)
    out.print(f"{result['name']} version {result['version']} is {result['alias']}"
              + ("" if result["changed"] else " (already; nothing changed)"))


@main.command("evaluate")
@click.argument("checkpoint")
@click.option("--datasets", default="wikitext2,c4,ptb", show_default=True)
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--max-windows", type=int, default=40, show_default=True)
@click.option("--qa-tasks", default=None)
@click.option("--data-dir", default=None)
@_where_options
@_errors
def evaluate_cmd(checkpoint: str, datasets: str, seq_len: int, max_windows: int, qa_tasks: str | None,
                 data_dir: str | None, store: str | None, tracking_uri: str | None) -> None:
    """Evaluate CHECKPOINT (path, s3:// URL, models:/name/version or models:/name@alias) through the cache."""
    from flows.params import EvaluateConfig

    config = EvaluateConfig.model_validate({
        "checkpoint": checkpoint, "data_dir": data_dir, "qa_tasks": csv(qa_tasks),
        "evaluation": {"datasets": csv(datasets), "seq_len": seq_len, "max_windows": max_windows},
        "tracking": {"store": store, "tracking_uri": tracking_uri}})
    _embedded_defaults()
    from flows.evaluate import evaluate

    result = evaluate(config=config)
    table = Table(title=f"Perplexity of {result['checkpoint']}")
    table.add_column("dataset")
    table.add_column("perplexity", justify="right")
    for name, value in result["perplexity"].items():
        table.add_row(name, f"{value:.3f}")
    out.print(table)
