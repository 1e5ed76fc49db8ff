"""Scoring-cost benchmark: iterative Prune&Comp with incremental vs exact re-scoring.

For each metric: wall time of the whole k-step run, decoder-layer forwards performed (per calibration window),
the minimum any exact method needs (one full pass, then only the layers after each gap), the layers chosen by
both modes and the largest relative score difference. Default: SmolLM2-135M, k=5, BI, the cpu preset's
calibration (32 x 256 tokens of C4, batch 8). Runs alternate exact / incremental per metric.

    .venv/bin/python bench/scoring.py                      # BI, ~2 min on 2 CPU cores
    .venv/bin/python bench/scoring.py --metrics bi,ppl     # PPL-on-skip too (~15 min)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from prunecomp.config import PruneConfig
from prunecomp.corpora.calibration import calibration_windows
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.models.sources import load_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from measures import machine_load, stamp  # noqa: E402  (bench/ is not a package)


def _minimum(report: Any, n_layers: int) -> int:
    """Layer forwards per window of: one full pass + the layers after each gap (for cosine metrics)."""
    total = n_layers
    for step in report.steps[:-1]:
        total += step.layers_after - step.chosen_current
    return total


def _max_rel(a: Any, b: Any) -> float:
    worst = 0.0
    for sa, sb in zip(a.steps, b.steps, strict=True):
        for key, va in sa.scores.items():
            if math.isfinite(va):
                worst = max(worst, abs(va - sb.scores[key]) / max(abs(va), 1e-12))
    return worst


def main() -> None:
    load_before = machine_load()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--metrics", default="bi")
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scoring.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    n_layers = len(lm.model.model.layers)
    cal = calibration_windows(lm.tokenizer, "c4", n_samples=args.calib_samples, seq_len=args.calib_seq_len)
    rows = []
    for metric in args.metrics.split(","):
        runs = {}
        for scoring in ("exact", "incremental"):
            model = copy.deepcopy(lm.model)
            t = time.perf_counter()
            report = prune_and_compensate(model, cal, PruneConfig(metric=metric, n_layers=args.layers,
                                                                  scoring=scoring), batch_size=args.batch)
            runs[scoring] = (time.perf_counter() - t, report)
            del model
        (te, re), (ti, ri) = runs["exact"], runs["incremental"]
        row = {"metric": metric, "exact_s": te, "incremental_s": ti, "speedup": te / ti,
               "exact_forwards": sum(s.layer_forwards for s in re.steps) // cal.n,
               "incremental_forwards": sum(s.layer_forwards for s in ri.steps) // cal.n,
               "minimum_forwards": _minimum(ri, n_layers) if metric != "ppl" else None,
               "removed_exact": re.removed, "removed_incremental": ri.removed,
               "same_layers": re.removed == ri.removed, "max_score_rel_diff": _max_rel(re, ri),
               "scoring_used": ri.scoring}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = ["| metric | exact | incremental | speedup | layer-forwards exact / incremental / minimum | "
             "same layers | max score rel. diff |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        minimum = r["minimum_forwards"] if r["minimum_forwards"] is not None else "-"
        lines.append(f"| {r['metric']} | {r['exact_s']:.1f} s | {r['incremental_s']:.1f} s | {r['speedup']:.2f}x | "
                     f"{r['exact_forwards']} / {r['incremental_forwards']} / {minimum} | "
                     f"{'yes' if r['same_layers'] else 'NO'} {r['removed_incremental']} | "
                     f"{r['max_score_rel_diff']:.1e} |")
    table = "\n".join(lines)
    print(table)
    payload = {"rows": rows, "model": args.model or "SmolLM2-135M-Instruct", "layers": args.layers,
               "calibration": {"source": "c4", "n_samples": args.calib_samples, "seq_len": args.calib_seq_len,
                               "batch": args.batch},
               "threads": args.threads, "torch": torch.__version__, "python": platform.python_version()}
    payload |= stamp(ROOT, load_before)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))
    Path(args.out).with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
