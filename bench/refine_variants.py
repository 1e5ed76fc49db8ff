"""Refinement variants for the next quality step, on the quality protocol of bench/quality.py
(SmolLM2-135M; pruning calibration 8 x 512 tokens of C4, seed 0; mean perplexity of the first 8 x 512-token
windows of WikiText-2, C4 and PTB; evaluations cached by weights digest with bench/quality.py's cache).

Two experiments, one JSON line each in --out (settings, removed layers, mean PPL and fitting seconds per point):

* end (default): remove k layers (BI, --start compensation; the pruned state is cached under --work), then fit
  per-channel gains (``--refine channels``) and optionally rank-r deltas on the residual writers (``--rank``;
  merged into the weights at the end, so still zero run-time cost) against the dense model's top-k predictions on
  --samples calibration windows; mean PPL at the --evals steps.
* progressive (``--progressive N``): the product's ``--refine-at each`` (:func:`prunecomp.engine.compress.compress`):
  remove one layer (re-scored on the current, refined model), refine N steps, repeat k times; mean PPL after
  every removal. With ``--rank`` also rank-r deltas, merged after every fit (a research variant). ``--start lsq``
  folds each step's least-squares gap map before that step's fit (the product's ``--compensation lsq
  --refine-at each``); research options: ``--lsq-samples N`` fits the maps on N refinement windows instead of
  the 8 pruning windows, ``--force a,b,c`` removes those layers in that order, ``--calib c4,wikitext2,ptb``
  splits the pruning and refinement windows between several corpora's calibration text, ``--judge-calib
  c4,wikitext2,ptb --pool 2`` chooses between BI's two lowest scores by the NLL on those corpora's calibration
  text (BI itself stays on C4), ``--hidden W`` adds W x the distance (1 - cos) between the refined model's
  residual streams and the dense model's after the same original layers to the fit's loss (``--hidden-layers
  last``: only the final normed stream), ``--holdout N --check-every M`` keeps N windows out of the fit and folds
  the gains of the check with the lowest KL on them (early stopping), ``--local-steps N`` fine-tunes the
  remaining layer before the gap (all its weights, in place) for N steps to reproduce the stream the removed layer
  left, before each fit (block reconstruction; ``--local-target self``: the model's own stream before the removal,
  no dense copy).

    .venv/bin/python bench/refine_variants.py --k 5 --samples 64 --progressive 32 --label prog32
    .venv/bin/python bench/refine_variants.py --k 5 --samples 64 --steps 80 --rank 8 --evals 40,80 --label lr8
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from prunecomp.config import PruneConfig
from prunecomp.corpora.calibration import TokenWindows, calibration_windows, evaluation_windows
from prunecomp.engine.compress import compress
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.evaluation.perplexity import mean_nll
from prunecomp.method.reconstruct import fit_layers
from prunecomp.method.refine import (
    Gain,
    RefineReport,
    TeacherTargets,
    _eval_loss,
    distill_loss,
    fold_gains,
    gains,
    gains_applied,
    teacher_targets,
)
from prunecomp.models.adapters import decoder_layers, get_adapter, resolve
from prunecomp.models.pruning import original_indices, remove_layer
from prunecomp.models.sequential import catch_layer_inputs, run_layer
from prunecomp.models.sources import load_model
from prunecomp.recipes.report import StepRecord

sys.path.insert(0, str(Path(__file__).parent))
from quality import Evaluator


class LowRank:
    """A rank-r delta ``B A`` on a linear's output (B starts at zero), applied by a hook, merged at the end."""

    def __init__(self, module: nn.Linear, rank: int, gen: torch.Generator) -> None:
        self.module = module
        out_f, in_f = module.weight.shape
        self.a = nn.Parameter(torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f))
        self.b = nn.Parameter(torch.zeros(out_f, rank))

    def hook(self, _m: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + (args[0].float() @ self.a.t() @ self.b.t()).to(output.dtype)

    @torch.no_grad()
    def fold(self, module: nn.Module | None = None) -> None:
        """Merge ``B A`` into ``module``'s weight (default: the hooked module)."""
        w = (module or self.module).weight
        w.copy_((w.float() + self.b @ self.a).to(w.dtype))


def folded_copy(model: nn.Module, items: list[Gain], lows: list[LowRank]) -> nn.Module:
    """A copy of ``model`` (which runs with the gains and deltas as hooks) with them merged into its weights:
    deltas first, then :func:`prunecomp.method.refine.fold_gains`, i.e. ``W' = diag(g) (W + B A)``, as the hooks
    compute."""
    snap = copy.deepcopy(model)
    for m in snap.modules():  # the copied hooks would apply the gains a second time
        m._forward_hooks.clear()
    where = dict(snap.named_modules())
    name = {id(m): n for n, m in model.named_modules()}
    for low in lows:
        low.fold(where[name[id(low.module)]])
    fold_gains([Gain(where[name[id(g.module)]], g.value, g.kind, g.offset) for g in items])
    return snap


def render(path: str, dense: float = 44.58, naive: dict[int, float] | None = None) -> str:
    """Markdown table of the JSON lines in ``path``: mean PPL per point and the share recovered, against the naive
    rows (``--compensation none``, iterative BI: 68.25, 93.05, 175.96 at k = 3, 5, 8): the results document's
    one table and one definition (``bench/results_doc.py``)."""
    from results_doc import variants_table

    return variants_table(Path(path), naive or {3: 68.25, 5: 93.05, 8: 175.96}, dense)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--render", default=None, help="only print the table of this JSON-lines file")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--loss", default="topk",
                    help="refinement loss (topk: the loss refine_variants.jsonl was measured with)")
    ap.add_argument("--metric", default="bi")
    ap.add_argument("--start", default="guarded")
    ap.add_argument("--selection", default="score")
    ap.add_argument("--pool", type=int, default=4, help="with --selection loss: how many of the lowest-scoring layers")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--lr-lowrank", type=float, default=1e-3)
    ap.add_argument("--lowrank-on", default="writers", help="writers | all")
    ap.add_argument("--tune", default="", help="also fine-tune these weights in place, full rank "
                    "(writers: every layer's residual writers; all: every linear of the layers)")
    ap.add_argument("--lr-tune", type=float, default=1e-5)
    ap.add_argument("--fit-candidates", type=int, default=0, help="research loop: remove and fit each of this many "
                    "lowest-scoring layers (same batch order) and keep the one whose fit matches the teacher best "
                    "on the first 16 windows")
    ap.add_argument("--average", action="store_true", help="research loop: fold the mean of the gains over the last "
                    "half of each fit's steps (tail averaging) instead of their last value")
    ap.add_argument("--seed", type=int, default=0, help="with --progressive: not 0 runs the gains alone through the "
                    "research loop with this seed for the batch order (how much the order alone moves a row)")
    ap.add_argument("--lsq-samples", type=int, default=0, help="with --start lsq: fit each gap map on the first N "
                    "refinement windows instead of the 8 pruning windows (research loop)")
    ap.add_argument("--force", default="", help="research loop: remove these original layers in this order "
                    "(comma-separated) instead of the lowest-scoring ones")
    ap.add_argument("--calib", default="c4", help="calibration corpora, comma-separated: the pruning and refinement "
                    "windows are split evenly between their calibration splits (e.g. c4,wikitext2,ptb)")
    ap.add_argument("--judge-calib", default="", help="research loop: choose between the --pool lowest BI scores by "
                    "the NLL, once removed (guarded, not fitted), on --judge-samples windows of these corpora's "
                    "calibration text (comma-separated)")
    ap.add_argument("--judge-samples", type=int, default=24)
    ap.add_argument("--hidden", type=float, default=0.0, help="research loop: add this weight times the mean over "
                    "the student's layers of (1 - cos) between its residual stream and the dense model's at the same "
                    "original layer (positions after the first; the dense model runs beside the fit, no grad)")
    ap.add_argument("--hidden-layers", default="all", choices=("all", "last"),
                    help="with --hidden: the streams compared, after every layer (all) or only the last one, after "
                    "the final norm (last: a teacher small enough to cache)")
    ap.add_argument("--holdout", type=int, default=0, help="research loop: fit on all but the last N refinement "
                    "windows; every --check-every steps (and before the first) measure the KL on those N and fold "
                    "the gains of the best check (early stopping)")
    ap.add_argument("--check-every", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=0, help="research loop: after each removal, before the gains' "
                    "fit, fine-tune the whole layer(s) beside the gap (--local-layers) for this many Adam steps so "
                    "that, fed the pruned model's own stream, they write the stream the removed layer left "
                    "(--local-target): block reconstruction, full rank, in place")
    ap.add_argument("--local-layers", default="before", choices=("before", "after", "both"))
    ap.add_argument("--local-target", default="dense", choices=("dense", "self"),
                    help="with --local-steps: the stream to reproduce, the dense model's or the model's own before "
                    "this removal (self: no dense copy needed; the same at the first removal)")
    ap.add_argument("--local-lr", type=float, default=1e-4)
    ap.add_argument("--one-pass", action="store_true", help="with --local-target self: read both streams from one "
                    "pass of the model before the removal (the pruned model's stream before the gap is that one "
                    "times the folded gap scale)")
    ap.add_argument("--step-gains", type=int, default=-1, help="research loop: gains steps after each removal "
                    "(default: --progressive; 0: none, the local fit alone between removals)")
    ap.add_argument("--branch-at", default="", help="research loop: after these removal counts (comma-separated), "
                    "fit the gains --branch-steps steps on a copy (end refinement from that state) and evaluate it at "
                    "--branch-evals; the run itself goes on from the unfitted state")
    ap.add_argument("--branch-steps", type=int, default=80)
    ap.add_argument("--seq-steps", type=int, default=0, help="with --branch-at: before the branch's gains, refit every "
                    "layer from the first gap on, in order, for this many steps each, fed the pruned model's stream "
                    "(through the layers already refitted) to write the dense model's stream after the same original "
                    "layer (sequential layer-wise reconstruction; --local-lr, --local-batch)")
    ap.add_argument("--branch-evals", default="40,80")
    ap.add_argument("--local-batch", type=int, default=4)
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--evals", default="80")
    ap.add_argument("--label", default="")
    ap.add_argument("--progressive", type=int, default=0, help="refine this many steps after every removal")
    ap.add_argument("--out", default="bench/results/refine_variants.jsonl")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--work", default="/tmp/refine_variants", help="where pruned start states are cached")
    args = ap.parse_args()
    if args.render:
        print(render(args.render))
        return
    if args.holdout and (args.rank or args.tune or args.average or args.fit_candidates or not args.progressive):
        raise SystemExit("error: --holdout keeps the best gains of each progressive fit: it needs --progressive, "
                         "and not --rank, --tune, --average or --fit-candidates")
    if args.local_steps and (args.fit_candidates or not args.progressive):
        raise SystemExit("error: --local-steps fits the layer beside each gap of a progressive run: it needs "
                         "--progressive, and not --fit-candidates")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lm = load_model(None)
    tok = lm.tokenizer
    cal = _windows(tok, args.calib, 8)
    fit = _windows(tok, args.calib, args.samples)
    windows = {d: evaluation_windows(tok, d, seq_len=512, max_windows=8) for d in ("wikitext2", "c4", "ptb")}
    ev = Evaluator(tok, windows, argparse.Namespace(cache=args.cache, eval_seq_len=512,
                                                    eval_max_windows=8, datasets="wikitext2,c4,ptb", qa_limit=0,
                                                    qa_tasks="", data_dir=""))
    t0 = time.perf_counter()
    targets = teacher_targets(lm.model, fit.ids, topk=args.topk)
    t_teacher = time.perf_counter() - t0
    research = args.rank or args.tune or args.seed or args.average or args.fit_candidates or args.lsq_samples \
        or args.force or args.judge_calib or args.hidden or args.holdout or args.local_steps or args.branch_at \
        or args.step_gains >= 0
    if args.hidden:
        DENSE.append(lm.model)
    DENSE_MODEL.append(lm.model)
    local_gen = torch.Generator().manual_seed(1000 + args.seed)  # its own draws: the gains' batch order unchanged
    if args.lsq_samples:  # the gap maps see more tokens than the scores do
        import prunecomp.engine.loop as loop_mod

        fit_map, lsq_ids = loop_mod.fit_gap_map, fit.ids[: args.lsq_samples]
        loop_mod.fit_gap_map = lambda model, _ids, *a, **kw: fit_map(model, lsq_ids, *a, **kw)
    if args.progressive and not research:  # the product: compress(refine_at="each")
        model = copy.deepcopy(lm.model)
        out = {"args": vars(args), "ppl": {}, "seconds": {}, "teacher_s": t_teacher, "removed": [], "chosen": []}
        t = time.perf_counter()

        def after_fit(done: RefineReport, step: StepRecord | None, m: nn.Module) -> None:
            nonlocal t
            assert step is not None
            i = len(out["chosen"]) + 1
            out["seconds"][i] = time.perf_counter() - t
            out["chosen"].append(step.chosen)  # in order: the first i are removed at i
            out["removed"] = sorted(out["chosen"])
            per = ev(m, False)["ppl"]  # cached: the per-corpus numbers say which corpus a choice costs
            out["ppl"][i], out.setdefault("ppl_corpus", {})[i] = per["mean"], per
            print(i, step.chosen, round(done.loss_before, 4), round(done.loss_after, 4), out["ppl"][i],
                  round(out["seconds"][i]), flush=True)
            t = time.perf_counter() - out["seconds"][i]  # time the pruning and fitting only

        compress(model, cal, PruneConfig(metric=args.metric, n_layers=args.k, compensation=args.start,
                                         selection=args.selection, selection_pool=args.pool,
                                         refine="channels", refine_at="each",
                                         refine_steps=args.progressive, refine_lr=args.lr,
                                         refine_batch=args.batch, refine_topk=args.topk),
                 teacher=targets, refine_windows=fit, on_refine=after_fit)
        _append(args, out)
        return
    if args.progressive:  # progressive with merged low-rank deltas or tuned weights: research variants
        model = copy.deepcopy(lm.model)
        out = {"args": vars(args), "ppl": {}, "seconds": {}, "teacher_s": t_teacher, "removed": [], "chosen": []}
        gen = torch.Generator().manual_seed(args.seed)
        t = time.perf_counter()
        n_src = lm.model.config.num_hidden_layers
        judge = TeacherTargets(targets.logprobs[:16], targets.indices[:16])
        judge_ids = _windows(tok, args.judge_calib, args.judge_samples).ids if args.judge_calib else None
        for i in range(1, args.k + 1):
            cfg = dict(metric=args.metric, n_layers=i, compensation=args.start, selection=args.selection,
                       selection_pool=args.pool)
            pruned = None  # (model, report) when a judge already removed the chosen layer on a copy
            if args.force:
                cfg["protect"] = _only(n_src, int(args.force.split(",")[i - 1]))
            elif args.judge_calib:
                rep = prune_and_compensate(copy.deepcopy(model), cal, PruneConfig(**cfg))
                pool = sorted(rep.steps[-1].scores.items(), key=lambda kv: kv[1])[: args.pool]
                judged = []
                for c, _ in pool:
                    m = copy.deepcopy(model)
                    r = prune_and_compensate(m, cal, PruneConfig(**cfg | {"protect": _only(n_src, int(c))}))
                    judged.append((mean_nll(m, judge_ids), int(c), m, r))
                out.setdefault("judged", {})[i] = [[c, v] for v, c, _, _ in judged]
                print("  judged", [(v, c) for v, c, _, _ in judged], flush=True)
                _, _, best, best_rep = min(judged, key=lambda t: t[0])
                pruned = (best, best_rep)
            if args.fit_candidates:
                rep = prune_and_compensate(copy.deepcopy(model), cal, PruneConfig(**cfg))
                low = sorted(rep.steps[-1].scores.items(), key=lambda kv: kv[1])[: args.fit_candidates]
                state, tried = gen.get_state(), []
                for c, _ in low:  # each candidate removed, compensated and fitted on the same batch order
                    gen.set_state(state)
                    m = copy.deepcopy(model)
                    r = prune_and_compensate(m, cal, PruneConfig(**cfg | {"protect": _only(n_src, int(c))}))
                    items, lows = _trainables(m, args, gen)
                    _fit(m, fit.ids, targets, items, lows, args, args.progressive, gen)
                    for lo in lows:
                        lo.fold()
                    fold_gains(items)
                    tried.append((_eval_loss(m, fit.ids[:16], judge, 2), int(c), m, r))
                    print("  candidate", int(c), round(tried[-1][0], 4), flush=True)
                _, _, model, rep = min(tried, key=lambda t: t[0])
                out.setdefault("candidates", {})[i] = [[c, kl] for kl, c, _, _ in tried]
            else:
                before = copy.deepcopy(model) if args.local_target == "self" else lm.model
                model, rep = pruned or (model, prune_and_compensate(model, cal, PruneConfig(**cfg)))
                if args.local_steps:
                    out.setdefault("local", {})[i] = _local_fit(model, before, fit.ids, rep.steps[-1].chosen,
                                                                args, local_gen, rep.steps[-1].applied_scale)
                items, lows = _trainables(model, args, gen)
                n_gain = args.progressive if args.step_gains < 0 else args.step_gains
                if n_gain:
                    _fit(model, fit.ids, targets, items, lows, args, n_gain, gen)
                if HOLDOUT:  # which step's gains were kept, and the held-out KL at every check
                    out.setdefault("holdout", {})[i] = [list(c) for c in HOLDOUT]
                    HOLDOUT.clear()
                for low in lows:  # merged in place: W' = diag(g) (W + B A), as the hooks computed
                    low.fold()
                fold_gains(items)
            out["seconds"][i] = time.perf_counter() - t
            out["chosen"].append(rep.steps[-1].chosen)
            out["removed"] = sorted(out["chosen"])
            per = ev(model, False)["ppl"]
            out["ppl"][i], out.setdefault("ppl_corpus", {})[i] = per["mean"], per
            low = sorted(rep.steps[-1].scores.items(), key=lambda kv: kv[1])[:3]  # how close the choice was
            out.setdefault("lowest_scores", {})[i] = [[int(j), float(v)] for j, v in low]
            g = rep.steps[-1].guard or {}
            out.setdefault("guard", {})[i] = {k: g.get(k) for k in ("decision", "scale", "map_kept", "map_loss")}
            if rep.steps[-1].gap_fit:
                out["guard"][i]["gap_fit"] = rep.steps[-1].gap_fit
            print(i, rep.steps[-1].chosen, out["ppl"][i], round(out["seconds"][i]), low, out["guard"][i], flush=True)
            if str(i) in args.branch_at.split(","):
                out.setdefault("branch", {})[i] = _branch(model, fit.ids, targets, args, ev)
            t = time.perf_counter() - out["seconds"][i]
        _append(args, out)
        return
    state = Path(args.work) / f"state_{args.metric}_{args.start}_{args.selection}_k{args.k}.pt"
    state.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(lm.model)
    if state.exists():
        saved = torch.load(state)
        for i in sorted(saved["removed"], reverse=True):
            remove_layer(model, i)
        model.load_state_dict(saved["sd"])
        removed = saved["removed"]
    else:
        rep = prune_and_compensate(model, cal, PruneConfig(metric=args.metric, n_layers=args.k,
                                                           compensation=args.start, selection=args.selection,
                                                           selection_pool=args.pool))
        removed = rep.removed
        torch.save({"removed": removed, "sd": model.state_dict()}, state)
    out = {"args": vars(args), "removed": removed, "ppl": {0: ev(model, False)["ppl"]["mean"]},
           "seconds": {}, "teacher_s": t_teacher}
    print(out, flush=True)
    gen = torch.Generator().manual_seed(0)
    items, lows = _trainables(model, args, gen)
    at = _checkpoints(args.evals, lambda: ev(folded_copy(model, items, lows), False)["ppl"], out, "")
    _fit(model, fit.ids, targets, items, lows, args, args.steps, gen, at)
    _append(args, out)
    print(json.dumps(out))


DENSE: list[nn.Module] = []  # with --hidden: the dense model, the teacher of the residual streams
DENSE_MODEL: list[nn.Module] = []  # the dense model (--seq-steps reads its streams)
HOLDOUT: list[tuple[int, float]] = []  # with --holdout: (step, held-out KL) of every check of the current fit


def _hidden_loss(model: nn.Module, student: tuple[torch.Tensor, ...], ids: torch.Tensor,
                 last_only: bool) -> torch.Tensor:
    """Mean over the student's layer outputs (the last one after the final norm, as HF returns it; with
    ``last_only`` only that one) of the mean over positions 1.. of ``1 - cos`` with the dense model's stream after
    the same original layer. Cosine, not MSE: magnitude compensation scales the stream before the gap on purpose,
    and every reader normalises it."""
    with torch.no_grad():
        teacher = DENSE[0](input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    orig = original_indices(model)
    n = len(orig)
    terms = []
    for j in (n,) if last_only else range(1, n + 1):
        t = teacher[orig[j - 1] + 1] if j < n else teacher[-1]
        terms.append(1 - nn.functional.cosine_similarity(student[j][:, 1:].float(), t[:, 1:].float(), dim=-1).mean())
    return torch.stack(terms).mean()


@torch.no_grad()
def _streams(model: nn.Module, ids: torch.Tensor, batch: int, points: tuple[int, ...]
             ) -> tuple[dict[int, list[torch.Tensor]], list[dict]]:
    """The residual stream entering each decoder layer of ``points`` of ``model`` (the layer count: leaving the
    last one) per batch of ``ids``, from one catch pass and layer-by-layer replay (the library's), and the kwargs
    of layer ``min(points[0], last)`` per batch."""
    caught = catch_layer_inputs(model, ids, batch)
    layers = decoder_layers(model)
    xs, out = caught.hidden, {}
    for j in range(max(points) + 1):
        if j in points:
            out[j] = xs
        if j < max(points):
            xs = run_layer(layers[j], xs, [kw[j] for kw in caught.kwargs])
    return out, [kw[min(points[0], len(layers) - 1)] for kw in caught.kwargs]


def _stream(model: nn.Module, ids: torch.Tensor, batch: int, upto: int) -> tuple[list[torch.Tensor], list[dict]]:
    """The residual stream entering decoder layer ``upto`` of ``model`` per batch (see :func:`_streams`)."""
    out, kws = _streams(model, ids, batch, (upto,))
    return out[upto], kws


def _local_fit(model: nn.Module, teacher: nn.Module, ids: torch.Tensor, chosen: int, args: argparse.Namespace,
               gen: torch.Generator, scale: float = 1.0) -> dict | None:
    """Block reconstruction beside the gap left by original layer ``chosen``: fine-tune every weight of the
    remaining layer before it (``before``), after it (``after``) or both, fed the pruned model's own stream, so
    that they write ``teacher``'s stream (the dense model's, or the model's before this removal) entering the
    next remaining layer (before) or leaving it (after, both).
    Loss: squared error over positions 1.. relative to the target's mean squared norm (position 0 is the
    attention sink with an outsized norm). Full rank and in place, so still zero run-time cost. Why: the gains
    and the global fit plateau at this budget, while one layer's forward and backward cost about a thirtieth of
    the model's, so a local fit can afford many more steps per token."""
    orig = original_indices(model)
    p = next((j for j, o in enumerate(orig) if o > chosen), len(orig))
    a, b = {"before": (p - 1, p - 1), "after": (p, p), "both": (p - 1, p)}[args.local_layers]
    if a < 0 or b >= len(orig):
        return None
    # Before the gap, the stream to reproduce is the teacher's entering the next remaining layer: for the dense
    # teacher the output of the original layer just before it (earlier removals may lie between), for the model
    # before this removal the output of ``chosen`` itself (which holds what earlier fits moved into it).
    if b >= p:
        target = orig[b]
    elif args.local_target == "self":
        target = chosen
    else:
        target = (orig[p] if p < len(orig) else len(decoder_layers(teacher))) - 1
    layers = decoder_layers(model, get_adapter(model))
    if args.local_target == "self" and args.one_pass:
        # One pass of the model before this removal gives both streams: before the gap the pruned model's stream
        # is that model's times the folded gap scale (every writer upstream was multiplied by it and every
        # reader normalises), so the pruned model needs no pass of its own.
        t_orig = original_indices(teacher)
        i_in = t_orig.index(orig[a - 1]) + 1 if a > 0 else 0  # what layer a reads: the stream after layer a - 1
        i_out = t_orig.index(target) + 1
        got, _ = _streams(teacher, ids, args.local_batch, (i_in, i_out))
        xs, ys = [x * scale for x in got[i_in]], got[i_out]
        kws = [kw[a] for kw in catch_layer_inputs(model, ids, args.local_batch).kwargs]  # embeddings only
    else:
        xs, kws = _stream(model, ids, args.local_batch, a)
        ys, _ = _stream(teacher, ids, args.local_batch, original_indices(teacher).index(target) + 1)
    t0 = time.perf_counter()
    before, after = fit_layers(layers[a : b + 1], xs, ys, [[kw] * (b + 1 - a) for kw in kws], steps=args.local_steps,
                               lr=args.local_lr, generator=gen)[:2]  # the library's fit (declined if it does not help)
    rec = {"layers": [int(orig[j]) for j in range(a, b + 1)], "target": int(target),
           "loss_before": before, "loss_after": after, "seconds": time.perf_counter() - t0}
    print("  local", rec, flush=True)
    return rec


def _branch(model: nn.Module, ids: torch.Tensor, targets: TeacherTargets, args: argparse.Namespace,
            ev: Callable) -> dict:
    """End refinement from this state, on a copy: the gains (``--refine channels``) fitted ``--branch-steps``
    steps (batch order from seed 0, as the end experiment), mean PPL and fitting seconds at ``--branch-evals``."""
    m = copy.deepcopy(model)
    rec: dict = {"steps": args.branch_steps, "ppl": {}, "ppl_corpus": {}, "seconds": {}}
    if args.seq_steps:
        rec["seq"] = _sequential(m, ids, args)
        per = ev(m, False)["ppl"]
        rec["ppl"][0], rec["ppl_corpus"][0], rec["seconds"][0] = per["mean"], per, rec["seq"]["seconds"]
        print("  sequential", per["mean"], round(rec["seq"]["seconds"]), flush=True)
    items, lows = _trainables(m, args, torch.Generator())
    gen = torch.Generator().manual_seed(0)
    at = _checkpoints(args.branch_evals, lambda: ev(folded_copy(m, items, lows), False)["ppl"], rec, "  branch")

    if args.branch_steps:
        _fit(m, ids, targets, items, lows, args, args.branch_steps, gen, at)
    return rec


def _checkpoints(evals: str, measure: Callable[[], dict], rec: dict, tag: str) -> Callable[[int, float], None]:
    """``at(step, loss)`` for :func:`_fit`: at the steps of ``evals`` (comma-separated) record into ``rec`` the
    mean PPL (``ppl``), the per-corpus PPL (``ppl_corpus``) and the fitting seconds so far, evaluation excluded."""
    wanted = {int(x) for x in evals.split(",")}
    start = [time.perf_counter()]

    def at(step: int, loss: float) -> None:
        if step not in wanted:
            return
        el = time.perf_counter() - start[0]
        per = measure()
        rec["ppl"][step], rec.setdefault("ppl_corpus", {})[step], rec["seconds"][step] = per["mean"], per, el
        print(tag, step, round(loss, 4), per["mean"], round(el), flush=True)
        start[0] = time.perf_counter() - el  # time the fitting only

    return at


def _sequential(model: nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    """Refit every layer from the first gap on, in order (``--seq-steps`` Adam steps each, the library's
    :func:`prunecomp.method.reconstruct.fit_layers`): fed the pruned model's stream through the layers already refitted,
    each writes the dense model's stream after the same original layer."""
    t0 = time.perf_counter()
    dense = DENSE_MODEL[0]
    orig = original_indices(model)
    first = next((j for j, o in enumerate(orig) if o != j), len(orig))
    want = tuple(sorted({o + 1 for o in orig[first:]}))
    targets, _ = _streams(dense, ids, args.local_batch, want)
    caught = catch_layer_inputs(model, ids, args.local_batch)
    layers = decoder_layers(model)
    xs = caught.hidden
    for j in range(first):
        xs = run_layer(layers[j], xs, [kw[j] for kw in caught.kwargs])
    errors = []
    gen = torch.Generator().manual_seed(2000 + args.seed)
    for j in range(first, len(layers)):
        kws = [kw[j] for kw in caught.kwargs]
        before, after = fit_layers([layers[j]], xs, targets[orig[j] + 1], [[kw] for kw in kws],
                                   steps=args.seq_steps, lr=args.local_lr, generator=gen)[:2]
        errors.append([int(orig[j]), before, after])
        xs = run_layer(layers[j], xs, kws)
    return {"first": int(orig[first]) if first < len(orig) else None, "errors": errors,
            "seconds": time.perf_counter() - t0}


def _only(n: int, layer: int) -> tuple[int, ...]:
    """``protect`` for every layer of an ``n``-layer source but ``layer``: the loop's next removal is ``layer``."""
    return tuple(j for j in range(n) if j != layer)


def _windows(tok: object, sources: str, n: int) -> TokenWindows:
    """``n`` calibration windows of 512 tokens (seed 0), split evenly between the calibration splits of
    ``sources``; one source gives exactly :func:`prunecomp.corpora.calibration.calibration_windows`."""
    names = sources.split(",")
    parts = [calibration_windows(tok, s, n_samples=n // len(names) + (i < n % len(names)), seq_len=512, seed=0)
             for i, s in enumerate(names)]
    if len(parts) == 1:
        return parts[0]
    ids = torch.cat([p.ids for p in parts])
    origin = "+".join(p.origin for p in parts)
    return TokenWindows(ids, origin, hashlib.sha256(origin.encode() + ids.numpy().tobytes()).hexdigest())


def _append(args: argparse.Namespace, out: dict) -> None:
    with open(args.out, "a") as f:
        f.write(json.dumps({**out, "label": args.label}) + "\n")


def _trainables(model: nn.Module, args: argparse.Namespace, gen: torch.Generator) -> tuple[list[Gain], list[LowRank]]:
    """The channel gains of ``--refine channels`` and, with ``--rank``, rank-r deltas on the residual writers
    (``--lowrank-on writers``) or on every linear of the layers (``all``)."""
    items = gains(model, "channels")
    lows: list[LowRank] = []
    if args.rank:
        adapter = get_adapter(model)
        paths = adapter.residual_writers if args.lowrank_on == "writers" else \
            adapter.residual_writers + adapter.inner_linears
        for layer in decoder_layers(model, adapter):
            for p in paths:
                lows.append(LowRank(resolve(layer, p), args.rank, gen))
    return items, lows


def _tuned(model: nn.Module, args: argparse.Namespace) -> list[nn.Parameter]:
    """With ``--tune``, the weights fine-tuned in place (full rank) beside the gains: every layer's residual writers
    (``writers``) or every linear of the layers (``all``)."""
    if not args.tune:
        return []
    adapter = get_adapter(model)
    paths = adapter.residual_writers if args.tune == "writers" else adapter.residual_writers + adapter.inner_linears
    return [resolve(layer, p).weight for layer in decoder_layers(model, adapter) for p in paths]


def _fit(model: nn.Module, ids: torch.Tensor, targets, items: list[Gain], lows: list[LowRank],
         args: argparse.Namespace, steps: int, gen: torch.Generator,
         at: Callable[[int, float], None] | None = None) -> None:
    """Adam on the gains (``--lr``) and deltas (``--lr-lowrank``) with hooks, cosine decay to 10%; the model's own
    weights frozen. Leaves the trained values in ``items``/``lows`` (not folded); ``at(step, loss)`` after each."""
    for p in model.parameters():
        p.requires_grad_(False)
    tuned = _tuned(model, args)
    for p in tuned:
        p.requires_grad_(True)
    model.eval()
    handles = [lr.module.register_forward_hook(lr.hook) for lr in lows]
    groups = [{"params": [g.value for g in items], "lr": args.lr}]
    if lows:
        groups.append({"params": [p for lr in lows for p in (lr.a, lr.b)], "lr": args.lr_lowrank})
    if tuned:
        groups.append({"params": tuned, "lr": args.lr_tune})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1))))
    order: list[int] = []
    means = [torch.zeros_like(g.value) for g in items] if args.average else []
    n_fit = ids.shape[0] - args.holdout
    held = TeacherTargets(targets.logprobs[n_fit:], targets.indices[n_fit:])
    best: tuple[float, int, list[torch.Tensor]] | None = None

    def check(step: int) -> None:
        nonlocal best
        kl = _eval_loss(model, ids[n_fit:], held, args.batch)
        if best is None or kl < best[0]:
            best = (kl, step, [g.value.detach().clone() for g in items])
        HOLDOUT.append((step, kl))
        print("  holdout", step, round(kl, 5), flush=True)

    try:
        with gains_applied(items):
            if args.holdout:
                check(0)
            for step in range(1, steps + 1):
                if len(order) < args.batch:
                    order += torch.randperm(n_fit, generator=gen).tolist()
                batch, order = order[: args.batch], order[args.batch:]
                sel = torch.tensor(batch)
                res = model(input_ids=ids[sel], use_cache=False, output_hidden_states=bool(args.hidden))
                loss = distill_loss(res.logits, targets.logprobs[sel], targets.indices[sel], loss=args.loss)
                if args.hidden:
                    loss = loss + args.hidden * _hidden_loss(model, res.hidden_states, ids[sel],
                                                               args.hidden_layers == "last")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if args.average and step > steps // 2:  # running mean of the gains over the last half
                    n = step - steps // 2
                    for g, m in zip(items, means, strict=True):
                        m.mul_((n - 1) / n).add_(g.value.detach() / n)
                if at is not None:
                    at(step, float(loss))
                if args.holdout and (step % args.check_every == 0 or step == steps):
                    check(step)
        if best is not None:
            with torch.no_grad():
                for g, v in zip(items, best[2], strict=True):
                    g.value.copy_(v)
            print("  kept step", best[1], flush=True)
        if args.average:
            with torch.no_grad():
                for g, m in zip(items, means, strict=True):
                    g.value.copy_(m)
    finally:
        for h in handles:
            h.remove()
        for p in tuned:
            p.requires_grad_(False)


if __name__ == "__main__":
    main()
