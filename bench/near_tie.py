"""Why no calibration-based judge breaks the step-2 near-tie of progressive BI.

On the quality protocol (SmolLM2-135M, BI, guarded compensation, pruning calibration 8 x 512 tokens of C4) the
progressive runs remove layer 14 first and then face a near-tie between layers 15 and 17 (BI within 0.4-1.3%).
This script removes 14, then each candidate (guarded, nothing refined), and measures what each judge sees: mean
NLL on the 8 pruning windows and on the 64 refinement windows (C4), on 8 windows of the WikiText-2 and PTB
validation text, and the perplexity of the quality protocol per corpus (test text, not used by any judge).

    .venv/bin/python bench/near_tie.py --out bench/results/near_tie.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from prunecomp.config import PruneConfig
from prunecomp.corpora.calibration import calibration_windows, evaluation_windows
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.evaluation.perplexity import mean_nll
from prunecomp.models.sources import load_model

sys.path.insert(0, str(Path(__file__).parent))
from quality import Evaluator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--first", type=int, default=14, help="the layer removed first (original index)")
    ap.add_argument("--candidates", default="15,17,13", help="the layers tried second")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default="bench/results/near_tie.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    lm = load_model(None)
    tok, n = lm.tokenizer, lm.model.config.num_hidden_layers
    cal = calibration_windows(tok, "c4", n_samples=8, seq_len=512, seed=0)
    judges = {"c4_pruning_8": cal.ids,
              "c4_refine_64": calibration_windows(tok, "c4", n_samples=64, seq_len=512, seed=0).ids,
              **{f"{d}_validation_8": calibration_windows(tok, d, n_samples=8, seq_len=512, seed=0).ids
                 for d in ("wikitext2", "ptb")}}
    windows = {d: evaluation_windows(tok, d, seq_len=512, max_windows=8) for d in ("wikitext2", "c4", "ptb")}
    ev = Evaluator(tok, windows, argparse.Namespace(cache=args.cache, eval_seq_len=512, eval_max_windows=8,
                                                    datasets="wikitext2,c4,ptb", qa_limit=0, qa_tasks="",
                                                    data_dir=""))

    def remove(model: torch.nn.Module, step: int, layer: int) -> float:
        rep = prune_and_compensate(model, cal, PruneConfig(metric="bi", n_layers=step, compensation="guarded",
                                                           protect=tuple(j for j in range(n) if j != layer)))
        return float(rep.steps[-1].scores[layer])

    base = copy.deepcopy(lm.model)
    remove(base, 1, args.first)
    rows = []
    for c in map(int, args.candidates.split(",")):
        m = copy.deepcopy(base)
        score = remove(m, 2, c)
        rows.append({"second": c, "bi": score, "nll": {k: mean_nll(m, ids) for k, ids in judges.items()},
                     "ppl": ev(m, False)["ppl"]})
        print(json.dumps(rows[-1]), flush=True)
    keys = list(judges)
    print(f"\nafter removing {args.first} (guarded), nothing refined; lower is better in every column\n")
    print("| second layer | BI | " + " | ".join(f"NLL {k}" for k in keys) + " | PPL wikitext2 | PPL c4 | PPL ptb | "
          "mean PPL |")
    print("|---:|---:|" + "---:|" * (len(keys) + 4))
    for r in rows:
        print(f"| {r['second']} | {r['bi']:.5f} | " + " | ".join(f"{r['nll'][k]:.4f}" for k in keys) + " | "
              + " | ".join(f"{r['ppl'][d]:.2f}" for d in ("wikitext2", "c4", "ptb", "mean")) + " |")
    doc = {"settings": vars(args) | {"metric": "bi", "compensation": "guarded", "calibration": "c4 8 x 512, seed 0",
                                     "eval": "first 8 x 512-token windows of each test split",
                                     "torch": torch.__version__},
           "rows": rows, "seconds": time.perf_counter() - t0}
    Path(args.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
