"""Refinement tuning on the WikiText-2 protocol: WikiText-2 perplexity during refinement, after BI Prune&Comp (k=5).

SmolLM2-135M-Instruct; pruning calibration 8 x 512 tokens of C4 (seed 0); refinement on ``--refine-samples``
windows of the same source and seed (a superset); perplexity on the first 16 x 512-token windows of WikiText-2
(evaluated with the gains still as hooks, which the tests show equals the folded model). One line of JSON per run:
    .venv/bin/python bench/refine_sweep.py --mode channels --steps 80 --lr 3e-3 --topk 256 --refine-samples 32 \
        --evals 40,80 --out bench/results/refine_sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from prunecomp.config import PruneConfig
from prunecomp.corpora.calibration import calibration_windows, evaluation_windows
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.evaluation.perplexity import perplexity
from prunecomp.method.refine import refine, teacher_targets
from prunecomp.models.sources import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="channels")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--loss", default="topk",
                    help="refinement loss (topk: the loss refine_sweep.jsonl was measured with)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--evals", default="40,80")
    ap.add_argument("--refine-samples", type=int, default=32)
    ap.add_argument("--selection", default="score")
    ap.add_argument("--out", default="bench/results/refine_sweep.jsonl")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    evals = {int(x) for x in args.evals.split(",")}
    lm = load_model(None)
    cal = calibration_windows(lm.tokenizer, "c4", n_samples=8, seq_len=512)
    fit_on = calibration_windows(lm.tokenizer, "c4", n_samples=args.refine_samples, seq_len=512)
    ev = evaluation_windows(lm.tokenizer, "wikitext2", seq_len=512, max_windows=16)
    targets = teacher_targets(lm.model, fit_on.ids, topk=args.topk)
    model = lm.model
    report = prune_and_compensate(model, cal, PruneConfig(metric="bi", n_layers=5, selection=args.selection))
    out: dict = {"args": vars(args), "removed": report.removed, "ppl": {0: perplexity(model, ev.ids, batch_size=4)},
                 "seconds": {}}
    t = time.perf_counter()

    def on_step(i: int) -> None:  # the gains are still hooks here: this is the model folded at step i
        if i in evals:
            out["ppl"][i] = perplexity(model, ev.ids, batch_size=4)
            out["seconds"][i] = time.perf_counter() - t
            print(i, out["ppl"][i], flush=True)

    refine(model, fit_on.ids, targets, mode=args.mode, steps=args.steps, lr=args.lr, batch_size=args.batch,
           loss=args.loss, on_step=on_step)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(out) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
