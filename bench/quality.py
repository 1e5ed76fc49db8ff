"""Quality benchmark: perplexity of SmolLM2-135M (or --model) after removing k layers, per metric and variant.

Variants per metric: dense; one-shot without compensation (the metric's usual baseline); iterative without
compensation; iterative Prune&Comp (magnitude compensation); iterative lsq (magnitude + least-squares gap map, this
project's zero-overhead extension). Iterative runs are evaluated on the way (the state after
3 removals of a k=8 run IS the k=3 result: re-scoring does not depend on k), so each variant costs one run.

Prints a table and writes JSON (default bench/results/quality.json). Example:
    .venv/bin/python bench/quality.py --ks 3,5,8 --metrics bi
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from prunecomp.calibration import calibration_windows, evaluation_windows
from prunecomp.config import PruneConfig
from prunecomp.evaluation.perplexity import perplexity
from prunecomp.loop import prune_and_compensate
from prunecomp.pruning import remove_layer
from prunecomp.scoring import scan_layers
from prunecomp.sources import load_model


def _evaluate(model: Any, windows: dict[str, Any]) -> dict[str, float]:
    out = {name: perplexity(model, w.ids, batch_size=4) for name, w in windows.items()}
    out["mean"] = sum(out.values()) / len(out)
    return out


def _one_shot(model: Any, cal: Any, metric: str, ks: list[int], windows: dict[str, Any], batch: int) -> dict:
    """The metric's baseline: score the dense model once, drop the k lowest, no compensation."""
    cfg = PruneConfig(metric=metric, n_layers=max(ks), mode="one-shot", compensation="none")
    n = len(model.model.layers)
    protected = cfg.protected(n)
    cands = [i for i in range(n) if i not in protected]
    results = {}
    if metric == "block":  # contiguous block of exactly k layers, re-scored per k
        for k in ks:
            m = copy.deepcopy(model)
            report = prune_and_compensate(m, cal, cfg.model_copy(update={"n_layers": k}), batch_size=batch)
            results[k] = {"removed": sorted(report.removed), "ppl": _evaluate(m, windows)}
        return results
    scan = scan_layers(model, cal.ids, metric, batch_size=batch, candidates=cands)
    order = sorted(cands, key=lambda i: (scan.scores[i], i))
    for k in ks:
        m = copy.deepcopy(model)
        for i in sorted(order[:k], reverse=True):
            remove_layer(m, i)
        results[k] = {"removed": sorted(order[:k]), "ppl": _evaluate(m, windows)}
    return results


def _iterative(model: Any, cal: Any, metric: str, ks: list[int], comp: str, windows: dict[str, Any],
               batch: int, selection: str = "score") -> dict:
    results: dict[int, Any] = {}
    if metric == "block":  # block size depends on k: one run per k
        for k in ks:
            m = copy.deepcopy(model)
            cfg = PruneConfig(metric=metric, n_layers=k, compensation=comp, selection=selection)
            report = prune_and_compensate(m, cal, cfg, batch_size=batch)
            results[k] = {"removed": report.removed, "scales": [s.applied_scale for s in report.steps],
                          "ppl": _evaluate(m, windows)}
        return results
    m = copy.deepcopy(model)
    cfg = PruneConfig(metric=metric, n_layers=max(ks), compensation=comp, selection=selection)
    done: list[Any] = []

    def on_step(record: Any, current: Any) -> None:
        done.append(record)
        if len(done) in ks:
            results[len(done)] = {"removed": [r.chosen for r in done], "scales": [r.applied_scale for r in done],
                                  "ppl": _evaluate(current, windows)}
            print(f"    k={len(done)}: {results[len(done)]['ppl']}", file=sys.stderr, flush=True)

    prune_and_compensate(m, cal, cfg, batch_size=batch, on_step=on_step)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--ks", default="3,5,8")
    ap.add_argument("--metrics", default="bi")
    ap.add_argument("--datasets", default="wikitext2,c4,ptb")
    ap.add_argument("--calib-source", default="c4")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-max-windows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--variants", default="one-shot,iterative,prune&comp,lsq",
                    help="one-shot / iterative (no compensation), prune&comp (magnitude), lsq (magnitude + gap map), "
                    "lsq+select (lsq + compensation-aware selection among the 4 lowest-scoring layers)")
    ap.add_argument("--out", default="bench/results/quality.json")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 when sharing the machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ks = sorted(int(k) for k in args.ks.split(","))
    lm = load_model(args.model)
    cal = calibration_windows(lm.tokenizer, args.calib_source, n_samples=args.calib_samples,
                              seq_len=args.calib_seq_len, seed=0)
    windows = {d: evaluation_windows(lm.tokenizer, d, seq_len=args.eval_seq_len, max_windows=args.eval_max_windows)
               for d in args.datasets.split(",")}
    result: dict[str, Any] = {
        "settings": {**vars(args), "model_hash": lm.content_hash, "calibration": cal.origin,
                     "eval_tokens": {d: int(w.ids.numel()) for d, w in windows.items()},
                     "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()},
        "dense": _evaluate(lm.model, windows), "metrics": {},
    }
    print(f"dense: {result['dense']}", file=sys.stderr, flush=True)
    for metric in args.metrics.split(","):
        per: dict[str, Any] = {}
        for variant in args.variants.split(","):
            t = time.perf_counter()
            print(f"[{metric}] {variant}", file=sys.stderr, flush=True)
            if variant == "one-shot":
                res = _one_shot(lm.model, cal, metric, ks, windows, args.batch_size)
            else:
                comp = {"iterative": "none", "prune&comp": "magnitude", "lsq": "lsq", "lsq+select": "lsq"}[variant]
                selection = "loss" if variant == "lsq+select" else "score"
                res = _iterative(lm.model, cal, metric, ks, comp, windows, args.batch_size, selection)
            per[variant] = {"results": res, "seconds": time.perf_counter() - t}
        result["metrics"][metric] = per
    result["seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(render(result))


def render(result: dict[str, Any]) -> str:
    """Markdown table: one row per (metric, k, variant)."""
    ds = [d for d in result["dense"] if d != "mean"]
    head = "| metric | k | variant | removed (original idx) | " + " | ".join(ds) + " | mean PPL |"
    lines = [head, "|" + "---|" * (4 + len(ds) + 1)]
    dense = result["dense"]
    lines.append("| - | 0 | dense | - | " + " | ".join(f"{dense[d]:.2f}" for d in ds) + f" | {dense['mean']:.2f} |")
    for metric, per in result["metrics"].items():
        ks = sorted({int(k) for v in per.values() for k in v["results"]})
        for k in ks:
            for variant, v in per.items():
                r = v["results"].get(k) or v["results"].get(str(k))
                ppl = r["ppl"]
                lines.append(f"| {metric} | {k} | {variant} | {sorted(r['removed'])} | "
                             + " | ".join(f"{ppl[d]:.2f}" for d in ds) + f" | {ppl['mean']:.2f} |")
    s = result["settings"]
    lines.append("")
    lines.append(f"Calibration: {s['calib_samples']} x {s['calib_seq_len']} tokens of {s['calib_source']}; "
                 f"perplexity: first {s['eval_max_windows']} x {s['eval_seq_len']}-token windows per corpus; "
                 f"total time {result['seconds']:.0f} s.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
