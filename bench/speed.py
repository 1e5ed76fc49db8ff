"""Inference-speed benchmark: dense vs depth-pruned vs pruned + compensated (Prune&Comp) models.

For every variant (dense; k layers removed without compensation; the same k layers removed with the magnitude
compensation folded into the weights by ``prunecomp.method.compensation.compensate``) it measures, with
``torch.inference_mode`` and greedy decoding:
  prefill  latency of one forward pass over a P-token prompt (logits of the last position only, as ``generate``
           does), batch 1 and batch 8;
  decode   time per generated token with the KV cache (a manual greedy loop over ``past_key_values``, starting
           from the cache of a P-token prompt), batch 1 and batch 8, and the tokens/s it gives.
Each repeat runs every variant once per measurement, round-robin (so machine noise hits all of them alike),
the order rotated by one variant each round (no variant is always first); the table reports the median over
repeats, after warm-up runs. The speedup vs dense is compared with the layer-count ideal N/(N-k)
(the embedding, final norm and output head are not pruned, so a somewhat lower speedup is expected; the
weight-count ideal is printed below the table). Compensated and uncompensated models of the same k have the
same architecture: their time ratio should be 1.00.

The removed layers default to those Prune&Comp (BI, magnitude, iterative) picks on SmolLM2-135M-Instruct
(bench/results/quality_bi.json: 14, 25, 17, 13, 15, 16, 18, 12 in step order, with their measured scales), so
the benchmark needs no calibration pass; with ``--select scan`` (automatic for another ``--model``) a quick BI
Prune&Comp run on a small C4 calibration set picks them.

    .venv/bin/python bench/speed.py                  # SmolLM2-135M, 1 thread: ~5-8 min on this CPU
    .venv/bin/python bench/speed.py --quick          # tiny sizes, < 1 min
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prunecomp.method.compensation import compensate
from prunecomp.models.adapters import decoder_layers
from prunecomp.models.pruning import original_indices, remove_layer
from prunecomp.models.sources import load_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from measures import machine_load, stamp  # noqa: E402  (bench/ is not a package)

# Prune&Comp (BI, magnitude, iterative) on SmolLM2-135M-Instruct: (original index, measured scale) in step order,
# from bench/results/quality_bi.json (16 x 512 tokens of C4 calibration, seed 0).
SMOLLM2_STEPS = [(14, 1.048908218042925), (25, 1.107889459028633), (17, 1.0934006572804518),
                 (13, 1.0663365491458938), (15, 1.0821902881272965), (16, 1.145961258146498),
                 (18, 1.07126698234222), (12, 1.0284797686359122)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _scan_steps(lm: Any, k: int, args: argparse.Namespace) -> list[tuple[int, float]]:
    """(original index, scale) of each removal of a quick iterative BI Prune&Comp run."""
    from prunecomp.config import PruneConfig
    from prunecomp.corpora.calibration import calibration_windows
    from prunecomp.engine.loop import prune_and_compensate

    cal = calibration_windows(lm.tokenizer, "c4", n_samples=args.calib_samples, seq_len=args.calib_seq_len, seed=0)
    m = copy.deepcopy(lm.model)
    report = prune_and_compensate(m, cal, PruneConfig(metric="bi", n_layers=k, compensation="magnitude"))
    del m
    return [(r.chosen, r.applied_scale) for r in report.steps]


def _pruned(model: Any, steps: list[tuple[int, float]], comp: bool) -> Any:
    """A copy of ``model`` with the layers of ``steps`` removed in order, each compensated with its scale."""
    m = copy.deepcopy(model)
    for orig, s in steps:
        cur = original_indices(m).index(orig)
        remove_layer(m, cur)
        if comp:
            compensate(m, cur, s)
    return m.eval()


def _prefill(model: Any, ids: torch.Tensor, device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    return time.perf_counter() - t


def _decode(model: Any, start: tuple[Any, torch.Tensor], n_new: int, device: str) -> float:
    """Seconds per generated token: ``n_new`` greedy steps from a deep copy of a prefilled cache."""
    cache, logits = start
    cache = copy.deepcopy(cache)
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t = time.perf_counter()
    for _ in range(n_new):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return (time.perf_counter() - t) / n_new


def _env_info(device: str) -> dict[str, Any]:
    import transformers

    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
            "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_avg_start": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--ks", default="5,8")
    ap.add_argument("--select", choices=["auto", "recorded", "scan"], default="auto",
                    help="recorded: SmolLM2's Prune&Comp layers (default model); scan: quick BI Prune&Comp run")
    ap.add_argument("--calib-samples", type=int, default=8, help="--select scan only")
    ap.add_argument("--calib-seq-len", type=int, default=256, help="--select scan only")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="round-robin warm-up rounds (not timed)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 when sharing the machine)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny prompt, few tokens, 1 repeat")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "speed.json"))
    args = ap.parse_args()
    if args.quick:
        args.prompt_len, args.new_tokens, args.repeats, args.warmup = 16, 4, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    load_before = machine_load()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = _env_info(device)
    ks = sorted(int(k) for k in args.ks.split(","))
    batches = [int(b) for b in args.batches.split(",")]
    lm = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
    dense = lm.model.eval()
    n = len(decoder_layers(dense))
    select = args.select
    if select == "auto":
        select = "recorded" if args.model is None and n == 30 and max(ks) <= len(SMOLLM2_STEPS) else "scan"
    steps = SMOLLM2_STEPS if select == "recorded" else _scan_steps(lm, max(ks), args)
    print(f"{n} layers; removal order (original idx, scale): {[(i, round(s, 4)) for i, s in steps]}",
          file=sys.stderr, flush=True)

    variants: dict[str, dict[str, Any]] = {"dense": {"model": dense, "k": 0, "comp": False}}
    for k in ks:
        variants[f"pruned k={k}"] = {"model": _pruned(dense, steps[:k], False), "k": k, "comp": False}
        variants[f"pruned+comp k={k}"] = {"model": _pruned(dense, steps[:k], True), "k": k, "comp": True}
    for name, v in variants.items():
        m = v["model"]
        v["layers"] = len(decoder_layers(m))
        v["params"] = sum(p.numel() for p in m.parameters())
        v["removed"] = sorted(i for i, _ in steps[:v["k"]])
        if v["comp"]:  # same architecture as the uncompensated model, different weights
            plain = variants[name.replace("+comp", "")]["model"]
            shapes = [p.shape for p in plain.parameters()] == [p.shape for p in m.parameters()]
            diff = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), m.parameters(), strict=True))
            v["same_architecture"], v["max_weight_change"] = shapes, diff
            if not shapes or diff == 0.0:
                raise RuntimeError(f"{name}: compensation did not produce a same-shape, changed model")

    vocab = lm.tokenizer.vocab_size if getattr(lm.tokenizer, "vocab_size", None) else dense.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(100, vocab, (b, args.prompt_len), generator=g).to(device) for b in batches}
    starts: dict[tuple[str, int], Any] = {}
    with torch.inference_mode():
        for name, v in variants.items():  # the prompt's KV cache every decode run starts from (a copy of)
            for b in batches:
                out = v["model"](input_ids=prompts[b], use_cache=True, logits_to_keep=1)
                starts[name, b] = (out.past_key_values, out.logits)

        times: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
        tasks: list[tuple[str, Callable[[Any, int, str], float]]] = []
        for b in batches:
            tasks.append((f"prefill_b{b}", lambda m, b, name: _prefill(m, prompts[b], device)))
            tasks.append((f"decode_b{b}", lambda m, b, name: _decode(m, starts[name, b], args.new_tokens, device)))
        names = list(variants)
        orders = []
        for rep in range(args.warmup + args.repeats):
            tr = time.perf_counter()
            order = names[rep % len(names):] + names[:rep % len(names)]  # each variant takes every slot in turn
            orders.append(order)
            for key, fn in tasks:
                b = int(key.rsplit("_b", 1)[1])
                for name in order:
                    dt = fn(variants[name]["model"], b, name)
                    if rep >= args.warmup:
                        times[name].setdefault(key, []).append(dt)
            label = "warm-up" if rep < args.warmup else f"repeat {rep - args.warmup + 1}/{args.repeats}"
            print(f"  {label}: {time.perf_counter() - tr:.1f} s", file=sys.stderr, flush=True)

    results = []
    base = {key: statistics.median(ts) for key, ts in times["dense"].items()}
    for name, v in variants.items():
        med = {key: statistics.median(ts) for key, ts in times[name].items()}
        ideal = n / (n - v["k"])
        speed = {key: base[key] / med[key] for key in med}
        row = {"variant": name, "k": v["k"], "layers": v["layers"], "removed": v["removed"],
               "compensated": v["comp"], "params": v["params"],
               "median_ms": {key: 1e3 * t for key, t in med.items()},
               "all_ms": {key: [1e3 * t for t in ts] for key, ts in times[name].items()},
               "tokens_per_s": {f"decode_b{b}": b / med[f"decode_b{b}"] for b in batches},
               "speedup": speed, "ideal": ideal, "ratio_to_ideal": {key: s / ideal for key, s in speed.items()}}
        if v["comp"]:
            plain = times[name.replace("+comp", "")]
            row["comp_time_ratio"] = {key: med[key] / statistics.median(plain[key]) for key in med}
            row["same_architecture"], row["max_weight_change"] = v["same_architecture"], v["max_weight_change"]
        results.append(row)
    env["load_avg_end"] = os.getloadavg()
    payload = {"settings": {**vars(args), "select": select, "steps": steps, "model_hash": lm.content_hash,
                            "source_layers": n, "prefill": "one forward of the prompt, logits_to_keep=1",
                            "decode": "manual greedy loop over past_key_values from the prompt's cache",
                            "variant_order_per_round": orders},
               "environment": env, "results": results, "seconds": time.perf_counter() - t0}
    payload |= stamp(ROOT, load_before)
    table = render(payload)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


def render(payload: dict[str, Any]) -> str:
    s, rows = payload["settings"], payload["results"]
    batches = [int(b) for b in s["batches"].split(",")]
    keys = [f"prefill_b{b}" for b in batches] + [f"decode_b{b}" for b in batches]
    n = s["source_layers"]
    head = ("| variant | layers | " + " | ".join(f"prefill ms b{b}" for b in batches) + " | "
            + " | ".join(f"decode ms/tok b{b}" for b in batches) + " | "
            + " | ".join(f"decode tok/s b{b}" for b in batches) + " | ideal N/(N-k) | "
            + " | ".join(f"speedup {k.replace('_', ' ')} (ratio)" for k in keys) + " |")
    lines = [head, "|" + "---|" * (2 + 3 * len(batches) + 1 + len(keys))]
    for r in rows:
        ms, tps = r["median_ms"], r["tokens_per_s"]
        lines.append(
            f"| {r['variant']} | {r['layers']} | " + " | ".join(f"{ms[f'prefill_b{b}']:.1f}" for b in batches)
            + " | " + " | ".join(f"{ms[f'decode_b{b}']:.2f}" for b in batches) + " | "
            + " | ".join(f"{tps[f'decode_b{b}']:.1f}" for b in batches) + f" | {r['ideal']:.3f} | "
            + " | ".join(f"{r['speedup'][k]:.3f}x ({r['ratio_to_ideal'][k]:.2f})" for k in keys) + " |")
    lines += ["", "Compensated vs uncompensated (same layers removed): time ratio, 1.00 = compensation is free.", "",
              "| k | " + " | ".join(k.replace("_", " ") for k in keys) + " | same architecture | max weight change |",
              "|" + "---|" * (len(keys) + 3)]
    for r in rows:
        if "comp_time_ratio" in r:
            lines.append(f"| {r['k']} | " + " | ".join(f"{r['comp_time_ratio'][k]:.3f}" for k in keys)
                         + f" | {r['same_architecture']} | {r['max_weight_change']:.3g} |")
    dense_p = rows[0]["params"]
    per_layer = (dense_p - min(r["params"] for r in rows)) / max(max(r["k"] for r in rows), 1)
    ideal_w = ", ".join(f"k={r['k']}: {dense_p / r['params']:.3f}" for r in rows if r["k"] and not r["compensated"])
    e = payload["environment"]
    lines += ["", "Removed layers (original idx): " + "; ".join(
              f"k={r['k']}: {r['removed']}" for r in rows if r["k"] and not r["compensated"])
              + f" ({s['select']}). Ratio = speedup / (N/(N-k)), N = {n}.",
              f"Weight-count ideal (dense/pruned parameters, the tied embedding = output head counted once): "
              f"{ideal_w}; one decoder layer = "
              f"{per_layer / 1e6:.2f} M of {dense_p / 1e6:.1f} M parameters.",
              f"Prompt {s['prompt_len']} random tokens, {s['new_tokens']} greedy new tokens, {s['dtype']} on "
              f"{e['device']} ({e['cpu']}), {e['threads']} thread(s); median of {s['repeats']} round-robin repeats "
              f"(rotated order) after {s['warmup']} warm-up; load average {e['load_avg_start'][0]:.2f} -> "
              f"{e['load_avg_end'][0]:.2f}; torch {e['torch']}, transformers {e['transformers']}; "
              f"total {payload['seconds']:.0f} s."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
