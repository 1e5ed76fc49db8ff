"""Pipeline at scale: the library job against the Prefect pipeline, in memory and layer-streamed, and a resumed
pipeline run, on a synthetic Llama this script writes itself (random weights, SmolLM2's tokenizer).

Rows (each in a fresh process; peak RSS from ``/usr/bin/time``, the largest process of the command tree):
  library            prunecomp prune --out DIR
  library streamed   prunecomp prune --stream-layers --out DIR
  pipeline           prunecomp run (registered in MLflow)
  pipeline streamed  prunecomp run --stream-layers
  pipeline resumed   prunecomp run killed (SIGKILL) inside step 2, then the same command again (the rerun is measured)
With --reconstruct-only, the same two rows with block reconstruction beside every gap instead (--reconstruct both
--reconstruct-steps N --refine channels --refine-steps N: the layers beside each gap fitted in place, the gains once
at the end), then both layer-streamed with block reconstruction alone (--stream-layers --reconstruct both
--reconstruct-steps N: one fitted layer pair in memory, the fits kept in spill files; the gains cannot stream).
With --refit-only, the same two rows with the sequential refit after the last removal instead (--refit sequential
--refit-steps N: every layer after the first gap fitted to the dense streams, the dense layers read one at a time
from the source folder beside the pruned model).
With --refine-only, two rows of progressive refinement (--refine channels --refine-at each: a fit after every
removal, back-propagated through the whole model, so never streamed) instead:
  library refined    prunecomp prune --refine channels --refine-at each --out DIR
  pipeline refined   prunecomp run --refine channels --refine-at each (teacher, steps and fits as cached tasks)
Columns: wall time, peak RSS, bytes written (the output folder; for the pipeline the store + MLflow, calibration
windows and evaluation results included), layer-forwards (calibration windows x decoder layers run for scoring).
Pipeline rows talk to one local Prefect server and one MLflow sqlite store set up here beforehand (as a
deployment's worker does), so neither the temporary server's start-up nor MLflow's first-use migrations are
counted; what the rows write to MLflow is.

    .venv/bin/python bench/pipeline_scale.py                  # ~0.9B model, ~15 min on 2 cores, 4 GB in --work
    .venv/bin/python bench/pipeline_scale.py --quick          # a tiny model, ~3 min
    .venv/bin/python bench/pipeline_scale.py --big-only       # the ~7B row: 28 GB of weights, prunecomp run
                                                              # --stream-layers end to end (~60 GB of disk)
    .venv/bin/python bench/pipeline_scale.py --refine-only    # ~0.9B, progressive refinement (--refine-steps 4)
    .venv/bin/python bench/pipeline_scale.py --refine-only --compensation lsq   # the same with lsq gap maps
    .venv/bin/python bench/pipeline_scale.py --reconstruct-only  # ~0.9B, block reconstruction (both sides, then
                                                                 # the gains once at the end)
    .venv/bin/python bench/pipeline_scale.py --refit-only        # ~0.9B, the sequential refit
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from measures import commit, machine_load  # noqa: E402  (bench/ is not a package)
from memory import write_synthetic  # noqa: E402

CLI = [str(Path(sys.executable).parent / "prunecomp")]
QUIET = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "true",
         "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TQDM_DISABLE": "1",
         "TOKENIZERS_PARALLELISM": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
SPECS = {
    "quick": dict(hidden=256, inter=688, n_layers=8, heads=4, kv_heads=2),
    "0.9B": dict(hidden=2048, inter=5632, n_layers=16, heads=16, kv_heads=4),
    "7B": dict(hidden=4096, inter=11008, n_layers=32, heads=32, kv_heads=32),
}


def with_tokenizer(folder: Path) -> None:
    """Give a synthetic model SmolLM2's tokenizer (the default model's; its vocabulary is 49,152)."""
    if (folder / "tokenizer.json").exists():
        return
    from prunecomp.models.sources import load_model

    load_model(None).tokenizer.save_pretrained(folder)


def du(*paths: Path) -> int:
    total = 0
    for p in paths:
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total


def timed(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` under /usr/bin/time; returns (wall seconds, peak RSS in MB)."""
    stats = log.with_suffix(".time")
    t = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(stats), *cmd], env=env, stdout=f,
                              stderr=subprocess.STDOUT, cwd=log.parent)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return wall, int(stats.read_text().split()[-1]) / 1024


def forwards(report: dict[str, Any], computed_only: bool = False) -> int:
    return sum(int(s["record"]["layer_forwards"] if "record" in s else s["layer_forwards"])
               for s in report["steps"] if not (computed_only and s.get("reused")))


class Bench:
    def __init__(self, args: argparse.Namespace, model: Path, work: Path, api: str | None) -> None:
        self.args, self.model, self.work, self.api = args, model, work, api
        self.common = ["--model", str(model), "--layers", str(args.k), "--metric", "bi", "--calib-source", "c4",
                       "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len),
                       "--batch-size", str(args.batch), "--eval-datasets", "wikitext2", "--eval-seq-len",
                       str(args.eval_seq_len), "--eval-max-windows", str(args.eval_windows)]
        if args.data_dir:
            self.common += ["--data-dir", args.data_dir]

    def env(self, home: Path) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "PRUNECOMP_"))}
        env = keep | QUIET | {"OMP_NUM_THREADS": str(self.args.threads), "PRUNECOMP_HOME": str(home / "prunecomp"),
                              "PREFECT_HOME": str(home / "prunecomp" / "prefect"),
                              "PRUNECOMP_CACHE_DIR": str(self.work / "cache")}
        if self.api:
            env["PREFECT_API_URL"] = self.api
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{self.work / 'mlflow' / 'mlflow.db'}"
        env["PRUNECOMP_MLFLOW_ARTIFACTS"] = str(self.work / "mlflow" / "artifacts")
        (home / "prunecomp" / "prefect").mkdir(parents=True, exist_ok=True)
        return env

    def library(self, name: str, extra: list[str]) -> dict[str, Any]:
        home = self.work / name
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        wall, rss = timed([*CLI, "prune", *self.common, *extra, "--out", str(home / "out"), "--json",
                           str(home / "report.json")], self.env(home), home / "log.txt")
        report = json.loads((home / "report.json").read_text())
        fits = [s["refine"] for s in report["steps"] if s.get("refine")] + \
            ([report["refine"]] if report.get("refine") else [])
        return {"row": name, "wall_s": wall, "peak_rss_mb": rss, "bytes_written": du(home / "out"),
                "layer_forwards": forwards(report), "removed": report["removed"], "fits": [_fit(f) for f in fits],
                "reconstructed": [_local(s) for s in report["steps"] if s.get("reconstruct")],
                "refit": _refit(report.get("refit")), **_audit(report["steps"], report.get("final_check"))}

    def pipeline(self, name: str, extra: list[str], *, kill_in_step: int | None = None) -> dict[str, Any]:
        home = self.work / name
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        cmd = [*CLI, "run", *self.common, *extra, "--quick-datasets", "", "--json", str(home / "summary.json")]
        killed = None
        if kill_in_step is not None:
            killed = self._kill(cmd, home, kill_in_step)
        before = du(home / "prunecomp"), du(self.work / "mlflow")
        wall, rss = timed(cmd, self.env(home), home / "log.txt")
        summary = json.loads((home / "summary.json").read_text())
        p = home / "prunecomp"
        mlflow = du(self.work / "mlflow") - before[1]
        return {"row": name, "wall_s": wall, "peak_rss_mb": rss, "bytes_written": du(p) - before[0] + mlflow,
                "store_bytes": du(p / "store"), "mlflow_bytes": mlflow,
                "prefect_bytes": du(p / "prefect"),
                "layer_forwards": forwards(summary, computed_only=True), "removed": summary["removed"],
                "steps_reused": summary["steps_reused"], "steps_computed": summary["steps_computed"],
                "stream_layers": summary["stream_layers"], "killed": killed,
                "teacher_bytes": du(p / "store" / "teacher"),
                "fits": [_fit(s["refine"]["report"]) for s in summary["steps"] if s.get("refine")] +
                        ([_fit(summary["refine"]["report"])] if summary.get("refine") else []),
                "reconstructed": [_local(s["record"]) for s in summary["steps"] if s["record"].get("reconstruct")],
                "refit": _refit((summary.get("refit") or {}).get("report")),
                **_audit([s["record"] for s in summary["steps"] if s["kept"]], summary.get("final_check"))}

    def _kill(self, cmd: list[str], home: Path, step: int) -> dict[str, Any]:
        """Start ``cmd``; SIGKILL its process group once ``step - 1`` steps are done and step ``step`` has run
        for a moment (mid-step)."""
        t = time.perf_counter()
        steps = home / "prunecomp" / "store" / "steps"
        with (home / "killed-log.txt").open("w") as f:
            proc = subprocess.Popen(cmd, env=self.env(home), cwd=home, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                while len(list(steps.glob("*/_COMPLETE"))) < step - 1:
                    if proc.poll() is not None:
                        raise RuntimeError(f"run ended before step {step}; see {home / 'killed-log.txt'}")
                    time.sleep(0.2)
                time.sleep(self.args.kill_delay)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return {"after_s": time.perf_counter() - t, "steps_done": len(list(steps.glob("*/_COMPLETE")))}


def _audit(steps: list[dict[str, Any]], final: dict[str, Any] | None) -> dict[str, Any]:
    """What the guard decided per step (with lsq: whether the map was kept) and the final check's verdict."""
    guards = [s.get("guard") or {} for s in steps]
    return {"guard": [g.get("decision") for g in guards], "maps_kept": [g.get("map_kept") for g in guards],
            "final_check": final and {k: final[k] for k in ("verdict", "folded", "ppl", "uncompensated_ppl")}}


def _fit(report: dict[str, Any]) -> dict[str, Any]:
    """The part of a refinement report the table shows."""
    return {k: report[k] for k in ("mode", "steps", "parameters", "loss_before", "loss_after", "seconds")} | \
        {"loss": report.get("loss", "topk"), "loss_windows": report.get("loss_windows")}


def _local(step: dict[str, Any]) -> dict[str, Any]:
    """The part of a step's block reconstruction the table shows."""
    return {k: step["reconstruct"][k] for k in ("layers", "steps", "loss_before", "loss_after", "seconds")}


def _refit(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of a sequential refit's report the table shows."""
    from prunecomp.method.refit import mean_errors

    if not report:
        return None
    before, after = mean_errors(report)
    return {"layers": report["layers"], "steps": report["steps"], "seconds": report["seconds"],
            "error_before": before, "error_after": after}


def prefect_server(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | QUIET | {
        "PREFECT_HOME": str(work / "prefect-server")}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{api}/health", timeout=2)
            return proc, api
        except OSError:
            time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("the Prefect server did not start in 120 s")


def table(rows: list[dict[str, Any]], model_bytes: int) -> str:
    lines = ["| row | wall | peak RSS | bytes written | x model size | layer-forwards | removed | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        notes = []
        if r.get("stream_layers"):
            notes.append("streamed")
        if r.get("reconstructed"):
            rs = r["reconstructed"]
            notes.append(f"{len(rs)} reconstructions ({rs[0]['steps']} steps each, {sum(x['seconds'] for x in rs):.0f}"
                         " s), error " + ", ".join(f"{x['loss_before']:.3f}->{x['loss_after']:.3f}" for x in rs))
        if r.get("refit"):
            f = r["refit"]
            notes.append(f"refit of {len(f['layers'])} layers ({f['steps']} steps each, {f['seconds']:.0f} s), mean "
                         f"error {f['error_before']:.3f}->{f['error_after']:.3f}")
        if r.get("fits"):
            notes.append(f"{len(r['fits'])} fits ({r['fits'][0]['mode']}, {r['fits'][0]['steps']} steps each, "
                         f"{r['fits'][0].get('loss', 'topk')} loss, "
                         f"{sum(f['seconds'] for f in r['fits']):.0f} s), KL "
                         + ", ".join(f"{f['loss_before']:.3f}->{f['loss_after']:.3f}" for f in r["fits"]))
        if r.get("teacher_bytes"):
            notes.append(f"teacher artifact {r['teacher_bytes'] / 2**20:.1f} MiB")
        if any(m is not None for m in r.get("maps_kept", [])):
            notes.append(f"lsq maps kept {sum(bool(m) for m in r['maps_kept'])} of {len(r['maps_kept'])}")
        if r.get("final_check"):
            f = r["final_check"]
            notes.append(f"final check {f['verdict']} ({f['folded']}: {f['ppl']:.3f} vs {f['uncompensated_ppl']:.3f})")
        if r.get("killed"):
            notes.append(f"rerun after a kill in step {r['killed']['steps_done'] + 1}; reused "
                         f"{r['steps_reused']}, computed {r['steps_computed']}")
        lines.append(f"| {r['row']} | {r['wall_s']:.1f} s | {r['peak_rss_mb']:.0f} MB | "
                     f"{r['bytes_written'] / 2**20:.0f} MiB | {r['bytes_written'] / model_bytes:.2f} | "
                     f"{r['layer_forwards']} | {r['removed']} | {'; '.join(notes)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/prunecomp-bench-pipeline")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--big-only", action="store_true", help="only the ~7B streamed pipeline row")
    ap.add_argument("--refine-only", action="store_true", help="only the progressive-refinement rows (~0.9B)")
    ap.add_argument("--refine-steps", type=int, default=4, help="Adam steps per fit of the refined rows")
    ap.add_argument("--refine-loss", default="tail", help="the refined and reconstructed rows' --refine-loss (the "
                    "older rows were measured with topk, the default before the tail loss)")
    ap.add_argument("--reconstruct-lr", type=float, default=1e-3,
                    help="the reconstructed rows' --reconstruct-lr (on random weights 1e-3 raises every fit's error, "
                         "so every fit is declined; a smaller one keeps them, which the streamed rows need to "
                         "exercise their spill files)")
    ap.add_argument("--reconstruct-only", action="store_true", help="only the block-reconstruction rows (~0.9B)")
    ap.add_argument("--refit-only", action="store_true", help="only the sequential-refit rows (~0.9B)")
    ap.add_argument("--compensation", default=None, help="with --refine-only: the refined rows' --compensation "
                    "(default: the product's); a non-default one is named in the rows and the output file")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--eval-seq-len", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--kill-delay", type=float, default=None, help="seconds into step 2 before the SIGKILL "
                    "(default 0.5: step 2 runs on a warm working copy and takes a few seconds; 0 with --quick)")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data")
                    if (ROOT.parent / "shared" / "data").is_dir() else None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    size = "quick" if args.quick else "7B" if args.big_only else "0.9B"
    if args.kill_delay is None:
        args.kill_delay = 0.0 if args.quick else 0.5
    comp = f"_{args.compensation}" if args.refine_only and args.compensation else ""
    suffix = ("_" + size if size != "0.9B" else "") + ("_refine" + comp if args.refine_only else "") + \
        ("_reconstruct" if args.reconstruct_only else "") + ("_refit" if args.refit_only else "")
    out = Path(args.out or ROOT / "bench" / "results" / f"pipeline_scale{suffix}.json")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_before = machine_load()
    model = work / f"synthetic-{size}"
    params = write_synthetic(model, vocab=49152, **SPECS[size])
    with_tokenizer(model)
    model_bytes = du(*model.glob("*.safetensors"))
    print(f"model {model}: {params / 1e9:.2f} B parameters, {model_bytes / 2**30:.2f} GiB of weights", flush=True)
    server, api = prefect_server(work)
    (work / "mlflow").mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-c", "import sys; from mlflow.tracking import MlflowClient; "
                    "MlflowClient(sys.argv[1]).search_experiments()", f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"],
                   env=os.environ | QUIET, check=True, capture_output=True)
    rows: list[dict[str, Any]] = []
    try:
        b = Bench(args, model, work, api)
        plan: list[tuple[str, Any]] = [("pipeline streamed", lambda: b.pipeline("pipeline streamed",
                                                                                 ["--stream-layers"]))]
        refined = ["--refine", "channels", "--refine-at", "each", "--refine-steps", str(args.refine_steps),
                   "--refine-loss", args.refine_loss]
        if args.refit_only:
            seq = ["--refit", "sequential", "--refit-steps", str(args.refine_steps)]
            plan = [("library refitted", lambda: b.library("library refitted", seq)),
                    ("pipeline refitted", lambda: b.pipeline("pipeline refitted", ["--no-stream-layers", *seq]))]
        elif args.reconstruct_only:
            local = ["--reconstruct", "both", "--reconstruct-steps", str(args.refine_steps), "--reconstruct-lr",
                     str(args.reconstruct_lr), "--refine", "channels", "--refine-steps", str(args.refine_steps),
                     "--refine-loss", args.refine_loss]
            alone = local[:6]  # streamed: block reconstruction without the gains (they back-propagate the model)
            plan = [("library reconstructed", lambda: b.library("library reconstructed", local)),
                    ("pipeline reconstructed",
                     lambda: b.pipeline("pipeline reconstructed", ["--no-stream-layers", *local])),
                    ("library reconstructed streamed",
                     lambda: b.library("library reconstructed streamed", ["--stream-layers", *alone])),
                    ("pipeline reconstructed streamed",
                     lambda: b.pipeline("pipeline reconstructed streamed", ["--stream-layers", *alone]))]
        elif args.refine_only:
            tag = f" ({args.compensation})" if args.compensation else ""
            if args.compensation:
                refined += ["--compensation", args.compensation]
            plan = [("library refined" + tag, lambda: b.library("library refined" + tag, refined)),
                    ("pipeline refined" + tag,
                     lambda: b.pipeline("pipeline refined" + tag, ["--no-stream-layers", *refined]))]
        elif not args.big_only:
            plan = [("library", lambda: b.library("library", [])),
                    ("library streamed", lambda: b.library("library streamed", ["--stream-layers"])),
                    ("pipeline", lambda: b.pipeline("pipeline", ["--no-stream-layers"])),
                    *plan,
                    ("pipeline resumed", lambda: b.pipeline("pipeline resumed", ["--no-stream-layers"],
                                                            kill_in_step=2))]
        for name, fn in plan:
            rows.append(fn())
            r = rows[-1]
            print(f"  {name:<18} {r['wall_s']:7.1f} s  {r['peak_rss_mb']:7.0f} MB  "
                  f"{r['bytes_written'] / 2**20:8.0f} MiB  {r['layer_forwards']} layer-forwards", flush=True)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    text = table(rows, model_bytes)
    print(text)
    payload = {"rows": rows, "model": {"spec": SPECS[size], "params": params, "weight_bytes": model_bytes,
                                       "tokenizer": "SmolLM2-135M-Instruct", "weights": "random, fp32"},
               "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
               "python": platform.python_version(), "cpus": os.cpu_count(), "seconds": time.perf_counter() - t0,
               "commit": commit(ROOT), "load_before": load_before, "load_after": machine_load()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
