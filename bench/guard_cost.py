"""What the guard costs: the paper (``--compensation magnitude``) and the guarded default, back to back in one
process on one thread, each on a freshly loaded model, with the job ``prunecomp prune --eval-datasets ''`` runs
(:func:`prunecomp.engine.job.run_job`: SmolLM2-135M, k = 5, BI, the ``cpu`` preset's 32 x 256 C4 calibration windows,
the final check on 8 held-out windows; nothing saved).

Why back to back in one process: a ratio of two timings is only meaningful on the same machine under the same
load, and this machine's cores are shared; the load average and the number of other running processes before
and after are recorded beside the numbers so a reader can tell a quiet run from a noisy one.

The table: per-step seconds (scoring + guard + fold), all steps in wall and in process CPU seconds (one thread:
the work done, less sensitive to the other processes than wall time), the guarded/paper ratio of the steps, the
layers removed, the guard's decisions with their exponents and what it measured on (windows, scored tokens), and
the final check's held-out perplexity (folded vs plainly removed). ``--rounds 2`` alternates the two twice.

    OMP_NUM_THREADS=1 .venv/bin/python bench/guard_cost.py --rounds 2      # ~14 min on a shared 2-core machine
    git archive HEAD prunecomp | tar -x -C /tmp/old-tree                   # another checkout's guard:
    cd /tmp && OMP_NUM_THREADS=1 PYTHONPATH=/tmp/old-tree /work/main/.venv/bin/python /work/main/bench/guard_cost.py \
        --out /work/main/bench/results/guard_cost_before.json              # (the whole grid: ~20 min)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "true", "TOKENIZERS_PARALLELISM": "false",
         "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def busy_processes() -> int:
    """Processes other than this one in the running state (R): what competes for the cores right now."""
    n = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "R" and stat.parent.name != str(os.getpid()):
            n += 1
    return n


def load() -> dict[str, Any]:
    return {"loadavg": list(os.getloadavg()), "busy_processes": busy_processes()}


def run(compensation: str, data_dir: str | None) -> dict[str, Any]:
    """One fresh job: load the model, calibrate, prune, final check; per-step seconds and what was decided."""
    from prunecomp.config import PRESETS, CalibrationConfig, PruneConfig
    from prunecomp.engine.job import JobConfig, Progress, run_job

    marks: list[float] = []  # process CPU seconds at the start of step 1 and after every step

    class Marks(Progress):
        def start(self, label: str, total: int) -> None:
            if label.startswith("step 1:"):
                marks.append(time.process_time())

    def stepped(_record: Any, _model: Any) -> None:
        marks.append(time.process_time())

    preset = PRESETS["cpu"]
    config = JobConfig(prune=PruneConfig(n_layers=5, metric="bi", compensation=compensation),
                       calibration=CalibrationConfig(**preset.calibration.model_dump()), evaluation=None,
                       data_dir=data_dir)
    t = time.perf_counter()
    result = run_job(config, Marks(), on_step=stepped)
    wall = time.perf_counter() - t
    steps = result.report["steps"]
    check = result.report.get("final_check") or {}
    guards = [s.get("guard") for s in steps]
    return {
        "compensation": compensation, "wall_s": wall, "seconds": result.seconds,
        "step_s": [s["seconds"] for s in steps], "steps_s": sum(s["seconds"] for s in steps),
        "step_cpu_s": [b - a for a, b in itertools.pairwise(marks)], "steps_cpu_s": marks[-1] - marks[0],
        "removed": [s["chosen"] for s in steps], "measured_scales": [s["measured_scale"] for s in steps],
        "applied_scales": [s["applied_scale"] for s in steps],
        "decisions": [g["decision"] if g else "-" for g in guards], "guards": guards,
        "final_check": check, "held_out_ppl": check.get("ppl"), "uncompensated_ppl": check.get("uncompensated_ppl"),
    }


def measured(guard: dict[str, Any] | None) -> str:
    """What one step's guard ran on (the older guard records no budget: its whole grid on every window)."""
    if not guard:
        return "-"
    m = guard.get("measured")
    if not m:
        return f"{len(guard['exponents'])} cand, all windows"
    return f"{m['windows']}/{m['of_windows']} win, {m['tokens']} tok"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "guard_cost.json"))
    ap.add_argument("--only", choices=["magnitude", "guarded"], default=None, help="run one side only")
    ap.add_argument("--rounds", type=int, default=1, help="alternate paper and guarded this many times")
    args = ap.parse_args()
    os.environ.update(QUIET)
    import torch

    torch.set_num_threads(1)
    import prunecomp

    tree = Path(prunecomp.__file__).resolve().parents[1]
    git = ["git", "-C", str(tree)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not commit:  # an exported tree (git archive HEAD of this checkout): this checkout's commit
        git = ["git", "-C", str(ROOT)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "prunecomp"], capture_output=True,
                           text=True).stdout.split("\n")
    data_dir = args.data_dir if Path(args.data_dir).is_dir() else None
    sides = ["magnitude", "guarded"] if args.only is None else [args.only]
    before = load()
    runs: list[dict[str, Any]] = []
    for n in range(args.rounds):
        for c in sides:
            at = load()
            runs.append(run(c, data_dir) | {"round": n, "load_before": at, "load_after": load()})
    after = load()

    def total(side: str, key: str) -> float:
        return sum(r[key] for r in runs if r["compensation"] == side)

    ratios = ({"steps_wall": total("guarded", "steps_s") / total("magnitude", "steps_s"),
               "steps_cpu": total("guarded", "steps_cpu_s") / total("magnitude", "steps_cpu_s")}
              if len(sides) == 2 else None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"settings": {"model": "SmolLM2-135M (default GGUF)", "k": 5, "metric": "bi", "preset": "cpu",
                        "calibration": "32 x 256 c4, seed 0", "held_out": 8, "threads": torch.get_num_threads(),
                        "rounds": args.rounds, "order": sides, "data_dir": data_dir},
           "commit": commit, "tree": str(tree), "uncommitted": [line for line in dirty if line],
           "load_before": before, "load_after": after, "ratios": ratios, "runs": runs,
           "python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
    out.write_text(json.dumps(doc, indent=2, default=str))
    print(f"\ntree {tree} @ {commit[:10]}, threads {torch.get_num_threads()}, load {before['loadavg'][0]:.2f} -> "
          f"{after['loadavg'][0]:.2f}, other running processes {before['busy_processes']} -> "
          f"{after['busy_processes']}\n")
    print("| compensation | per-step s (wall) | steps s wall / cpu | removed | decisions (exponent) "
          "| guard measured on | held-out ppl (folded / plain) |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        ppl = (f"{r['held_out_ppl']:.2f} / {r['uncompensated_ppl']:.2f}" if r["held_out_ppl"] is not None
               else "-")
        where = "; ".join(dict.fromkeys(measured(g) for g in r["guards"]))
        decisions = " ".join(f"{d}" + (f" ({g['exponent']:g})" if g else "")
                             for d, g in zip(r["decisions"], r["guards"], strict=True))
        print(f"| {r['compensation']} | {' '.join(f'{s:.1f}' for s in r['step_s'])} | {r['steps_s']:.1f} / "
              f"{r['steps_cpu_s']:.1f} | {r['removed']} | {decisions} | {where} | {ppl} |")
    if ratios is not None:
        print(f"\nguarded / paper steps: {ratios['steps_wall']:.2f}x wall, {ratios['steps_cpu']:.2f}x process CPU")
    print(f"wrote {out}")

if __name__ == "__main__":
    main()
