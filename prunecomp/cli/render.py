"""How results look on a terminal: progress bars, the run summary, the QA table (rich)."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from prunecomp.cli.common import console, out
from prunecomp.engine.final_check import line as final_line
from prunecomp.engine.job import JobResult
from prunecomp.engine.job import Progress as JobProgress
from prunecomp.method.guard import guard_cell, guard_line
from prunecomp.method.reconstruct import describe as describe_reconstruct
from prunecomp.method.refit import describe_refit
from prunecomp.recipes.report import StepRecord


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
        if record.reconstruct is not None:
            console.print(f"  {describe_reconstruct(record.reconstruct)}", highlight=False)

    def message(self, text: str) -> None:
        console.print(text, highlight=False)


def print_summary(result: JobResult) -> None:
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
    local = [(s["step"] + 1, s["reconstruct"]) for s in report["steps"] if s.get("reconstruct")]
    if local:
        out.print(f"Reconstructed beside each gap ({local[0][1]['side']}, {local[0][1]['steps']} steps each, "
                  "relative error of the stream the removed layer left): "
                  + ", ".join(f"step {n} layers {r['layers']} {r['loss_before']:.4f} -> {r['loss_after']:.4f}"
                              + _held_out_fit(r) for n, r in local)
                  + f" in {sum(r['seconds'] for _, r in local):.0f} s")
    fits = [(s["step"] + 1, s["refine"]) for s in report["steps"] if s.get("refine")]
    if fits:
        first = fits[0][1]
        out.print(f"Refined after each removal ({first['mode']}, {first['steps']} steps each, "
                  f"{first['parameters']} gains folded): calibration KL to the dense model "
                  + ", ".join(f"step {n} {f['loss_before']:.4f} -> {f['loss_after']:.4f}{held_out_decision(f)}"
                              for n, f in fits)
                  + f" in {sum(f['seconds'] for _, f in fits):.0f} s")
    if report.get("refit"):
        text = describe_refit(report["refit"])
        out.print(text[0].upper() + text[1:], highlight=False)
    check = report.get("final_check")
    if check:
        out.print(("[bold red]" if check["verdict"] == "worse" else "") + escape(final_line(check)))
    refined = report.get("refine")
    if refined:
        gains = "folded into the weights" if refined.get("kept", True) else "fitted"
        out.print(f"Refined ({refined['mode']}, {refined['steps']} steps, {refined.get('loss', 'topk')} loss, "
                  f"{refined['parameters']} gains {gains}): calibration KL to the dense model"
                  f"{on_windows(refined)} {refined['loss_before']:.4f} -> "
                  f"{refined['loss_after']:.4f} in {refined['seconds']:.0f} s{held_out_decision(refined)}")
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


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _retained_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def eval_table(res: dict[str, Any]) -> Table:
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


def eval_notes(res: dict[str, Any]) -> list[str]:
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


def on_windows(refined: dict) -> str:
    """" on N windows" when the report says how many windows its loss was measured on (reports of older versions
    measured it on every fitting window and do not say)."""
    n = refined.get("loss_windows")
    return f" on {n} windows" if n else ""


def _held_out_fit(rec: dict[str, Any]) -> str:
    """A block reconstruction's held-out verdict for the summary ("" when it was not checked)."""
    n, before, after = rec.get("check_windows"), rec.get("check_loss_before"), rec.get("check_loss_after")
    if not n:
        return "" if rec.get("kept", True) else " [bold red]declined[/]"
    if rec.get("kept", True):
        return f" (held-out {before:.4f} -> {after:.4f})"
    if after is None:
        return " [bold red]declined[/]"
    return f" [bold red]declined[/]: held-out {before:.4f} -> {after:.4f}"


def held_out_decision(refined: dict) -> str:
    """What the gains' held-out decision said ("" when the fit was not checked): kept or declined, and the
    next-token NLL on the held-out windows without and with the gains."""
    n, before, after = refined.get("check_windows"), refined.get("check_loss_before"), refined.get("check_loss_after")
    if not n or before is None or after is None:
        return ""
    if refined.get("kept", True):
        return f"; held-out NLL {before:.4f} -> {after:.4f} on {n} windows: kept"
    return (f"; [bold red]declined[/]: held-out NLL {after:.4f} with the gains vs {before:.4f} without on {n} "
            "windows, nothing folded")


def effective_config(doc: dict[str, Any], level: str, overridden: dict[str, Any]) -> str:
    """The effective configuration, printed at the start of ``prune`` and ``run``: one line per section (flow
    style, wrapped), the pruning settings one line per stage of the configuration tree
    (:meth:`~prunecomp.config.PruneConfig.tree`), headed by the quality level and what the flags overrode, so a log
    says what ran."""
    import textwrap

    import yaml

    from prunecomp.config import PruneConfig
    from prunecomp.levels import describe
    from prunecomp.models.redact import redact_all

    def wrap(key: str, value: Any) -> list[str]:
        text = yaml.safe_dump({key: value}, default_flow_style=True, width=10**6, sort_keys=False).strip()
        return textwrap.wrap(text.removeprefix("{").removesuffix("}"), width=116, initial_indent="  ",
                             subsequent_indent="      ", break_on_hyphens=False)

    lines = [f"configuration ({describe(level, overridden)}):"]
    for key, value in redact_all(doc).items():
        if key in ("quality", "quality_overridden"):
            continue
        if key != "prune" or not isinstance(value, dict):
            lines += wrap(key, value)
            continue
        off = []  # the method's stages, one line each; a stage that is off is named once, not spelled out
        for stage, settings in PruneConfig.model_validate(value).tree().items():
            if settings.get("method") == "none" and stage not in ("compensation",):
                off.append(stage)
            else:
                lines += wrap(f"prune.{stage}", settings)
        if off:
            lines.append(f"  prune, off: {', '.join(off)}")
    return "\n".join(lines)
