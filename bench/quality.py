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
  ghosted     Ghosted Layers (bench/anchors.py): iterative BI, each removed layer replaced by its float64
              least-squares linear map, applied at run time (a C x C matmul per cut: not zero-overhead)
Iterative runs are evaluated on the way (the state after 3 removals of a k=8 run IS the k=3 result: re-scoring
does not depend on k), so each variant costs one pruning run. Evaluations are cached by a hash of the weights
(``--cache``), so a model two variants share (e.g. one-shot = iterative) is evaluated once and a rerun resumes.

Prints a markdown table and writes JSON. Several JSONs (e.g. metrics split over processes) render as one table:
    .venv/bin/python bench/quality.py --metrics bi,angular --out bench/results/quality_a.json
    .venv/bin/python bench/quality.py --render bench/results/quality_a.json bench/results/quality_b.json

Levels mode (``--levels``): each quality level of ``prunecomp/levels.py`` run through the library exactly as
``prunecomp prune --quality LEVEL`` runs it (:func:`prunecomp.engine.compress.compress` with the level's settings,
fitting on ``refine_samples`` windows of the calibration source, same seed), once per calibration seed (``--seeds``),
and ONE table: per (level, k) the mean and the worst seed of perplexity (WikiText-2 / C4 / PTB and their mean), of the
recovered share (``bench/measures.py``; naive = ``--compensation none``, iterative, the same seed) and of the
top-1 agreement with the dense model's greedy next token on the evaluation windows
(:mod:`prunecomp.evaluation.agreement`), the seconds the product takes for that k (mean over seeds), and whether
``best`` meets its targets. ``--metrics`` and ``--variants`` do not apply. One run to the largest k per (level,
seed): the state after j removals of that run is the k = j run's (nothing after a removal depends on k), and the
gains (``balanced``, ``best``) are fitted again from the state at each k, as a run with that k fits them once. QA
retained with its standard error is added with ``--qa-limit N`` (N seeded items per task; off by default here).
The published methods (``replaceme``, ``linearpatch``, ``ghosted``) may be named among ``--levels``: each runs
at every k from the dense model on the same seed's calibration windows and lands on the same table (recovered
against the same seed's naive removal; the ones that add run-time matmuls say so in their label).
The quality protocol is the three seeds (the default); one seed per process, rendered together, takes a third of
the time on an idle machine:
    .venv/bin/python bench/quality.py --levels fast,balanced,best --threads 1   # seeds 0,1,2: quality_levels.json
    .venv/bin/python bench/quality.py --levels fast,balanced,best --seeds 1 --out bench/results/quality_levels_s1.json
    .venv/bin/python bench/quality.py --render bench/results/quality_levels_s0.json bench/results/quality_levels_s1.json
    .venv/bin/python bench/quality.py --levels best --seeds 0 --qa-limit 200 --out bench/results/quality_levels_qa.json
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunecomp.config import CalibrationConfig, PruneConfig
from prunecomp.corpora.calibration import TokenWindows, calibration_windows, evaluation_windows
from prunecomp.engine.compress import compress, refine_as_configured, refit_as_configured, teacher_for
from prunecomp.engine.final_check import decision_windows, held_out_config
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.evaluation.agreement import Agreement, agreement, greedy_tokens
from prunecomp.evaluation.cache import ResultCache, weights_digest
from prunecomp.evaluation.harness import DEFAULT_TASKS, evaluate_qa, retained
from prunecomp.evaluation.perplexity import perplexity
from prunecomp.levels import LEVELS, level_settings
from prunecomp.method.planning import one_shot_choice
from prunecomp.method.refine import refine, teacher_targets
from prunecomp.method.scoring import scan_layers
from prunecomp.models.pruning import remove_layer
from prunecomp.models.sources import load_model

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
        self.reference: dict[str, torch.Tensor] = {}  # corpus -> the dense model's greedy tokens (set_reference)
        self.agree_tag = ""

    def _cached(self, kind: str, digest: str, tag: str, compute: Any) -> Any:
        key = cache_key(kind, digest, tag)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        value = compute()
        self.cache.put(key, value)
        return value

    def set_reference(self, dense: Any) -> None:
        """Take ``dense``'s greedy next tokens on every evaluation corpus as the reference of top-1 agreement
        (``agree=True`` below). Only the argmax ids are kept (:mod:`prunecomp.evaluation.agreement`), computed once
        per protocol: cached by the dense weights' digest under the perplexity settings, like every evaluation."""
        h = weights_digest(dense)

        def compute() -> dict[str, list[list[int]]]:
            return {name: greedy_tokens(dense, w.ids, batch_size=4).tolist()
                    for name, w in self.windows.items() if "@" not in name}

        ids = self._cached("argmax", h, self.ppl_tag, compute)
        self.reference = {name: torch.tensor(v, dtype=torch.long) for name, v in ids.items()}
        self.agree_tag = settings_tag([self.ppl_tag, h])

    def _agreement(self, model: Any) -> dict[str, Any]:
        per = {name: agreement(model, self.windows[name].ids, ref, batch_size=4)
               for name, ref in self.reference.items()}
        pooled = sum(per.values(), Agreement(0, 0))
        return {"corpora": {name: a.to_dict() for name, a in per.items()}, **pooled.to_dict()}

    def __call__(self, model: Any, qa: bool = True, agree: bool = False) -> dict[str, Any]:
        """Perplexity; QA where ``qa`` and ``--qa-limit`` is not 0; top-1 agreement with the reference
        (:meth:`set_reference`) where ``agree``."""
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
        if agree:
            if not self.reference:
                raise RuntimeError("top-1 agreement needs the dense model's tokens first: call set_reference")
            result["agree"] = self._cached("agree", h, self.agree_tag, lambda: self._agreement(model))
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


def _anchor(model: Any, cal: Any, ks: list[int], variant: str, evaluate: Evaluator, batch: int,
            agree: bool = False) -> dict:
    """A published baseline (bench/anchors.py) at every k, each from the dense model, with its seconds (the
    method alone, evaluation excluded) and, with ``agree``, the top-1 agreement."""
    from anchors import ghosted_layers, linear_patch, replace_me

    results = {}
    for k in ks:
        m = copy.deepcopy(model)
        fit = {"replaceme": replace_me, "linearpatch": linear_patch, "ghosted": ghosted_layers}[variant]
        t = time.perf_counter()
        info = fit(m, cal.ids, k, batch_size=batch)
        info["seconds"] = time.perf_counter() - t
        results[k] = _record(info.pop("removed"), evaluate(m, evaluate.at(k), agree=agree), **info)
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


def _level_config(level: str, k: int, calibration_windows: int) -> PruneConfig:
    """The prune settings ``prunecomp prune --quality LEVEL --layers k`` runs with (``prunecomp.levels``)."""
    return PruneConfig.model_validate({"n_layers": k, **level_settings(level, calibration_windows)})


def _level_fit_windows(tokenizer: Any, config: PruneConfig, args: argparse.Namespace,
                       seed: int) -> TokenWindows | None:
    """The windows the level's fits use, by the product's rule (the job's fit windows): ``refine_samples`` windows
    of the calibration source with the calibration seed and length, or None when nothing is fitted."""
    if not config.fits or config.refine_samples is None:
        return None
    return calibration_windows(tokenizer, args.calib_source, n_samples=config.refine_samples,
                               seq_len=args.calib_seq_len, seed=seed)


def _naive_run(model: Any, cal: Any, ks: list[int], evaluate: Evaluator, batch: int) -> dict[int, Any]:
    """Naive removal for the recovered share: iterative BI, ``--compensation none``, the same calibration."""
    results: dict[int, Any] = {}
    removed: list[int] = []

    def on_step(record: Any, current: Any) -> None:
        removed.append(record.chosen)
        if len(removed) in ks:
            results[len(removed)] = _record(removed, evaluate(current, False))

    prune_and_compensate(copy.deepcopy(model), cal, PruneConfig(n_layers=max(ks), compensation="none"),
                         batch_size=batch, on_step=on_step)
    return results


def _level_run(model: Any, cal: Any, config: PruneConfig, fit_on: TokenWindows | None, targets: Any,
               teacher_seconds: float, ks: list[int], evaluate: Evaluator, batch: int, label: str,
               check: TokenWindows | None = None) -> dict[int, Any]:
    """One :func:`prunecomp.engine.compress.compress` run of a level to the largest k, evaluated at every k of ``ks``.

    The run is the product's (the level's config, its fit windows, the dense predictions ``targets`` computed by
    the library's :func:`~prunecomp.engine.compress.teacher_for` and passed in so that the levels and k share them). At
    a smaller k the state after k removals is the k-run's state before its end fits, so the gains (when the level
    fits any) are fitted on a copy of it, as that run would fit them once; the largest k is compress's own result.
    Seconds per k are what a run with that k alone takes in ``compress``: the dense predictions, the removals up to
    k (scoring, compensation and any block reconstruction) and the gains at k. The time this benchmark spends
    between steps (copies, smaller k's gains, evaluations) is paused out of the clock."""
    m = copy.deepcopy(model)
    kmax = max(ks)
    steps: list[Any] = []
    results: dict[int, Any] = {}
    paused = 0.0
    finish_at: list[float] = []  # the pruning seconds of the largest k, whose gains compress itself fits
    t0 = time.perf_counter()

    def finish(k: int, state: Any, prune_s: float, fit_s: float, fit: dict[str, Any] | None) -> None:
        ev = evaluate(state, evaluate.at(k), agree=True)
        results[k] = _record([r.chosen for r in steps[:k]], ev, seconds=teacher_seconds + prune_s + fit_s,
                             teacher_seconds=teacher_seconds, prune_seconds=prune_s, refine_seconds=fit_s,
                             refine=fit, reconstructed=[r.reconstruct is not None for r in steps[:k]],
                             reconstruct_kept=[(r.reconstruct or {}).get("kept") for r in steps[:k]])
        print(f"    [{label}] k={k}: {results[k]['ppl']}, agree {100 * results[k]['agree']['rate']:.1f}%, "
              f"{results[k]['seconds']:.0f} s", file=sys.stderr, flush=True)

    def on_step(record: Any, current: Any) -> None:
        nonlocal paused
        steps.append(record)
        now = time.perf_counter()
        k = len(steps)
        prune_s = now - t0 - paused
        if k == kmax:
            finish_at.append(prune_s)
        if k not in ks or k == kmax:
            return
        state, fit_s, fit = current, 0.0, None
        if targets is not None:
            state = copy.deepcopy(current)
            done = refine_as_configured(state, cal if fit_on is None else fit_on, targets, config, check)
            fit_s, fit = done.seconds, {k2: v for k2, v in done.to_dict().items() if k2 != "losses"}
        finish(k, state, prune_s, fit_s, fit)
        paused += time.perf_counter() - now

    report = compress(m, cal, config, batch_size=batch, on_step=on_step, teacher=targets, refine_windows=fit_on,
                      check_windows=check)
    total = time.perf_counter() - t0 - paused
    fit = None if report.refine is None else {k2: v for k2, v in report.refine.items() if k2 != "losses"}
    finish(kmax, m, finish_at[0], total - finish_at[0], fit)
    return results


def _levels(lm: Any, args: argparse.Namespace, ks: list[int], evaluate: Evaluator, result: dict[str, Any],
            save: Any) -> None:
    """Every level (``--levels``) at every k, once per calibration seed (``--seeds``), with the naive removal of
    each seed; ``save()`` after each run so an interrupted protocol keeps what it measured."""
    levels = args.levels.split(",")
    for level in levels:
        if level not in ANCHORS:
            level_settings(level, args.calib_samples)  # an unknown level fails before any compute
    evaluate.set_reference(lm.model)
    positions = sum(ref.numel() for ref in evaluate.reference.values())  # the dense model agrees with itself
    result["dense"]["agree"] = Agreement(positions, positions).to_dict()
    result.update(levels={}, naive={}, calibration_seeds={})
    for seed in (int(s) for s in args.seeds.split(",")):
        cal = calibration_windows(lm.tokenizer, args.calib_source, n_samples=args.calib_samples,
                                  seq_len=args.calib_seq_len, seed=seed)
        result["calibration_seeds"][seed] = {"origin": cal.origin, "digest": cal.digest}
        t = time.perf_counter()
        result["naive"][seed] = _naive_run(lm.model, cal, ks, evaluate, args.batch_size)
        print(f"  [naive, seed {seed}] {time.perf_counter() - t:.0f} s: "
              + ", ".join(f"k={k} {r['ppl']['mean']:.2f}" for k, r in result["naive"][seed].items()),
              file=sys.stderr, flush=True)
        save()
        teachers: dict[tuple[int, int], tuple[Any, float]] = {}  # (fit windows, top-k) -> predictions, seconds
        for level in levels:
            if level in ANCHORS:  # a published baseline at the same seed, on the same table
                t = time.perf_counter()
                result["levels"].setdefault(level, {})[seed] = _anchor(lm.model, cal, ks, level, evaluate,
                                                                       args.batch_size, agree=True)
                print(f"  [{level}, seed {seed}] {time.perf_counter() - t:.0f} s in all", file=sys.stderr, flush=True)
                save()
                continue
            config = _level_config(level, max(ks), cal.n)
            fit_on = _level_fit_windows(lm.tokenizer, config, args, seed)
            targets, teacher_s = None, 0.0
            if config.refine != "none":
                key = (cal.n if fit_on is None else fit_on.n, config.refine_topk)
                if key not in teachers:
                    t = time.perf_counter()
                    teachers[key] = (teacher_for(lm.model, cal if fit_on is None else fit_on, config,
                                                 batch_size=args.batch_size), time.perf_counter() - t)
                targets, teacher_s = teachers[key]
            t = time.perf_counter()
            print(f"[{level}, seed {seed}]", file=sys.stderr, flush=True)
            check = None if not config.decides_held_out else decision_windows(lm.tokenizer, held_out_config(
                CalibrationConfig(source=args.calib_source, n_samples=cal.n, seq_len=args.calib_seq_len, seed=seed),
                config), None)  # the held-out decisions' windows, as the product draws them
            runs = _level_run(lm.model, cal, config, fit_on, targets, teacher_s, ks, evaluate, args.batch_size,
                              f"{level}, seed {seed}", check)
            result["levels"].setdefault(level, {})[seed] = runs
            print(f"  [{level}, seed {seed}] {time.perf_counter() - t:.0f} s in all", file=sys.stderr, flush=True)
            save()


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
    ap.add_argument("--levels", default=None,
                    help="levels mode: these quality levels (fast,balanced,best) as the product runs them, one table")
    ap.add_argument("--seeds", default="0,1,2",
                    help="levels mode: calibration seeds, each a full run of every level (default: the protocol's 3)")
    ap.add_argument("--qa-limit", type=int, default=None,
                    help="items per QA task (seeded subset); 0 skips QA (default 30; with --levels 0)")
    ap.add_argument("--qa-ks", default=None,
                    help="k values whose models get QA (comma list or 'all'; default 5, with --levels all); "
                    "dense always")
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
    ap.add_argument("--out", default=None,
                    help="result JSON (default bench/results/quality.json; with --levels quality_levels.json)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 when sharing the machine)")
    ap.add_argument("--render", nargs="+", default=None, help="only render these result JSONs as one table")
    args = ap.parse_args()
    if args.qa_limit is None:
        args.qa_limit = 0 if args.levels else 30
    if args.qa_ks is None:
        args.qa_ks = "all" if args.levels else "5"
    if args.out is None:
        args.out = "bench/results/quality_levels.json" if args.levels else "bench/results/quality.json"
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
    from measures import machine_load, stamp  # bench/: imported by path

    load_before = machine_load()
    ks = sorted(int(k) for k in args.ks.split(","))
    lm = load_model(args.model)
    windows = {}
    for d in args.datasets.split(","):  # "name@N": the first N windows of that corpus, outside the mean
        name, _, n = d.partition("@")
        windows[d] = evaluation_windows(lm.tokenizer, name, seq_len=args.eval_seq_len,
                                        max_windows=int(n) if n else args.eval_max_windows)
    evaluate = Evaluator(lm.tokenizer, windows, args)
    if args.levels:
        result: dict[str, Any] = {"settings": _settings(args, lm, windows), "dense": evaluate(lm.model)}
        print(f"dense: {result['dense']['ppl']}", file=sys.stderr, flush=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)

        def save() -> None:
            result["seconds"] = time.perf_counter() - t0
            result.update(stamp(Path(__file__).resolve().parents[1], load_before))
            out.write_text(json.dumps(result, indent=2))  # partial results survive an interrupted run

        _levels(lm, args, ks, evaluate, result, save)
        save()
        print(render([json.loads(out.read_text())]))  # through JSON: the table a later --render prints
        return
    cal = calibration_windows(lm.tokenizer, args.calib_source, n_samples=args.calib_samples,
                              seq_len=args.calib_seq_len, seed=0)
    teacher, fit_on = None, cal
    if any(v.startswith(("refine", "reconstruct", "refit")) for v in args.variants.split(",")):  # fitting windows
        if args.refine_samples:
            fit_on = calibration_windows(lm.tokenizer, args.calib_source, n_samples=args.refine_samples,
                                         seq_len=args.calib_seq_len, seed=0)
        if any(v.startswith("refine") for v in args.variants.split(",")):
            teacher = teacher_targets(lm.model, fit_on.ids, topk=args.refine_topk, batch_size=args.batch_size)
    result = {"settings": {**_settings(args, lm, windows), "calibration": cal.origin}, "dense": evaluate(lm.model),
              "metrics": {}}
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
            elif variant in ANCHORS:
                res = _anchor(lm.model, cal, ks, variant, evaluate, args.batch_size)
            else:
                res = _iterative(lm.model, cal, metric, ks, variant, evaluate, args.batch_size, args, teacher,
                                 fit_on)
            per[variant] = {"results": res, "seconds": time.perf_counter() - t}
            result["metrics"][metric] = per
            result["seconds"] = time.perf_counter() - t0
            result.update(stamp(Path(__file__).resolve().parents[1], load_before))
            out.write_text(json.dumps(result, indent=2))  # partial results survive an interrupted run
    print(render([result]))


def _settings(args: argparse.Namespace, lm: Any, windows: dict[str, Any]) -> dict[str, Any]:
    """What a result file records of how it was measured."""
    return {**vars(args), "model_hash": lm.content_hash,
            "eval_tokens": {d: int(w.ids.numel()) for d, w in windows.items()},
            "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()}


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
                 "refine-reconstruct-refit", "refit", "refine-refit", "replaceme", "linearpatch", "ghosted")
ANCHORS = ("replaceme", "linearpatch", "ghosted")
ANCHOR_LABELS = {"replaceme": "ReplaceMe (anchor)", "linearpatch": "LinearPatch (anchor, + run-time matmul)",
                 "ghosted": "Ghosted Layers (baseline, + a run-time matmul per cut)"}
"""How the levels table names the published methods run beside the levels (``--levels best,replaceme,...``)."""
REFINED = ("refine", "refine-guarded", "refine-none", "refine-lsq", "refine+select", "refine-reconstruct",
           "refine-reconstruct-refit", "refine-refit")


def render(results: list[dict[str, Any]]) -> str:
    """Markdown table: one row per (metric, k, variant), merged over result files of the same protocol, then the
    summary of what compensation (and refinement) changed against each metric's baseline. Result files of the
    levels mode (``--levels``) render as the levels table instead (:func:`render_levels`)."""
    if any("levels" in result for result in results):
        if not all("levels" in result for result in results):
            raise SystemExit("error: levels-mode result files render apart from the variants' (one table each)")
        return render_levels(results)
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
    """Per k: the anchors (ReplaceMe; LinearPatch and Ghosted Layers, which add run-time matmuls) beside
    prunecomp's default (guarded BI), its best zero-overhead variant over every metric and variant measured, and
    how far ahead (negative %) or behind each one is."""
    ks = sorted({k for per in merged.values() for v in per.values() for k in v})
    labels = {"replaceme": "ReplaceMe (zero overhead)", "linearpatch": "LinearPatch (+ run-time matmul)",
              "ghosted": "Ghosted Layers (+ a run-time matmul per cut)"}
    present = [a for a in ANCHORS if any(a in per for per in merged.values())] or ["replaceme", "linearpatch"]
    short = {"replaceme": "ReplaceMe", "linearpatch": "LinearPatch", "ghosted": "Ghosted"}
    head = (["k", *(labels[a] for a in present), "prunecomp default (guarded BI)", "prunecomp best (variant)"]
            + [f"{who} vs {short[a]}" for who in ("default", "best") for a in present])
    lines = ["| " + " | ".join(head) + " |",
             "|" + "---:|" * (1 + len(present) + 1) + "---|" + "---:|" * (2 * len(present))]

    def mean(metric: str, variant: str, k: int) -> float | None:
        r = merged.get(metric, {}).get(variant, {}).get(k)
        return None if r is None else float(r["ppl"]["mean"])

    def pct(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None else _pct(a, b)

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for k in ks:
        anchors = [next((v for m in merged if (v := mean(m, a, k)) is not None), None) for a in present]
        default = mean("bi", "guarded", k)
        ours = [(v, f"{m}/{var}") for m, per in merged.items() for var in per if var not in ANCHORS
                and var not in ("one-shot", "iterative") and (v := mean(m, var, k)) is not None]
        best = min(ours) if ours else None
        row = [str(k), *(cell(v) for v in anchors), cell(default),
               "-" if best is None else f"{best[0]:.2f} ({best[1]})"]
        row += [pct(default, v) for v in anchors] + [pct(best and best[0], v) for v in anchors]
        lines.append("| " + " | ".join(row) + " |")
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


LEVEL_TARGETS: dict[str, dict[int, tuple[float, float]]] = {"best": {3: (80.0, 75.0), 5: (80.0, 75.0),
                                                                     8: (75.0, 70.0)}}
"""Level -> k -> (mean over seeds, worst seed) recovered % it must reach on the quality protocol: printed beside
every levels table, so a result that misses them says so where it is read."""

CORPUS_NAMES = {"wikitext2": "WikiText-2", "c4": "C4", "ptb": "PTB"}


def _mean(values: list[float | None]) -> float | None:
    """Mean of the measured values; None when any is missing (a mean over fewer seeds would not be the row's)."""
    if not values or any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None) / len(values)


def _retained_se(qa: dict[str, Any], dense_qa: dict[str, Any]) -> float:
    """Standard error (points) of QA retained ``100 * pruned average / dense average``: the delta method over the
    two averages' binomial errors (:func:`_qa_se`), taken as independent. That overstates it (both models answer
    the same items, so their errors are correlated), but a paired error needs per-item outcomes, which the cached
    results do not keep: read it as an upper bound."""
    p, d = qa["average"], dense_qa["average"]
    return 100.0 * math.sqrt((_qa_se(qa) / d) ** 2 + (p * _qa_se(dense_qa) / d**2) ** 2)


@dataclass(frozen=True)
class LevelRow:
    """One (level, k) of the levels table, seed by seed (seeds in ascending order): the numbers its mean and
    worst cells are computed from. None where that seed lacks the measurement (no naive run, no QA)."""

    level: str
    k: int
    seeds: tuple[int, ...]
    corpora: dict[str, float]  # corpus -> perplexity, mean over the seeds
    ppl: tuple[float, ...]  # mean perplexity of the corpora, per seed
    naive: tuple[float | None, ...]  # the naive removal's mean perplexity, per seed
    recovered: tuple[float | None, ...]  # %, per seed, each against its own seed's naive removal
    agree: tuple[float | None, ...]  # top-1 agreement %, per seed
    qa: tuple[tuple[float, float] | None, ...]  # (QA retained %, its standard error), per seed
    seconds: tuple[float | None, ...]

    @property
    def mean_ppl(self) -> float:
        return sum(self.ppl) / len(self.ppl)

    @property
    def worst_ppl(self) -> float:
        return max(self.ppl)

    @property
    def mean_recovered(self) -> float | None:
        return _mean(list(self.recovered))

    @property
    def worst_recovered(self) -> float | None:
        return None if any(r is None for r in self.recovered) else min(r for r in self.recovered if r is not None)

    @property
    def mean_agree(self) -> float | None:
        return _mean(list(self.agree))

    @property
    def worst_agree(self) -> float | None:
        return None if any(a is None for a in self.agree) else min(a for a in self.agree if a is not None)

    def targets(self) -> list[tuple[str, float, float | None, bool | None]]:
        """``(what, target %, measured %, met)`` of the level's targets at this k (none for most rows); ``met`` is
        None when the measurement is missing."""
        goal = LEVEL_TARGETS.get(self.level, {}).get(self.k)
        if goal is None:
            return []
        out = []
        for what, target, got in (("mean", goal[0], self.mean_recovered), ("worst seed", goal[1],
                                                                             self.worst_recovered)):
            out.append((what, target, got, None if got is None else got >= target))
        return out


def _dense_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The dense model's measurements over several result files of one protocol: the first file's, plus what only
    a later one measured (QA, when only one seed's process ran it)."""
    dense: dict[str, Any] = {}
    for result in results:
        dense = {**result["dense"], **dense}
    return dense


def _merged_levels(results: list[dict[str, Any]]) -> tuple[dict[str, dict[int, dict[int, Any]]],
                                                           dict[int, dict[int, Any]]]:
    """level -> seed -> k -> record, and seed -> k -> naive record, over several result files (seeds or levels
    split over processes); a later file's record replaces an earlier one."""
    levels: dict[str, dict[int, dict[int, Any]]] = {}
    naive: dict[int, dict[int, Any]] = {}
    for result in results:
        for level, per_seed in result.get("levels", {}).items():
            for seed, per_k in per_seed.items():
                for k, r in per_k.items():
                    levels.setdefault(level, {}).setdefault(int(seed), {})[int(k)] = r
        for seed, per_k in result.get("naive", {}).items():
            for k, r in per_k.items():
                naive.setdefault(int(seed), {})[int(k)] = r
    return levels, naive


def level_rows(results: list[dict[str, Any]]) -> list[LevelRow]:
    """The rows of the levels table: levels in the product's order (``prunecomp/levels.py``), then k ascending."""
    dense = _dense_of(results)
    dense_mean = dense["ppl"]["mean"]
    corpora = [d for d in dense["ppl"] if d != "mean" and "@" not in d]
    levels, naive = _merged_levels(results)
    order = [lv for lv in LEVELS if lv in levels] + sorted(lv for lv in levels if lv not in LEVELS)
    rows = []
    for level in order:
        per_seed = levels[level]
        for k in sorted({k for per_k in per_seed.values() for k in per_k}):
            seeds = tuple(sorted(s for s in per_seed if k in per_seed[s]))
            recs = [per_seed[s][k] for s in seeds]
            naives = [naive.get(s, {}).get(k, {}).get("ppl", {}).get("mean") for s in seeds]
            qa: list[tuple[float, float] | None] = []
            for r in recs:
                if "qa" in r and "qa" in dense:
                    qa.append((float(retained(r["qa"], dense["qa"])["overall"]), _retained_se(r["qa"], dense["qa"])))
                else:
                    qa.append(None)
            rows.append(LevelRow(
                level=level, k=k, seeds=seeds,
                corpora={d: sum(r["ppl"][d] for r in recs) / len(recs) for d in corpora},
                ppl=tuple(float(r["ppl"]["mean"]) for r in recs),
                naive=tuple(naives),
                recovered=tuple(None if n is None else recovered(r["ppl"]["mean"], n, dense_mean)
                                for r, n in zip(recs, naives, strict=True)),
                agree=tuple(100.0 * r["agree"]["rate"] if "agree" in r else None for r in recs),
                qa=tuple(qa),
                seconds=tuple(r.get("seconds") for r in recs)))
    return rows


def _cell(value: float | None, fmt: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def _target_cell(row: LevelRow) -> str:
    checks = row.targets()
    if not checks:
        return "-"
    return "; ".join(f"{what} >= {target:.0f}%: {'?' if met is None else 'met' if met else '**NOT met**'}"
                     for what, target, _got, met in checks)


def render_levels(results: list[dict[str, Any]]) -> str:
    """The levels table (one row per level and k, mean and worst over the calibration seeds), its notes, and the
    targets' verdicts; several result files (seeds or levels split over processes) render as one table."""
    first = results[0]
    dense, s = _dense_of(results), first["settings"]
    corpora = [d for d in dense["ppl"] if d != "mean" and "@" not in d]
    rows = level_rows(results)
    has_qa = any(q is not None for row in rows for q in row.qa)
    head = ("| level | k | seeds | " + " | ".join(CORPUS_NAMES.get(d, d) for d in corpora)
            + " | mean PPL | worst PPL | recovered | worst recovered | naive PPL per seed | agree % | worst agree % |")
    head += " QA retained % (± SE) | worst QA retained % |" if has_qa else ""
    head += " seconds | targets |"
    lines = [head, "|---|---:|---|" + "---:|" * (len(corpora) + 7) + ("---:|---:|" if has_qa else "") + "---:|---|"]
    dense_cells = [f"{dense['ppl'][d]:.2f}" for d in corpora] + [f"{dense['ppl']['mean']:.2f}", "-", "-", "-", "-",
                                                                "100.0", "-"]
    if has_qa:
        dense_cells += [f"100 (average {100 * dense['qa']['average']:.1f} ± {100 * _qa_se(dense['qa']):.1f})", "-"]
    lines.append("| dense | 0 | - | " + " | ".join(dense_cells) + " | - | - |")
    for row in rows:
        cells = [f"{row.corpora[d]:.2f}" for d in corpora]
        cells += [f"{row.mean_ppl:.2f}", f"{row.worst_ppl:.2f}", _cell(row.mean_recovered, ".1f", "%"),
                  _cell(row.worst_recovered, ".1f", "%"),
                  ", ".join(f"s{seed} {_cell(n)}" for seed, n in zip(row.seeds, row.naive, strict=True)),
                  _cell(row.mean_agree, ".1f"), _cell(row.worst_agree, ".1f")]
        if has_qa:
            kept = [q for q in row.qa if q is not None]  # QA may be measured on some seeds only (--qa-limit)
            if kept:
                part = "" if len(kept) == len(row.qa) else f" ({len(kept)} of {len(row.qa)} seeds)"
                cells += [f"{sum(q[0] for q in kept) / len(kept):.1f} ± {sum(q[1] for q in kept) / len(kept):.1f}"
                          + part, f"{min(q[0] for q in kept):.1f}"]
            else:
                cells += ["-", "-"]
        seconds = _mean(list(row.seconds))
        cells += [_cell(seconds, ".0f" if seconds is None or seconds >= 10 else ".1f"), _target_cell(row)]
        label = ANCHOR_LABELS.get(row.level, row.level)
        lines.append(f"| {label} | {row.k} | {','.join(map(str, row.seeds))} | " + " | ".join(cells) + " |")
    positions = (dense.get("agree") or {}).get("total")
    fit = max(64, int(s.get("calib_samples", 0)))
    note = (f"Calibration: {s.get('calib_samples')} x {s.get('calib_seq_len')} tokens of {s.get('calib_source')} "
            f"per seed (seeds in the row); the fitting levels fit on max(64, {s.get('calib_samples')}) = {fit} "
            f"windows of it, same seed (prunecomp/levels.py). Perplexity: first {s.get('eval_max_windows')} x "
            f"{s.get('eval_seq_len')}-token windows per corpus; cells are means over the seeds, mean PPL is the "
            "mean of the corpora; worst = the seed with the highest mean PPL / lowest recovered / lowest agreement. "
            "Recovered = (naive - level) / (naive - dense) of mean PPL (bench/measures.py), each seed against its "
            "own naive removal (iterative BI, --compensation none, the same calibration; its mean PPL per seed "
            "in 'naive'). Agree = share of the evaluation positions")
    if positions:
        note += (f" ({positions} of them, the corpora pooled; binomial standard error at most "
                 f"{50 / math.sqrt(positions):.1f} points, positions taken as independent)")
    note += (" where the pruned model's greedy next token is the dense model's (prunecomp/evaluation/agreement.py). "
             "Seconds: compress for that k alone (dense predictions, removals with their reconstruction, gains), "
             f"mean over the seeds, {s.get('threads', '?')} thread(s); evaluation excluded. The level's metric is "
             "BI, iterative (the product's default).")
    lines += ["", note]
    if has_qa:
        lines += ["", _qa_note(dense["qa"], dense["qa"].get("limit"))]
    verdicts = [(row, check) for row in rows for check in row.targets()]
    if verdicts:
        lines += ["", "Targets (recovered, mean over seeds and worst seed):"]
        for row, (what, target, got, met) in verdicts:
            lines.append(f"- {row.level} at k = {row.k}, {what} ({len(row.seeds)} seed(s)): {_cell(got, '.1f', '%')} "
                         f"against >= {target:.0f}%: " + ("not measured" if met is None else "met" if met
                                                          else "**NOT met**"))
    return "\n".join(lines)


def _qa_note(dense_qa: dict[str, Any], limit: int | None) -> str:
    """What the QA cells are, and how precise: the standard error of the dense average with this many items per
    task and what it would be with 200, 300 and 500 (binomial, the dense per-task scores, tasks capped at their
    size), so a reader sees how many items give about one point."""
    tasks = dense_qa["tasks"]
    n = sum(t["n"] for t in tasks.values())

    def se_at(items: int) -> float:
        var = sum(t["score"] * (1 - t["score"]) / max(min(items, t.get("n_total") or items), 1)
                  for t in tasks.values())
        return 100 * math.sqrt(var) / len(tasks)

    return (f"QA: lm-eval zero-shot, {limit} seeded items per task ({n} items: {', '.join(tasks)}); retained = "
            "pruned / dense average x 100, ± its standard error (delta method, the two averages taken as "
            "independent: an upper bound, both models answer the same items); worst = the lowest seed. Standard "
            f"error of the dense average: {100 * _qa_se(dense_qa):.1f} points; at 200 / 300 / 500 items per task it "
            f"would be {se_at(200):.1f} / {se_at(300):.1f} / {se_at(500):.1f} points.")


if __name__ == "__main__":
    main()
