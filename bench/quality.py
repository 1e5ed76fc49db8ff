"""Quality benchmark: perplexity and zero-shot QA of SmolLM2-135M (or --model) after removing k layers, per
importance metric and variant, with retained performance against the dense model.

Variants per metric (``--variants``):
  one-shot    the metric's usual baseline: score the dense model once, drop the k lowest, no compensation
  iterative   re-score after every removal, no compensation
  prune&comp  the paper: iterative + magnitude compensation
  guarded     iterative + guarded compensation (prunecomp's default: s**a for the a of a short grid, 0 = none and
              1 = the paper's s included, that lowers the calibration loss most)
  lsq         guarded + least-squares gap map kept when it lowers the loss (prunecomp's ``--compensation lsq``)
  refine      prune&comp + distillation of the dense model into folded per-channel gains
              (prunecomp's ``--refine``; one refinement per k, from the prune&comp state at that k)
  select      prune&comp with compensation-aware selection (``--selection loss``)
  refine+select  both
  refine-guarded / refine-none / refine-lsq   refinement from the guarded / the uncompensated / the lsq state
              instead of the paper's
  reconstruct guarded + block reconstruction beside every gap (prunecomp's ``--reconstruct``: --reconstruct side,
              --reconstruct-steps, on the --refine-samples windows)
  refine-reconstruct  refinement from the reconstruct state (``--reconstruct both --refine channels``)
  reconstruct-refit  reconstruct, then at each k the sequential refit (prunecomp's ``--refit sequential``: every
              layer after the first gap fitted to the dense stream, --refit-steps each, on the --refine-samples
              windows), on a copy: the next removal starts from the unrefitted state, as the product refits once
  refit / refine-refit  guarded, then the refit at each k (no block reconstruction), then (refine-refit) refinement
  refine-reconstruct-refit  reconstruct-refit, then refinement (the refitted model's perplexity before the gains
              is kept as ``unrefined``: one run gives both rows)
  replaceme / linearpatch   the published anchors (bench/anchors.py; they choose a contiguous block by cosine
              whatever --metrics says, so run them under --metrics block); LinearPatch adds a run-time matmul
Iterative runs are evaluated on the way (the state after 3 removals of a k=8 run IS the k=3 result: re-scoring
does not depend on k), so each variant costs one pruning run. Evaluations are cached by a hash of the weights
(``--cache``), so a model two variants share (e.g. one-shot = iterative) is evaluated once and a rerun resumes.

Prints a markdown table and writes JSON. Several JSONs (e.g. metrics split over processes) render as one table:
    .venv/bin/python bench/quality.py --metrics bi,angular --out bench/results/quality_a.json
    .venv/bin/python bench/quality.py --render bench/results/quality_a.json bench/results/quality_b.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from prunecomp.calibration import calibration_windows, evaluation_windows
from prunecomp.compress import refit_as_configured
from prunecomp.config import PruneConfig
from prunecomp.evaluation.cache import ResultCache, weights_digest
from prunecomp.evaluation.harness import DEFAULT_TASKS, evaluate_qa, retained
from prunecomp.evaluation.perplexity import perplexity
from prunecomp.loop import prune_and_compensate
from prunecomp.planning import one_shot_choice
from prunecomp.pruning import remove_layer
from prunecomp.refine import refine, teacher_targets
from prunecomp.scoring import scan_layers
from prunecomp.sources import load_model

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def settings_tag(parts: list[Any]) -> str:
    """8 hex naming the evaluation settings a cached result was measured under."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:8]


def cache_key(kind: str, digest: str, tag: str) -> dict[str, str]:
    """The result-cache key of a ``kind`` ("ppl" or "qa") result of the model with weights ``digest``."""
    return {"bench": "quality", "kind": kind, "weights": digest, "settings": tag}


def import_legacy_cache(path: str, cache: ResultCache) -> int:
    """Copy a one-file JSON cache of earlier versions (keys ``"<kind>:<digest>:<tag>"``) into ``cache``."""
    n = 0
    for key, value in json.loads(Path(path).read_text()).items():
        kind, digest, tag = key.split(":")
        if cache.get(cache_key(kind, digest, tag)) is None:
            cache.put(cache_key(kind, digest, tag), value)
            n += 1
    return n


class Evaluator:
    """Perplexity on fixed windows, plus lm-eval QA on a fixed seeded subset where asked; each cached by the
    weights' digest (and the settings that produced it) in the library's result cache (one file per entry under
    ``--cache``, written atomically, so concurrent runs share it)."""

    def __init__(self, tokenizer: Any, windows: dict[str, Any], args: argparse.Namespace) -> None:
        self.tokenizer, self.windows, self.args = tokenizer, windows, args
        self.cache = ResultCache(args.cache)
        self.ppl_tag = settings_tag([args.eval_seq_len, args.eval_max_windows, args.datasets])
        self.qa_tag = settings_tag([args.qa_limit, args.qa_tasks, str(args.data_dir)])

    def _cached(self, kind: str, digest: str, tag: str, compute: Any) -> Any:
        key = cache_key(kind, digest, tag)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        value = compute()
        self.cache.put(key, value)
        return value

    def __call__(self, model: Any, qa: bool = True) -> dict[str, Any]:
        h = weights_digest(model)

        def ppl() -> dict[str, float]:
            out = {name: perplexity(model, w.ids, batch_size=4) for name, w in self.windows.items()}
            main = [v for k, v in out.items() if "@" not in k]
            out["mean"] = sum(main) / len(main)
            return out

        result: dict[str, Any] = {"ppl": self._cached("ppl", h, self.ppl_tag, ppl)}
        if qa and self.args.qa_limit != 0:
            result["qa"] = self._cached(
                "qa", h, self.qa_tag,
                lambda: evaluate_qa(model, self.tokenizer, tuple(self.args.qa_tasks.split(",")),
                                    data_dir=self.args.data_dir, limit=self.args.qa_limit, batch_size=16))
        return result

    def at(self, k: int) -> bool:
        """Whether QA is measured for models with ``k`` layers removed (``--qa-ks``)."""
        return self.args.qa_ks == "all" or str(k) in self.args.qa_ks.split(",")


def _record(removed: list[int], ev: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"removed": sorted(removed), **extra, **ev}


def _one_shot(model: Any, cal: Any, metric: str, ks: list[int], evaluate: Evaluator, batch: int) -> dict:
    cfg = PruneConfig(metric=metric, n_layers=max(ks), mode="one-shot", compensation="none")
    n = len(model.model.layers)
    cands = [i for i in range(n) if i not in cfg.protected(n)]
    results = {}
    if metric == "block":  # contiguous block of exactly k layers, re-scored per k
        for k in ks:
            m = copy.deepcopy(model)
            report = prune_and_compensate(m, cal, cfg.model_copy(update={"n_layers": k}), batch_size=batch)
            results[k] = _record(report.removed, evaluate(m, evaluate.at(k)))
        return results
    scan = scan_layers(model, cal.ids, metric, batch_size=batch, candidates=cands)
    for k in ks:  # one scan serves every k: the k lowest scores, as the library's one-shot mode chooses them
        m = copy.deepcopy(model)
        chosen = one_shot_choice(scan, cands, metric, k)
        for i in sorted(chosen, reverse=True):
            remove_layer(m, i)
        results[k] = _record(chosen, evaluate(m, evaluate.at(k)))
    return results


def _anchor(model: Any, cal: Any, ks: list[int], variant: str, evaluate: Evaluator, batch: int) -> dict:
    """A published baseline (bench/anchors.py) at every k, each from the dense model."""
    from anchors import linear_patch, replace_me

    results = {}
    for k in ks:
        m = copy.deepcopy(model)
        info = (replace_me if variant == "replaceme" else linear_patch)(m, cal.ids, k, batch_size=batch)
        results[k] = _record(info.pop("removed"), evaluate(m, evaluate.at(k)), **info)
        print(f"    [{variant}] k={k}: {results[k]['ppl']}", file=sys.stderr, flush=True)
    return results


def _iterative(model: Any, cal: Any, metric: str, ks: list[int], variant: str, evaluate: Evaluator, batch: int,
               args: argparse.Namespace, teacher: Any, fit_on: Any) -> dict:
    comp = {"iterative": "none", "prune&comp": "magnitude", "refine": "magnitude", "lsq": "lsq", "select": "magnitude",
            "refine+select": "magnitude", "guarded": "guarded", "refine-guarded": "guarded",
            "refine-none": "none", "refine-lsq": "lsq", "reconstruct": "guarded",
            "refine-reconstruct": "guarded", "reconstruct-refit": "guarded",
            "refine-reconstruct-refit": "guarded", "refit": "guarded", "refine-refit": "guarded"}[variant]
    local = {"reconstruct": args.reconstruct, "reconstruct_steps": args.reconstruct_steps,
             "reconstruct_lr": args.reconstruct_lr} if "reconstruct" in variant else {}
    selection = "loss" if variant.endswith("select") else "score"
    results: dict[int, Any] = {}

    def finish(k: int, report_removed: list[int], scales: list[float], m: Any, seconds: float | None = None) -> None:
        extra: dict[str, Any] = {"scales": scales}
        if seconds is not None:  # pruning (and reconstruction) up to k, refinement apart: the time budget
            extra["prune_seconds"] = seconds
        if variant.endswith("refit"):  # the product's refit after the last removal, on a copy (see the docstring)
            m = copy.deepcopy(m)
            cfg = PruneConfig(n_layers=k, refit="sequential", refit_steps=args.refit_steps, refit_lr=args.refit_lr)
            done, _ = refit_as_configured(m, fit_on, cfg, model)
            extra["refit"] = {k2: v for k2, v in done.to_dict().items() if k2 != "declined"}
            print(f"    [{metric}/{variant}] k={k}: refit {done.seconds:.0f} s", file=sys.stderr, flush=True)
        if variant.startswith("refine-re"):  # the state refinement starts from
            extra["unrefined"] = evaluate(m, False)["ppl"]
        if variant.startswith("refine"):
            m = copy.deepcopy(m)
            rep = refine(m, fit_on.ids, teacher, mode=args.refine, steps=args.refine_steps, lr=args.refine_lr,
                         batch_size=args.refine_batch, loss=args.refine_loss)
            extra["refine"] = {k2: v for k2, v in rep.to_dict().items() if k2 != "losses"}
        if variant in ("prune&comp", "guarded"):  # the bar: the same layers removed with nothing folded
            plain = copy.deepcopy(model)
            for i in sorted(report_removed, reverse=True):
                remove_layer(plain, i)
            extra["same_layers_naive"] = evaluate(plain, False)["ppl"]
        results[k] = _record(report_removed, evaluate(m, evaluate.at(k)), **extra)
        print(f"    [{metric}/{variant}] k={k}: {results[k]['ppl']}", file=sys.stderr, flush=True)

    if metric == "block":  # block size depends on k: one run per k
        for k in ks:
            m = copy.deepcopy(model)
            report = prune_and_compensate(m, cal, PruneConfig(metric=metric, n_layers=k, compensation=comp,
                                                                       selection=selection),
                                          batch_size=batch)
            finish(k, report.removed, [s.applied_scale for s in report.steps], m)
        return results
    m = copy.deepcopy(model)
    done: list[Any] = []

    def on_step(record: Any, current: Any) -> None:
        done.append(record)
        if len(done) in ks:
            finish(len(done), [r.chosen for r in done], [r.applied_scale for r in done], current,
                   sum(r.seconds for r in done))

    prune_and_compensate(m, cal, PruneConfig(metric=metric, n_layers=max(ks), compensation=comp, selection=selection,
                                             **local),
                         batch_size=batch, on_step=on_step, fit_windows=fit_on if local else None)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--ks", default="3,5,8")
    ap.add_argument("--metrics", default="bi,angular,block,taylor,mag,ppl")
    ap.add_argument("--variants", default="one-shot,iterative,prune&comp")
    ap.add_argument("--datasets", default="wikitext2,c4,ptb",
                    help="corpora; 'name@N' adds a column on the first N windows, left out of the mean")
    ap.add_argument("--calib-source", default="c4")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-max-windows", type=int, default=8)
    ap.add_argument("--qa-limit", type=int, default=30, help="items per QA task (seeded subset); 0 skips QA")
    ap.add_argument("--qa-ks", default="5", help="k values whose models get QA (comma list or 'all'); dense always")
    ap.add_argument("--qa-tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--data-dir", default=str(DATA_DIR))
    ap.add_argument("--refine", default="channels")
    ap.add_argument("--refine-steps", type=int, default=80)
    ap.add_argument("--refine-lr", type=float, default=3e-3)
    ap.add_argument("--refine-batch", type=int, default=2)
    ap.add_argument("--refine-topk", type=int, default=256)
    ap.add_argument("--refine-loss", default="tail",
                    help="tail or topk (the loss of rows measured before the tail loss existed)")
    ap.add_argument("--refine-samples", type=int, default=None, help="windows refinement fits on (default: calib)")
    ap.add_argument("--reconstruct", default="both", help="side of the reconstruct variants")
    ap.add_argument("--reconstruct-steps", type=int, default=100)
    ap.add_argument("--reconstruct-lr", type=float, default=1e-3)
    ap.add_argument("--refit-steps", type=int, default=50, help="Adam steps per layer of the refit variants")
    ap.add_argument("--refit-lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--cache", default=None,
                    help="result-cache folder (prunecomp.evaluation.cache.ResultCache), shared by concurrent runs; "
                    "default: the library's cache, <$PRUNECOMP_CACHE_DIR or ~/.cache/prunecomp>/eval, outside "
                    "the checkout")
    ap.add_argument("--import-cache", nargs="+", default=None,
                    help="only copy these one-file JSON caches of earlier versions into --cache")
    ap.add_argument("--out", default="bench/results/quality.json")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 when sharing the machine)")
    ap.add_argument("--render", nargs="+", default=None, help="only render these result JSONs as one table")
    args = ap.parse_args()
    if args.render:
        print(render([json.loads(Path(p).read_text()) for p in args.render]))
        return
    if args.import_cache:
        for path in args.import_cache:
            print(f"{path}: {import_legacy_cache(path, ResultCache(args.cache))} entries imported")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ks = sorted(int(k) for k in args.ks.split(","))
    lm = load_model(args.model)
    cal = calibration_windows(lm.tokenizer, args.calib_source, n_samples=args.calib_samples,
                              seq_len=args.calib_seq_len, seed=0)
    windows = {}
    for d in args.datasets.split(","):  # "name@N": the first N windows of that corpus, outside the mean
        name, _, n = d.partition("@")
        windows[d] = evaluation_windows(lm.tokenizer, name, seq_len=args.eval_seq_len,
                                        max_windows=int(n) if n else args.eval_max_windows)
    evaluate = Evaluator(lm.tokenizer, windows, args)
    teacher, fit_on = None, cal
    if any(v.startswith(("refine", "reconstruct", "refit")) for v in args.variants.split(",")):  # fitting windows
        if args.refine_samples:
            fit_on = calibration_windows(lm.tokenizer, args.calib_source, n_samples=args.refine_samples,
                                         seq_len=args.calib_seq_len, seed=0)
        if any(v.startswith("refine") for v in args.variants.split(",")):
            teacher = teacher_targets(lm.model, fit_on.ids, topk=args.refine_topk, batch_size=args.batch_size)
    result: dict[str, Any] = {
        "settings": {**vars(args), "model_hash": lm.content_hash, "calibration": cal.origin,
                     "eval_tokens": {d: int(w.ids.numel()) for d, w in windows.items()},
                     "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()},
        "dense": evaluate(lm.model), "metrics": {},
    }
    print(f"dense: {result['dense']['ppl']}", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for metric in args.metrics.split(","):
        per: dict[str, Any] = {}
        for variant in args.variants.split(","):
            t = time.perf_counter()
            print(f"[{metric}] {variant}", file=sys.stderr, flush=True)
            if variant == "one-shot":
                res = _one_shot(lm.model, cal, metric, ks, evaluate, args.batch_size)
            elif variant in ("replaceme", "linearpatch"):
                res = _anchor(lm.model, cal, ks, variant, evaluate, args.batch_size)
            else:
                res = _iterative(lm.model, cal, metric, ks, variant, evaluate, args.batch_size, args, teacher,
                                 fit_on)
            per[variant] = {"results": res, "seconds": time.perf_counter() - t}
            result["metrics"][metric] = per
            result["seconds"] = time.perf_counter() - t0
            out.write_text(json.dumps(result, indent=2))  # partial results survive an interrupted run
    print(render([result]))


def _qa_se(qa: dict[str, Any]) -> float:
    """Standard error of the task-average accuracy (binomial per task, tasks independent)."""
    var = sum(t["score"] * (1 - t["score"]) / max(t["n"], 1) for t in qa["tasks"].values())
    return math.sqrt(var) / len(qa["tasks"])


def _merged(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, Any]]]:
    """metric -> variant -> k -> record over several result files; a later file's record replaces an earlier one."""
    merged: dict[str, dict[str, dict[int, Any]]] = {}
    for result in results:
        for metric, per in result["metrics"].items():
            for variant, v in per.items():
                for k, r in v["results"].items():
                    merged.setdefault(metric, {}).setdefault(variant, {})[int(k)] = r
    return merged


VARIANT_ORDER = ("one-shot", "iterative", "prune&comp", "guarded", "lsq", "select", "refine", "refine-guarded",
                 "refine-none", "refine-lsq", "refine+select", "reconstruct", "refine-reconstruct", "reconstruct-refit",
                 "refine-reconstruct-refit", "refit", "refine-refit", "replaceme", "linearpatch")
ANCHORS = ("replaceme", "linearpatch")
REFINED = ("refine", "refine-guarded", "refine-none", "refine-lsq", "refine+select", "refine-reconstruct",
           "refine-reconstruct-refit", "refine-refit")


def render(results: list[dict[str, Any]]) -> str:
    """Markdown table: one row per (metric, k, variant), merged over result files of the same protocol, then the
    summary of what compensation (and refinement) changed against each metric's baseline."""
    first = results[0]
    ds = [d for d in first["dense"]["ppl"] if d != "mean"]
    has_qa = "qa" in first["dense"]
    head = "| metric | k | variant | removed (original idx) | " + " | ".join(ds) + " | mean PPL |"
    head += " QA avg | QA retained |" if has_qa else ""
    cols = 4 + len(ds) + 1 + (2 if has_qa else 0)
    lines = [head, "|" + "---|" * cols]
    dense = first["dense"]

    def qa_cells(r: dict[str, Any]) -> str:
        if not has_qa:
            return ""
        if "qa" not in r:
            return " - | - |"
        kept = retained(r["qa"], dense["qa"])["overall"]
        return f" {100 * r['qa']['average']:.1f} | {kept:.1f}% |"

    dp = dense["ppl"]
    lines.append("| - | 0 | dense | - | " + " | ".join(f"{dp[d]:.2f}" for d in ds) + f" | {dp['mean']:.2f} |"
                 + qa_cells(dense))
    merged = _merged(results)
    for metric, per in merged.items():
        variants = sorted(per, key=lambda v: VARIANT_ORDER.index(v) if v in VARIANT_ORDER else len(VARIANT_ORDER))
        for k in sorted({k for v in per.values() for k in v}):
            for variant in variants:
                r = per[variant].get(k)
                if r is None:
                    continue
                ppl = r["ppl"]
                lines.append(f"| {metric} | {k} | {variant} | {sorted(r['removed'])} | "
                             + " | ".join(f"{ppl[d]:.2f}" for d in ds) + f" | {ppl['mean']:.2f} |" + qa_cells(r))
    seconds = sum(result.get("seconds", 0.0) for result in results)
    s = first["settings"]
    lines.append("")
    note = (f"Calibration: {s['calib_samples']} x {s['calib_seq_len']} tokens of {s['calib_source']}; perplexity: "
            f"first {s['eval_max_windows']} x {s['eval_seq_len']}-token windows per corpus")
    if has_qa:
        n = sum(t["n"] for t in dense["qa"]["tasks"].values())
        qa_ks = sorted({str(r.get("settings", {}).get("qa_ks", "?")) for r in results})
        note += (f"; QA (k in {'/'.join(qa_ks)} and dense): lm-eval zero-shot, {s['qa_limit']} seeded items "
                 f"per task ({n} items, "
                 f"{', '.join(dense['qa']['tasks'])}; acc_norm for arc/hellaswag/piqa, acc otherwise; standard error "
                 f"of the dense average {100 * _qa_se(dense['qa']):.1f} points)")
    lines.append(note + f"; compute time {seconds:.0f} s over {len(results)} process(es).")
    lines += ["", summary(merged, has_qa)]
    if any("guarded" in per for per in merged.values()):
        lines += ["", guard_summary(merged, dense["ppl"]["mean"])]
    if any(a in per for per in merged.values() for a in ANCHORS):
        lines += ["", anchor_summary(merged, dense["ppl"]["mean"])]
    return "\n".join(lines)


def anchor_summary(merged: dict[str, dict[str, dict[int, Any]]], dense: float) -> str:
    """Per k: the anchors (ReplaceMe, LinearPatch) beside prunecomp's default (guarded BI), its best zero-overhead
    variant over every metric and variant measured, and how far ahead (negative %) or behind each one is."""
    ks = sorted({k for per in merged.values() for v in per.values() for k in v})
    lines = ["| k | ReplaceMe (zero overhead) | LinearPatch (+ run-time matmul) | prunecomp default (guarded BI) | "
             "prunecomp best (variant) | default vs ReplaceMe | default vs LinearPatch | best vs ReplaceMe | "
             "best vs LinearPatch |", "|---:|---:|---:|---:|---|---:|---:|---:|---:|"]

    def mean(metric: str, variant: str, k: int) -> float | None:
        r = merged.get(metric, {}).get(variant, {}).get(k)
        return None if r is None else float(r["ppl"]["mean"])

    def pct(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None else _pct(a, b)

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for k in ks:
        rm = next((v for m in merged if (v := mean(m, "replaceme", k)) is not None), None)
        lp = next((v for m in merged if (v := mean(m, "linearpatch", k)) is not None), None)
        default = mean("bi", "guarded", k)
        ours = [(v, f"{m}/{var}") for m, per in merged.items() for var in per if var not in ANCHORS
                and var not in ("one-shot", "iterative") and (v := mean(m, var, k)) is not None]
        best = min(ours) if ours else None
        lines.append(f"| {k} | {cell(rm)} | {cell(lp)} | {cell(default)} | "
                     f"{'-' if best is None else f'{best[0]:.2f} ({best[1]})'} | {pct(default, rm)} | "
                     f"{pct(default, lp)} | {pct(best and best[0], rm)} | {pct(best and best[0], lp)} |")
    lines += ["", f"Mean perplexity of the three corpora (dense {dense:.2f}); negative % = prunecomp ahead."]
    return "\n".join(lines)


def recovered(variant: float, naive: float, dense: float) -> float:
    """Share of the naive removal's perplexity degradation that a variant recovers (100% = back to dense): the
    one definition (``bench/measures.py``)."""
    from measures import recovered as one_definition

    return float(one_definition(variant, naive, dense))


def guard_summary(merged: dict[str, dict[str, dict[int, Any]]], dense: float) -> str:
    """Per (metric, k): naive removal (iterative, nothing folded) vs the paper vs guarded (the default) vs the best
    refined variant, mean perplexity and % of the naive degradation recovered; and whether the default is ever
    worse than its own layers removed with nothing folded (the bar the guard must clear)."""
    lines = ["| metric | k | naive | paper | guarded (default) | its layers, nothing folded | best refined | "
             "paper rec. | guarded rec. | refined rec. | default <= its layers unfolded |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|:---:|"]
    worse = 0
    for metric, per in merged.items():
        for k in sorted({k for v in per.values() for k in v}):
            get = {v: per.get(v, {}).get(k) for v in VARIANT_ORDER}
            naive, paper, guarded = get["iterative"], get["prune&comp"], get["guarded"]
            if naive is None or guarded is None:
                continue
            n = naive["ppl"]["mean"]
            refs = [(get[v]["ppl"]["mean"], v) for v in REFINED if get[v] is not None]
            best = min(refs) if refs else None
            same = (guarded.get("same_layers_naive") or {}).get("mean")
            ok = same is None or guarded["ppl"]["mean"] <= same
            worse += not ok
            cells = [f"{n:.2f}", f"{paper['ppl']['mean']:.2f}" if paper else "-", f"{guarded['ppl']['mean']:.2f}",
                     "-" if same is None else f"{same:.2f}",
                     f"{best[0]:.2f} ({best[1]})" if best else "-",
                     f"{recovered(paper['ppl']['mean'], n, dense):.0f}%" if paper else "-",
                     f"{recovered(guarded['ppl']['mean'], n, dense):.0f}%",
                     f"{recovered(best[0], n, dense):.0f}%" if best else "-", "yes" if ok else "**no**"]
            lines.append(f"| {metric} | {k} | " + " | ".join(cells) + " |")
    lines += ["", f"Rows where the default (guarded) is worse than the same layers removed with nothing folded "
              f"(the bar the guard must clear): {worse}. Naive = iterative removal with nothing folded (it may choose "
              "other layers). Recovered = (naive - variant) / (naive - dense) of mean perplexity; dense mean "
              f"{dense:.2f}."]
    return "\n".join(lines)


def time_summary(results: list[dict[str, Any]], naive: dict[str, dict[str, dict[int, Any]]], dense: float,
                 budget: dict[int, float]) -> str:
    """Per run, (metric, k) that recorded its pruning seconds: mean perplexity, the share of the naive degradation
    recovered (naive = iterative removal with nothing folded, from ``naive``: merged results), and the fitting time
    (pruning with any reconstruction, plus refinement) against ``budget`` (seconds per k: twice the refinement of
    the quality table's rows)."""
    lines = ["| metric | k | variant | settings | removed | before refinement | mean PPL | recovered | pruning s | "
             "refinement s | total s | budget s |", "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [(result["settings"], metric, variant, int(k), r) for result in results
            for metric, per in result["metrics"].items() for variant, v in per.items()
            for k, r in v["results"].items()]
    for st, metric, variant, k, r in rows:
        if r.get("prune_seconds") is None:
            continue
        n = naive.get(metric, {}).get("iterative", {}).get(k)
        rec = f"{recovered(r['ppl']['mean'], n['ppl']['mean'], dense):.1f}%" if n else "-"
        how = (f"{st.get('reconstruct')}, {st.get('reconstruct_steps')} steps, {st.get('refine_samples')} windows"
               if "reconstruct" in variant else f"{st.get('refine_samples')} windows")
        if "reconstruct" in variant and st.get("reconstruct_lr", 1e-3) != 1e-3:
            how += f", lr {st['reconstruct_lr']:g}"
        if variant.endswith("refit") and "reconstruct" not in variant:
            how = f"{st.get('refine_samples')} windows"
        prune_s = r["prune_seconds"]
        if r.get("refit"):
            how += f", refit {r['refit']['steps']} steps ({r['refit']['seconds']:.0f} s, in pruning s)"
            prune_s += r["refit"]["seconds"]
        fit = (r.get("refine") or {}).get("seconds", 0.0)
        if r.get("refine"):  # rows older than the tail loss have no refine_loss: theirs was topk
            how += f", gains {st.get('refine_loss', 'topk')} loss"
            if st.get("refine_lr", 3e-3) != 3e-3:
                how += f" lr {st['refine_lr']:g}"
            if r["refine"].get("loss_windows"):  # newer rows say; older ones measured the audit loss on every window
                how += f" (audit KL on {r['refine']['loss_windows']} windows)"
        unrefined = f"{r['unrefined']['mean']:.2f}" if r.get("unrefined") else "-"
        cap = f"{budget[k]:.0f}" if k in budget else "-"
        if r.get("refit") and r.get("unrefined"):  # the refitted state before the gains is a row of its own
            m = r["unrefined"]["mean"]
            rec0 = f"{recovered(m, n['ppl']['mean'], dense):.1f}%" if n else "-"
            lines.append(f"| {metric} | {k} | {variant.removeprefix('refine-')} | {how} | {sorted(r['removed'])} | - | "
                         f"{m:.2f} | {rec0} | {prune_s:.0f} | 0 | {prune_s:.0f} | {cap} |")
        lines.append(f"| {metric} | {k} | {variant} | {how} | {sorted(r['removed'])} | {unrefined} | "
                     f"{r['ppl']['mean']:.2f} | {rec} | {prune_s:.0f} | {fit:.0f} | "
                     f"{prune_s + fit:.0f} | {cap} |")
    lines += ["", "Recovered = (naive - variant) / (naive - dense) of mean perplexity, naive = iterative removal with "
              "--compensation none; budget = twice the refinement seconds of the quality table's refine rows "
              "(k = 3 and 8) and of refine-guarded (k = 5), one CPU thread each."]
    return "\n".join(lines)


def _pct(new: float, old: float) -> str:
    return f"{100 * (new / old - 1):+.0f}%"


def summary(merged: dict[str, dict[str, dict[int, Any]]], has_qa: bool) -> str:
    """Per (metric, k): mean PPL of each variant, Prune&Comp against the one-shot baseline and, where measured,
    refinement against Prune&Comp; QA averages in brackets where measured."""
    shown = [v for v in VARIANT_ORDER if any(v in per for per in merged.values())]
    head = "| metric | k | " + " | ".join(shown) + " | P&C vs baseline |"
    refined = [v for v in ("refine", "refine+select") if v in shown]
    head += "".join(f" {v} vs P&C |" for v in refined)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for metric, per in merged.items():
        for k in sorted({k for v in per.values() for k in v}):
            cells = []
            for v in shown:
                r = per.get(v, {}).get(k)
                cell = "-" if r is None else f"{r['ppl']['mean']:.1f}"
                if r is not None and has_qa and "qa" in r:
                    cell += f" ({100 * r['qa']['average']:.1f}%)"
                cells.append(cell)
            base, pc = per.get("one-shot", {}).get(k), per.get("prune&comp", {}).get(k)
            row = f"| {metric} | {k} | " + " | ".join(cells) + " | "
            row += (_pct(pc["ppl"]["mean"], base["ppl"]["mean"]) if base and pc else "-") + " |"
            for v in refined:
                r = per.get(v, {}).get(k)
                row += f" {_pct(r['ppl']['mean'], pc['ppl']['mean']) if r and pc else '-'} |"
            lines.append(row)
    lines.append("")
    lines.append("Cells: mean perplexity of the three corpora (QA average where measured); percentages compare mean "
                 "perplexity (negative = better).")
    if has_qa:
        paired = []
        for v in shown:
            if v == "prune&comp":
                continue
            diffs = [100 * (per[v][k]["qa"]["average"] - per["prune&comp"][k]["qa"]["average"])
                     for per in merged.values() for k in per.get(v, {})
                     if "qa" in per[v][k] and "qa" in per.get("prune&comp", {}).get(k, {})]
            if diffs:
                paired.append(f"{v} {sum(diffs) / len(diffs):+.1f} points over {len(diffs)} rows")
        if paired:
            lines.append("QA average minus Prune&Comp's, mean over the (metric, k) rows where both were measured "
                         "(same items for every model): " + "; ".join(paired) + ".")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
