"""The README's main job (`prunecomp run`, embedded defaults: SmolLM2-135M, k = 5, BI, Prune&Comp, `cpu` preset,
a temporary Prefect server, MLflow on sqlite) in a fresh `PRUNECOMP_HOME`: wall time, peak RSS, what it leaves
behind (store, MLflow, Prefect), the layers it removed and its perplexities. ``--tree`` runs another checkout of
the project (e.g. a `git worktree` of an older commit) with this virtual environment, to compare before/after.

    .venv/bin/python bench/main_job.py --label after                              # ~4 min
    git worktree add /tmp/before <commit> && .venv/bin/python bench/main_job.py --tree /tmp/before --label before
    .venv/bin/python bench/main_job.py --compare       # the default, then --compensation magnitude, back to back

``--compare`` runs the default job and the same job with the paper's compensation (``--compensation magnitude``),
each in a fresh ``PRUNECOMP_HOME``, one after the other after an untimed warm-up (imports and the model read once),
and prints their ratio; the load average and the other
busy processes are recorded before and after (``bench/results/main_job_compare.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from measures import machine_load  # noqa: E402  (bench/ is not a package)

QUIET = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "true",
         "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def warm_up(tree: Path) -> None:
    """Untimed: compile the tree's modules and read the default model once, so the first timed job does not pay
    the cold start (``.pyc`` files of a fresh checkout, the weights and libraries entering the page cache) that
    the second one would not."""
    code = ("import flows.compress, tasks.prune\nfrom prunecomp.models.sources import load_model\nload_model(None)")
    env = {k: v for k, v in os.environ.items()} | QUIET | {"PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-c", code], env=env, cwd=tree, check=True, capture_output=True)


def run_job(args: argparse.Namespace, tree: Path, label: str, extra: list[str]) -> dict[str, object]:
    home = Path(args.work) / label
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "PRUNECOMP_"))}
    env = keep | QUIET | {"PYTHONPATH": str(tree), "PRUNECOMP_HOME": str(home / ".prunecomp"),
                          "PRUNECOMP_DATA_DIR": args.data_dir}
    cli = [sys.executable, "-c", "import sys; sys.argv[0] = 'prunecomp'\ntry:\n    from flows.entry import main\n"
           "except ImportError:\n    from flows.cli import main\nmain()"]  # the console script, in either tree
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    t = time.perf_counter()
    with (home / "log.txt").open("w") as log:
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(home / "rss"), *cli, "run", *extra, "--json",
                               str(home / "summary.json")], env=env, cwd=tree, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"prunecomp run failed ({proc.returncode}); see {home / 'log.txt'}")
    summary = json.loads((home / "summary.json").read_text())
    p = home / ".prunecomp"
    step_s = [s["record"].get("seconds") for s in summary["steps"]]
    row = {"label": label, "args": extra, "commit": commit, "wall_s": wall,
           "flow_s": summary.get("seconds"), "step_seconds": step_s,
           "peak_rss_mb": int((home / "rss").read_text().split()[-1]) / 1024,
           "store_bytes": du(p / "store"), "mlflow_bytes": du(p / "mlartifacts") + du(p / "mlflow.db"),
           "prefect_bytes": du(p / "prefect"), "removed": summary["removed"],
           "guard": [(s["record"].get("guard") or {}).get("decision") for s in summary["steps"]],
           "final_check": summary.get("final_check"),
           "quick_ppl": [round(s["ppl_after"]["wikitext2"], 2) for s in summary["steps"]],
           "perplexity": {k: {"dense": round(v["dense"], 2), "pruned": round(v["pruned"], 2)}
                          for k, v in summary["perplexity"].items()}}
    print(f"| {row['label']} ({commit}) | {wall:.1f} s | {row['peak_rss_mb']:.0f} MB | "
          f"{row['store_bytes'] / 1e9:.2f} GB | {row['mlflow_bytes'] / 1e6:.1f} MB | {row['removed']} | "
          f"{row['quick_ppl'][-1]} |", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default=str(ROOT), help="checkout to run (default: this one)")
    ap.add_argument("--label", default="after")
    ap.add_argument("--compare", action="store_true", help="the default, then --compensation magnitude")
    ap.add_argument("--work", default="/tmp/prunecomp-bench-main-job")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tree = Path(args.tree).resolve()
    print("| run | wall | peak RSS | store | MLflow | removed | last quick ppl |\n|---|---|---|---|---|---|---|")
    meta = {"python": platform.python_version(), "cpus": os.cpu_count(),
            "threads": os.environ.get("OMP_NUM_THREADS")}
    if not args.compare:
        row = run_job(args, tree, args.label, [])
        out = Path(args.out or ROOT / "bench" / "results" / f"main_job_{args.label}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(row | meta, indent=2))
        return
    warm_up(tree)
    before = machine_load()
    rows = [run_job(args, tree, "default", []), run_job(args, tree, "magnitude", ["--compensation", "magnitude"])]
    after = machine_load()
    ratio = float(rows[0]["wall_s"]) / float(rows[1]["wall_s"])  # type: ignore[arg-type]
    flow_ratio = float(rows[0]["flow_s"]) / float(rows[1]["flow_s"])  # type: ignore[arg-type]
    print(f"default / magnitude: wall {ratio:.2f}x, flow {flow_ratio:.2f}x "
          f"(load {before['loadavg'][0]:.2f} before, {after['loadavg'][0]:.2f} after)")
    out = Path(args.out or ROOT / "bench" / "results" / "main_job_compare.json")
    out.write_text(json.dumps({"rows": rows, "wall_ratio": ratio, "flow_ratio": flow_ratio,
                               "load_before": before, "load_after": after} | meta, indent=2))


if __name__ == "__main__":
    main()
