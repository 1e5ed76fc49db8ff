"""Refinement tuning on the issue-6 protocol: WikiText-2 perplexity during refinement, after BI Prune&Comp (k=5).

SmolLM2-135M-Instruct; pruning calibration 8 x 512 tokens of C4 (seed 0); refinement on ``--refine-samples``
windows of the same source and seed (a superset); perplexity on the first 16 x 512-token windows of WikiText-2
(evaluated with the gains still as hooks, which the tests show equals the folded model). One line of JSON per run:
    .venv/bin/python bench/refine_sweep.py --mode channels --steps 80 --lr 3e-3 --topk 256 --refine-samples 32 \
        --evals 40,80 --out bench/results/refine_sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from prunecomp.calibration import calibration_windows, evaluation_windows
from prunecomp.config import PruneConfig
from prunecomp.evaluation.perplexity import perplexity
from prunecomp.loop import prune_and_compensate
from prunecomp.refine import distill_loss, gains, gains_applied, teacher_targets
from prunecomp.sources import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="channels")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--topk", type=int, default=256)
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
    items = gains(model, args.mode)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    opt = torch.optim.Adam([g.value for g in items], lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, args.steps) / args.steps)))
    gen = torch.Generator().manual_seed(0)
    order: list[int] = []
    out: dict = {"args": vars(args), "removed": report.removed, "ppl": {}, "seconds": {}}
    t = time.perf_counter()
    with gains_applied(items):
        out["ppl"][0] = perplexity(model, ev.ids, batch_size=4)
        for it in range(1, args.steps + 1):
            if len(order) < args.batch:
                order += torch.randperm(fit_on.n, generator=gen).tolist()
            batch, order = torch.tensor(order[: args.batch]), order[args.batch :]
            logits = model(input_ids=fit_on.ids[batch], use_cache=False).logits
            loss = distill_loss(logits, targets.logprobs[batch], targets.indices[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if it in evals:
                out["ppl"][it] = perplexity(model, ev.ids, batch_size=4)
                out["seconds"][it] = time.perf_counter() - t
                print(it, out["ppl"][it], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(out) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
