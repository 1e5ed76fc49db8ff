"""Generate docs/RESULTS.md: every measured table, rendered from the JSON and markdown the benchmarks wrote under
bench/results/ (never typed by hand). The README and docs/BENCHMARKS.md quote these numbers and link here.

    .venv/bin/python bench/results_doc.py            # rewrite docs/RESULTS.md
    .venv/bin/python bench/results_doc.py --check    # exit 1 when docs/RESULTS.md is out of date

The words of the quality tables have one definition each (docs/EVALUATION.md), and one piece of code each here:

* naive (:func:`naive_for`): the same metric and mode with ``--compensation none``, on the same protocol. Every
  variant of the quality benchmark is iterative except ``one-shot``, which is its own (one-shot) naive row.
* recovered (:func:`recovered`, defined in bench/measures.py): ``100 * (naive - x) / (naive - dense)`` of mean
  perplexity.
* best (:func:`best_within_budget`): the lowest mean perplexity over the measured rows whose recorded fitting
  seconds are within :data:`BUDGET` at that k. Where several files measured the same row, every one is a
  candidate: nothing is kept or dropped by the order the files are read in.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measures import recovered  # bench/ is on the path just above

RESULTS = Path(__file__).resolve().parent / "results"
OUT = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"

QUALITY = ("quality_c", "quality_a2")
GUARDED = ("quality_guarded", "quality_guarded_tp", "quality_guarded_block", "quality_guarded_ppl")
ANCHORS = ("quality_anchors",)
REFINED = ("quality_refine_k38", "quality_refine_select", "quality_refine_metrics", "quality_refine_mag",
           "quality_refine_taylor_k3", "quality_refine_taylor_k8", "quality_refine_guarded", "quality_refine_starts",
           "quality_refine_lsq", "quality_qa100", "quality_reconstruct", "quality_reconstruct_s128",
           "quality_reconstruct_s256", "quality_refit64", "quality_refit100", "quality_refit100_gains",
           "quality_refit128_k3", "quality_tail64", "quality_tail128", "quality_tail128_lr5",
           "quality_tail128_s200", "quality_tail128_rlr2", "quality_tail128_s150", "quality_tail128_rlr3",
           "quality_tail128_rlr2_s140", "quality_tail64_rlr3", "quality_balanced_tail64")

LEVEL_SEEDS = "quality_levels_s*.json"
OTHER_MODELS = "levels_*.json"
"""The levels over seeds on other models than SmolLM2 (``bench/quality.py --model ... --levels``), one file each."""
"""The quality protocol per calibration seed (``bench/quality.py --levels fast,balanced,best --seeds N``, one file
per process), rendered as one table: the levels' measured table, mean and worst over the seeds."""

BUDGET = {3: 2 * 867.0, 5: 2 * 721.0, 8: 2 * 788.0}
"""Seconds per k (one CPU thread): twice the measured seconds of the end-of-run gains alone (80 Adam steps on 64
windows: variant ``refine`` at k = 3 and 8 in ``quality_refine_k38.json``, ``refine-guarded`` at k = 5 in
``quality_refine_starts.json``)."""

LEVELS = (  # level, flag, (result file, variant) that measured it with the level's own settings
    ("fast", "`--quality fast` (the default)", "quality_guarded", "guarded"),
    ("balanced", "`--quality balanced`", "quality_balanced_tail64", "refine-guarded"),
    ("best", "`--quality best`", "quality_tail64", "refine-reconstruct"),
)
"""The rows that measured each level of ``prunecomp/levels.py`` on the quality protocol (8 scoring windows, so
the levels fit on max(64, 8) = 64 windows)."""

MARKDOWN = {  # bench/results/<name>.md, written by the benchmark scripts themselves
    "pipeline_scale": "Pipeline at scale (`bench/pipeline_scale.py`, 0.92 B synthetic model)",
    "pipeline_scale_refine": "Pipeline at scale with progressive refinement (`bench/pipeline_scale.py --refine-only`, "
                             "0.92 B synthetic model, `topk` loss)",
    "pipeline_scale_refine_tail": "The same with the `tail` loss (`bench/pipeline_scale.py --refine-only`, "
                                  "0.92 B synthetic model)",
    "pipeline_scale_refine_lsq": "The same with lsq gap maps (`bench/pipeline_scale.py --refine-only --compensation "
                                 "lsq`, 0.92 B synthetic model)",
    "pipeline_scale_reconstruct": "Pipeline at scale with block reconstruction (`bench/pipeline_scale.py "
                                  "--reconstruct-only`, 0.92 B synthetic model)",
    "pipeline_scale_refit": "Pipeline at scale with the sequential refit (`bench/pipeline_scale.py --refit-only`, "
                            "0.92 B synthetic model)",
    "pipeline_scale_7B": "Pipeline at scale, 6.9 B synthetic model larger than RAM (`bench/pipeline_scale.py`)",
    "resume": "Kill and resume (`bench/resume.py`)",
    "memory": "Memory of the three scoring modes (`bench/memory.py`)",
    "scoring": "Scoring cost per metric (`bench/scoring.py`)",
    "speed": "Speed (`bench/speed.py`)",
    "wikitext2_protocol": "Refinement on the WikiText-2 protocol (`wikitext2_protocol.json`: 16 windows of WikiText-2 "
                          "only)",
}

ONE_SHOT = "one-shot"
NAIVE_ITERATIVE = "iterative"  # bench/quality.py's name for iterative removal with --compensation none
NOT_OURS = ("replaceme", "linearpatch")  # the published anchors: other methods, never a prunecomp "best"


@dataclass(frozen=True)
class Row:
    """One measured model: a (metric, variant, k) of one result file, or the state before its gains."""

    file: str
    metric: str
    variant: str
    k: int
    ppl: float
    removed: tuple[int, ...]
    seconds: float | None  # pruning (with reconstruction and refit) + gains, one thread; None: not recorded
    how: str  # settings that tell this row from others of the same variant
    record: dict[str, Any]


def _load(names: tuple[str, ...]) -> list[tuple[str, dict]]:
    return [(n, json.loads((RESULTS / f"{n}.json").read_text())) for n in names if (RESULTS / f"{n}.json").is_file()]


def _how(settings: dict[str, Any], variant: str, r: dict[str, Any]) -> str:
    parts = []
    if "reconstruct" in variant:
        parts.append(f"reconstruct {settings.get('reconstruct')} {settings.get('reconstruct_steps')} steps"
                     + (f" lr {settings['reconstruct_lr']:g}" if settings.get("reconstruct_lr", 1e-3) != 1e-3 else ""))
    if r.get("refit"):
        parts.append(f"refit {r['refit']['steps']} steps")
    if "refine" in variant or "reconstruct" in variant or "refit" in variant:
        parts.append(f"{settings.get('refine_samples')} windows")
    if r.get("refine"):  # rows older than the tail loss record no refine_loss: theirs was topk
        gains = f"gains {settings.get('refine_loss', 'topk')} loss"
        if settings.get("refine_lr", 3e-3) != 3e-3:
            gains += f" lr {settings['refine_lr']:g}"
        parts.append(gains)
    return ", ".join(parts) or "-"


def rows(results: list[tuple[str, dict]]) -> list[Row]:
    """Every measured model of ``results``: each (metric, variant, k) record, plus, for a fitted record that keeps
    the perplexity before its gains (``unrefined``) and its pruning time, that earlier state as a row of its own
    (variant without the ``refine-`` prefix, seconds without the gains)."""
    out = []
    for name, result in results:
        st = result["settings"]
        for metric, per in result["metrics"].items():
            for variant, v in per.items():
                for k, r in v["results"].items():
                    prune = r.get("prune_seconds")
                    if prune is not None and r.get("refit"):
                        prune += r["refit"]["seconds"]
                    gains = (r.get("refine") or {}).get("seconds", 0.0)
                    removed = tuple(sorted(r["removed"]))
                    if prune is not None and r.get("unrefined") and variant.startswith("refine-"):
                        before = variant.removeprefix("refine-")
                        out.append(Row(name, metric, before, int(k), float(r["unrefined"]["mean"]), removed, prune,
                                       _how(st, before, {**r, "refine": None}), r))
                    out.append(Row(name, metric, variant, int(k), float(r["ppl"]["mean"]), removed,
                                   None if prune is None else prune + gains, _how(st, variant, r), r))
    return out


def lowest(all_rows: list[Row]) -> dict[tuple[str, str, int], Row]:
    """(metric, variant, k) -> the row with the lowest mean perplexity among the files that measured it."""
    out: dict[tuple[str, str, int], Row] = {}
    for r in all_rows:
        key = (r.metric, r.variant, r.k)
        if key not in out or r.ppl < out[key].ppl:
            out[key] = r
    return out


def naive_for(table: dict[tuple[str, str, int], Row], metric: str, variant: str, k: int) -> Row | None:
    """The naive row of ``variant``: the same metric and mode with ``--compensation none``."""
    if variant in NOT_OURS:
        return None
    return table.get((metric, ONE_SHOT if variant == ONE_SHOT else NAIVE_ITERATIVE, k))


def best_within_budget(all_rows: list[Row], k: int, budget: dict[int, float] = BUDGET) -> Row | None:
    """The lowest mean perplexity over prunecomp's measured rows at ``k`` whose recorded seconds are within
    ``budget[k]`` (rows without a recorded time are not candidates)."""
    fits = [r for r in all_rows if r.k == k and r.variant not in NOT_OURS and r.seconds is not None
            and k in budget and r.seconds <= budget[k]]
    return min(fits, key=lambda r: r.ppl, default=None)


def _rec(table: dict[tuple[str, str, int], Row], r: Row, dense: float) -> str:
    n = naive_for(table, r.metric, r.variant, r.k)
    return "-" if n is None else f"{recovered(r.ppl, n.ppl, dense):.1f}%"


def _s(seconds: float | None) -> str:
    return "not recorded" if seconds is None else f"{seconds:.0f}"


def _pct(new: float, old: float) -> str:
    return f"{100 * (new / old - 1):+.0f}%"


def level_rows(all_rows: list[Row]) -> dict[str, dict[int, Row] | None]:
    """Level -> k -> its measured row (None: the level's file does not exist yet)."""
    out: dict[str, dict[int, Row] | None] = {}
    for level, _flag, name, variant in LEVELS:
        got = {r.k: r for r in all_rows if r.file == name and r.variant == variant and r.metric == "bi"}
        out[level] = got or None
    return out


def levels_table(all_rows: list[Row], table: dict[tuple[str, str, int], Row], dense: float) -> str:
    ks = (3, 5, 8)
    lines = ["| level | flag | measured in | " + " | ".join(f"k = {k}: mean PPL (recovered), seconds" for k in ks)
             + " |", "|---|---|---|" + "---:|" * len(ks)]
    naive = [table.get(("bi", NAIVE_ITERATIVE, k)) for k in ks]
    files = ", ".join(sorted({f"`{n.file}.json`" for n in naive if n is not None}))
    lines.append(f"| naive | `--compensation none` | {files}, `iterative` | "
                 + " | ".join("-" if n is None else f"{n.ppl:.2f}" for n in naive) + " |")
    measured = level_rows(all_rows)
    for level, flag, name, variant in LEVELS:
        got = measured[level]
        if got is None:
            lines.append(f"| {level} | {flag} | not yet measured (`{name}.json`, `{variant}`) | "
                         + " | ".join("not yet measured" for _ in ks) + " |")
            continue
        cells = []
        for k in ks:
            r = got.get(k)
            cells.append("not yet measured" if r is None else
                         f"{r.ppl:.2f} ({_rec(table, r, dense)}), {_s(r.seconds)}")
        lines.append(f"| {level} | {flag} | `{name}.json`, `{variant}` | " + " | ".join(cells) + " |")
    lines += ["", "BI, the quality protocol (dense mean PPL "
              f"{dense:.2f}). Seconds: pruning (with any reconstruction) plus the gains, one CPU thread per run on a "
              "shared 2-core machine (the load of each run: BENCHMARKS.md); the guarded runs recorded no time."]
    return "\n".join(lines)


def best_table(all_rows: list[Row], table: dict[tuple[str, str, int], Row], dense: float) -> str:
    lines = ["| k | budget s | best mean PPL | recovered | seconds | file | variant | settings | removed | "
             "lower rows outside the budget |", "|---:|---:|---:|---:|---:|---|---|---|---|---|"]
    for k in sorted(BUDGET):
        best = best_within_budget(all_rows, k)
        if best is None:
            lines.append(f"| {k} | {BUDGET[k]:.0f} | - | - | - | - | - | - | - | - |")
            continue
        over = sorted((r for r in all_rows if r.k == k and r.variant not in NOT_OURS and r.ppl < best.ppl),
                      key=lambda r: r.ppl)
        over_cell = "; ".join(f"{r.ppl:.2f} in {_s(r.seconds)} s (`{r.file}`)" for r in over) or "none"
        lines.append(f"| {k} | {BUDGET[k]:.0f} | {best.ppl:.2f} | {_rec(table, best, dense)} | {_s(best.seconds)} | "
                     f"`{best.file}.json` | {best.variant} | {best.how} | {list(best.removed)} | {over_cell} |")
    lines += ["", "Best = the lowest mean perplexity over every measured row (below) whose recorded seconds are "
              "within the budget; rows without a recorded time are not candidates. Budget = twice the seconds of "
              "the end-of-run gains alone (80 steps on 64 windows), one CPU thread."]
    return "\n".join(lines)


def guard_table(table: dict[tuple[str, str, int], Row], dense: float) -> str:
    lines = ["| metric | k | naive | paper | guarded (default) | its layers, nothing folded | paper recovered | "
             "guarded recovered | guarded <= its layers unfolded |", "|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    worse = 0
    for metric, k in sorted({(m, k) for (m, v, k) in table if v == "guarded"},
                            key=lambda mk: (("bi", "angular", "mag", "taylor", "block", "ppl").index(mk[0])
                                            if mk[0] in ("bi", "angular", "mag", "taylor", "block", "ppl") else 9,
                                            mk[1])):
        guarded, paper = table[(metric, "guarded", k)], table.get((metric, "prune&comp", k))
        naive = naive_for(table, metric, "guarded", k)
        if naive is None:
            continue
        same = (guarded.record.get("same_layers_naive") or {}).get("mean")
        ok = same is None or guarded.ppl <= same
        worse += not ok
        cells = [f"{naive.ppl:.2f}", f"{paper.ppl:.2f}" if paper else "-", f"{guarded.ppl:.2f}",
                 "-" if same is None else f"{same:.2f}",
                 f"{recovered(paper.ppl, naive.ppl, dense):.1f}%" if paper else "-",
                 f"{recovered(guarded.ppl, naive.ppl, dense):.1f}%", "yes" if ok else "**no**"]
        lines.append(f"| {metric} | {k} | " + " | ".join(cells) + " |")
    lines += ["", f"Rows where the default (guarded) is worse than the same layers removed with nothing folded: "
              f"{worse}. Naive may choose other layers than the default; \"its layers, nothing folded\" does not."]
    return "\n".join(lines)


def anchor_table(all_rows: list[Row], table: dict[tuple[str, str, int], Row], dense: float) -> str:
    lines = ["| k | ReplaceMe (zero overhead) | LinearPatch (+ run-time matmul) | prunecomp default (guarded BI) | "
             "prunecomp best within the budget | default vs ReplaceMe | default vs LinearPatch | best vs ReplaceMe | "
             "best vs LinearPatch |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in sorted({k for (_m, v, k) in table if v in NOT_OURS}):
        rm = next((r.ppl for (m, v, kk), r in table.items() if v == "replaceme" and kk == k), None)
        lp = next((r.ppl for (m, v, kk), r in table.items() if v == "linearpatch" and kk == k), None)
        default = table.get(("bi", "guarded", k))
        best = best_within_budget(all_rows, k)

        def pct(a: Row | None, b: float | None) -> str:
            return "-" if a is None or b is None else _pct(a.ppl, b)

        lines.append(f"| {k} | {'-' if rm is None else f'{rm:.2f}'} | {'-' if lp is None else f'{lp:.2f}'} | "
                     f"{'-' if default is None else f'{default.ppl:.2f}'} | "
                     f"{'-' if best is None else f'{best.ppl:.2f} ({best.variant})'} | {pct(default, rm)} | "
                     f"{pct(default, lp)} | {pct(best, rm)} | {pct(best, lp)} |")
    lines += ["", f"Mean perplexity of the three corpora (dense {dense:.2f}); negative % = prunecomp ahead. Both "
              "anchors choose a contiguous block (run under `--metrics block`)."]
    return "\n".join(lines)


def fitted_table(all_rows: list[Row], table: dict[tuple[str, str, int], Row], dense: float) -> str:
    lines = ["| file | metric | k | variant | settings | removed | mean PPL | recovered | seconds | budget s | "
             "within |", "|---|---|---:|---|---|---|---:|---:|---:|---:|:---:|"]
    fitted = [r for r in all_rows if r.variant not in ("guarded", "prune&comp", "select", ONE_SHOT, NAIVE_ITERATIVE)
              and r.variant not in NOT_OURS]
    for r in fitted:
        cap = BUDGET.get(r.k)
        within = "-" if r.seconds is None or cap is None else ("yes" if r.seconds <= cap else "no")
        lines.append(f"| `{r.file}` | {r.metric} | {r.k} | {r.variant} | {r.how} | {list(r.removed)} | {r.ppl:.2f} | "
                     f"{_rec(table, r, dense)} | {_s(r.seconds)} | {'-' if cap is None else f'{cap:.0f}'} | "
                     f"{within} |")
    lines += ["", "Variants (bench/quality.py): `refine` = the paper's state then the gains (`--refine channels`); "
              "`refine-guarded` / `refine-none` / `refine-lsq` = the gains from the guarded / uncompensated / lsq "
              "state; `refine+select` = with `--selection loss`; `reconstruct` = guarded + block reconstruction "
              "(`--reconstruct`); `reconstruct-refit` = then the sequential refit (`--refit sequential`); a "
              "`refine-` prefix = the gains after that. A row without the prefix beside one with it is the same "
              "run's state before its gains. Seconds: pruning with reconstruction and refit, plus the gains; "
              "\"not recorded\" where the run kept only the gains' seconds."]
    return "\n".join(lines)


def rows_table(results: list[tuple[str, dict]]) -> str:
    """Every record of ``results`` (one protocol): removed layers and per-corpus perplexity, QA where measured."""
    first = results[0][1]
    ds = [d for d in first["dense"]["ppl"] if d != "mean"]
    has_qa = any("qa" in r for _n, res in results for per in res["metrics"].values() for v in per.values()
                 for r in v["results"].values())
    head = "| metric | k | variant | removed (original idx) | " + " | ".join(ds) + " | mean PPL |"
    head += " QA avg |" if has_qa else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    dense = first["dense"]
    qa = f" {100 * dense['qa']['average']:.1f} |" if has_qa and "qa" in dense else (" - |" if has_qa else "")
    lines.append("| - | 0 | dense | - | " + " | ".join(f"{dense['ppl'][d]:.2f}" for d in ds)
                 + f" | {dense['ppl']['mean']:.2f} |" + qa)
    for _name, result in results:
        for metric, per in result["metrics"].items():
            for k in sorted({int(k) for v in per.values() for k in v["results"]}):
                for variant, v in per.items():
                    r = v["results"].get(str(k))
                    if r is None:
                        continue
                    cells = " | ".join(f"{r['ppl'][d]:.2f}" for d in ds)
                    qa = (f" {100 * r['qa']['average']:.1f} |" if "qa" in r else " - |") if has_qa else ""
                    lines.append(f"| {metric} | {k} | {variant} | {sorted(r['removed'])} | {cells} | "
                                 f"{r['ppl']['mean']:.2f} |" + qa)
    s = first["settings"]
    seconds = sum(res.get("seconds", 0.0) for _n, res in results)
    lines += ["", f"Calibration: {s['calib_samples']} x {s['calib_seq_len']} tokens of {s['calib_source']}; "
              f"perplexity: first {s['eval_max_windows']} x {s['eval_seq_len']}-token windows per corpus; compute "
              f"time {seconds:.0f} s over {len(results)} process(es)."]
    return "\n".join(lines)


def variants_table(path: Path, naive: dict[int, float], dense: float) -> str:
    """bench/refine_variants.py's JSON lines: mean PPL per point, recovered against the iterative naive rows."""
    lines = ["| run | k | refinement steps | mean PPL | recovered | seconds (1 thread; progressive: with pruning) "
             "| removed |", "|---|---:|---:|---:|---:|---:|---|"]
    for row in map(json.loads, path.read_text().splitlines()):
        a = row["args"]
        if a.get("progressive"):
            per = a["progressive"] if a.get("step_gains", -1) < 0 else a["step_gains"]
            points = [(int(i), int(i) * per, v, row["seconds"].get(i)) for i, v in row["ppl"].items()]
            chosen = row.get("chosen")
            for i, br in (row.get("branch") or {}).items():  # fits on a copy at that point: time on top of it
                base = row["seconds"].get(i, 0.0)
                seq = br.get("seq", {}).get("seconds", 0.0)
                for s, v in sorted(br["ppl"].items(), key=lambda kv: int(kv[0])):
                    what = f"+ seq {a.get('seq_steps')}" if a.get("seq_steps") else ""
                    what += f" + gains {s}" if int(s) else ""
                    points.append((int(i), what.strip(" +") or "-", v,
                                   base + seq + (br["seconds"][s] if int(s) else 0.0)))
            points.sort(key=lambda p: p[0])
        else:
            points = [(a["k"], int(s), v, row["seconds"].get(s)) for s, v in row["ppl"].items() if int(s) > 0]
            chosen = None
        for k, steps, ppl, sec in points:
            rec = f"{recovered(ppl, naive[k], dense):.1f}%" if k in naive else "-"
            lines.append(f"| {row.get('label', '')} | {k} | {steps} | {ppl:.2f} | {rec} | "
                         f"{'-' if sec is None else round(sec)} | "
                         f"{sorted(chosen[:k]) if chosen else sorted(row.get('removed', []))} |")
    return "\n".join(lines)


DEFINITIONS = """\
Generated by `bench/results_doc.py` from `bench/results/` (the JSON and markdown the benchmark scripts wrote, with
their settings); do not edit by hand: run `.venv/bin/python bench/results_doc.py`. The commands and the discussion
are in [BENCHMARKS.md](BENCHMARKS.md); the protocol and the words below are defined once, in
[EVALUATION.md](EVALUATION.md#the-words-of-the-quality-tables):

- **Quality protocol**: SmolLM2-135M-Instruct (30 layers), k layers removed, scoring calibration 8 x 512 tokens of
  C4; **mean PPL** = mean perplexity of the first 8 x 512-token windows of WikiText-2, C4 and PTB.
- **Naive**: the same metric and mode with `--compensation none` (every variant is iterative except `one-shot`).
- **Recovered** = (naive - x) / (naive - dense) of mean PPL: `recovered()` in `bench/measures.py`, the only
  place it is defined. Over calibration seeds (the levels table) it is the mean of each seed's recovered share, each
  seed against its own naive removal, not the share of the mean perplexity.
- **Best**: the lowest mean PPL over the measured rows whose recorded seconds are within the time budget at that
  k, chosen by `best_within_budget()`; every file's row is a candidate (none is hidden by another file's)."""


def _dated(name: str) -> str | None:
    """When a result file without a recorded commit was committed (``bench/results/dated.json``)."""
    path = RESULTS / "dated.json"
    entry = json.loads(path.read_text()).get(name) if path.is_file() else None
    if not entry:
        return None
    if "last_changed" in entry:  # rewritten by a later run: the last commit that changed it bounds its age
        return (f"commit not recorded; last changed in {entry['last_changed']} ({entry['date']}), measured at or "
                "before it")
    return (f"commit not recorded; first committed in {entry['first_committed']} ({entry['date']}), measured at or "
            "before it")


def provenance(name: str) -> str:
    """Where a table's numbers come from: its results file, the commit and the machine's load as the benchmark
    recorded them (or that it did not, and how old the file is)."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return f"From `bench/results/{name}.md`; commit and load not recorded."
    result = json.loads(path.read_text())
    if not result.get("commit") and _dated(name):
        return f"From `bench/results/{name}.json`; {_dated(name)}; machine load not recorded."
    before, after = result.get("load_before"), result.get("load_after")
    if before and after:
        load = (f"load average {before['loadavg'][0]:.2f} before, {after['loadavg'][0]:.2f} after, other busy "
                f"processes: {', '.join(before.get('busy_processes') or []) or 'none'}")
    else:
        load = result.get("machine_note") or "machine load not recorded (dated runs: docs/BENCHMARKS.md)"
    return f"From `bench/results/{name}.json`, commit {result.get('commit') or 'not recorded in the file'}; {load}."


def build() -> str:
    quality, guarded, anchors = _load(QUALITY), _load(GUARDED), _load(ANCHORS)
    refined = _load(REFINED)
    everything = quality + guarded + refined + anchors
    all_rows = rows(everything)
    table = lowest(all_rows)
    dense = everything[0][1]["dense"]["ppl"]["mean"] if everything else 0.0
    parts = ["# Results", "", DEFINITIONS, ""]
    seeds = sorted(RESULTS.glob(LEVEL_SEEDS))
    if seeds:
        from quality import render_levels  # bench/: imported by path

        parts += ["## Quality levels", "", "Every level at k = 3, 5 and 8 over calibration seeds "
                  "(`bench/quality.py --levels`, one file per seed).", "",
                  *[provenance(p.stem) for p in seeds], "",
                  render_levels([json.loads(p.read_text()) for p in seeds]), ""]
    for path in sorted(RESULTS.glob(OTHER_MODELS)):
        from quality import render_levels  # bench/: imported by path

        other = json.loads(path.read_text())
        model = Path(str(other["settings"].get("model") or "")).name
        parts += [f"## The same levels on another model: {model}", "",
                  "The levels' settings are rules of the run, not values fitted to SmolLM2: the same table on a "
                  "model of another size and training corpus, on its own corpus.", "", provenance(path.stem), "",
                  render_levels([other]), ""]
    if everything:
        parts += ["## Quality levels, single runs (seed 0; files dated in bench/results/dated.json)", "",
                  levels_table(all_rows, table, dense), "",
                  "## Best within the time budget", "", best_table(all_rows, table, dense), ""]
    if guarded:
        parts += ["## Guarded compensation against naive removal and the paper", "",
                  "Naive and paper rows from the quality runs; guarded rows from "
                  f"{', '.join(f'`{n}.json`' for n in GUARDED)}.", "", guard_table(table, dense), "",
                  rows_table(guarded), ""]
    if anchors:
        parts += ["## The published anchors: ReplaceMe and LinearPatch (`bench/anchors.py`)", "",
                  anchor_table(all_rows, table, dense), "", rows_table(anchors), ""]
    if refined:
        parts += ["## Every fitted row, with its time", "", fitted_table(all_rows, table, dense), ""]
    if quality:
        from quality import render  # bench/: imported by path; its QA summary computes no recovered share

        parts += ["## Quality benchmark: every metric and variant, with QA (`bench/quality.py`)", "",
                  render([res for _n, res in quality]), ""]
    if refined:
        parts += ["## Fitted runs, one file each (`bench/quality.py --variants refine...`)", ""]
        for name, result in refined:
            parts += [f"### `{name}.json`", "", provenance(name), "", rows_table([(name, result)]), ""]
    if everything:
        parts += ["## Where the single-run quality tables come from", "",
                  *[f"- {provenance(name)}" for name, _r in quality + guarded + anchors], ""]
    variants = RESULTS / "refine_variants.jsonl"
    if variants.is_file():
        naive = {k: r.ppl for (m, v, k), r in table.items() if m == "bi" and v == NAIVE_ITERATIVE}
        parts += ["## Refinement variants (`bench/refine_variants.py`, BI, guarded start)", "",
                  variants_table(variants, naive, dense), ""]
    for name, title in MARKDOWN.items():
        path = RESULTS / f"{name}.md"
        if path.is_file():
            text = path.read_text().strip()
            if not text.startswith("|"):  # a plain-text report: keep its columns
                text = f"```text\n{text}\n```"
            parts += [f"## {title}", "", provenance(name), "", text, ""]
    return "\n".join(parts).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail when docs/RESULTS.md differs from a fresh build")
    args = ap.parse_args()
    text = build()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run bench/results_doc.py", file=sys.stderr)
            sys.exit(1)
        return
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")


if __name__ == "__main__":
    main()
