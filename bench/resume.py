"""Resume benchmark: a fresh ``prunecomp run`` vs the same run SIGKILLed after N steps and run again.

Prints a table and writes JSON: wall time of each run, steps reused / recomputed by the resumed run, and whether
the final models are identical (recipe digest; and the largest relative tensor difference). Each scenario gets its
own ``PRUNECOMP_HOME`` (so nothing is shared between them, including Prefect's temporary server and MLflow's sqlite
DB) and is launched exactly as a user would: ``prunecomp run``. Default: SmolLM2-135M, k=5, killed during step
4 (3 steps done).

    .venv/bin/python bench/resume.py                       # SmolLM2, ~15-20 min on 2 CPU cores
    .venv/bin/python bench/resume.py --model /work/shared/models/stories260K --layers 3 --kill-after 1 -- \\
        --calib-source tinystories --calib-seq-len 128 --eval-datasets tinystories --quick-datasets tinystories
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from measures import machine_load, stamp  # noqa: E402  (bench/ is not a package)

CLI = [str(Path(sys.executable).parent / "prunecomp")]
QUIET = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
         "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING", "PRUNECOMP_"))}
    return env | QUIET | {"PRUNECOMP_HOME": str(home)}


def _completed_steps(home: Path) -> int:
    return len(list((home / "store" / "steps").glob("*/_COMPLETE")))


def _run(cmd: list[str], home: Path, log: Path) -> tuple[float, dict[str, Any]]:
    t = time.perf_counter()
    with log.open("w") as f:
        subprocess.run([*cmd, "--json", str(home / "summary.json")], env=_env(home), cwd=home, stdout=f,
                       stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t, json.loads((home / "summary.json").read_text())


def _run_and_kill(cmd: list[str], home: Path, log: Path, after: int) -> tuple[float, int]:
    """Start the run, SIGKILL its whole process group (the CLI and Prefect's temporary server) once ``after``
    step recipe parts are complete and the next step has had a moment to start; returns (seconds, steps done)."""
    t = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=_env(home), cwd=home, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while _completed_steps(home) < after:
                if proc.poll() is not None:
                    raise RuntimeError(f"run finished before step {after} (exit {proc.returncode}); see {log}")
                time.sleep(0.2)
            time.sleep(2.0)  # mid-step: the next step is loading/scoring
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return time.perf_counter() - t, _completed_steps(home)


def _max_rel_diff(a: Path, b: Path) -> float:
    """Largest |x - y| / max|x| over the tensors of two saved models (0.0 when bit-identical)."""
    from safetensors.torch import load_file

    x = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    y = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    if x.keys() != y.keys():
        return float("inf")
    return max(float((x[k].float() - y[k].float()).abs().max() / x[k].float().abs().max().clamp_min(1e-30))
               for k in x)


def main() -> None:
    load_before = machine_load()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--kill-after", type=int, default=3, help="kill once this many steps are checkpointed")
    parser.add_argument("--workdir", default="/tmp/prunecomp-bench-resume")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "resume.json"))
    parser.add_argument("extra", nargs="*", help="extra `prunecomp run` options, after --")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    cmd = [*CLI, "run", "--layers", str(args.layers), *(["--model", args.model] if args.model else []), *args.extra]
    fresh, resumed = work / "fresh", work / "resumed"
    fresh.mkdir(parents=True)
    resumed.mkdir(parents=True)
    t_fresh, s_fresh = _run(cmd, fresh, work / "fresh.log")
    t_killed, done = _run_and_kill(cmd, resumed, work / "killed.log", args.kill_after)
    t_resume, s_resume = _run(cmd, resumed, work / "resume.log")
    identical = s_fresh["final"]["hash"] == s_resume["final"]["hash"]
    max_rel = _max_rel_diff(Path(s_fresh["final"]["uri"]), Path(s_resume["final"]["uri"]))
    result = {
        "model": args.model or "SmolLM2-135M-Instruct", "layers": args.layers, "command": cmd,
        "fresh_seconds": round(t_fresh, 1), "killed_after_seconds": round(t_killed, 1),
        "steps_checkpointed_when_killed": done, "resumed_seconds": round(t_resume, 1),
        "resumed_steps_reused": s_resume["steps_reused"], "resumed_steps_recomputed": s_resume["steps_computed"],
        "fresh_steps_per_step_seconds": [round(s["record"]["seconds"], 1) for s in s_fresh["steps"]],
        "final_identical": identical, "final_hash": s_resume["final"]["hash"], "max_rel_tensor_diff": max_rel,
        "removed_fresh": s_fresh["removed"], "removed_resumed": s_resume["removed"],
        "perplexity": s_resume["perplexity"], "machine": f"{os.cpu_count()} CPU cores",
    }
    result |= stamp(ROOT, load_before)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    rows = [("fresh run", f"{t_fresh:.1f}", "-", str(len(s_fresh["steps"]))),
            (f"killed (after {done} steps)", f"{t_killed:.1f}", "-", str(done)),
            ("resumed run", f"{t_resume:.1f}", str(s_resume["steps_reused"]), str(s_resume["steps_computed"]))]
    lines = [f"{'scenario':<26} {'wall s':>8} {'reused':>7} {'computed':>9}"]
    lines += [f"{r[0]:<26} {r[1]:>8} {r[2]:>7} {r[3]:>9}" for r in rows]
    lines += [f"final model identical to the uninterrupted run: {identical} ({s_resume['final']['hash'][:16]}); "
              f"largest relative tensor difference {max_rel:.2e}",
              f"removed layers: fresh {s_fresh['removed']}, resumed {s_resume['removed']}; JSON: {args.json}"]
    text = "\n".join(lines)
    print(text)
    Path(args.json).with_suffix(".md").write_text(text + "\n")  # the table docs/RESULTS.md shows

if __name__ == "__main__":
    main()
