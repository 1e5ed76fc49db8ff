"""GPU smoke test: the library's in-memory and layer-streamed Prune&Comp paths, with lsq and refinement, on CUDA
(bf16 weights, fp32 statistics), on a synthetic ~1B Llama written here on the spot; timed.

Needs only torch, transformers, safetensors (and pydantic, which ``bench/gpu_smoke.sh`` unpacks from wheels carried
beside it when the machine has no package registry). Random token ids, no tokenizer, no data files.

    bash bench/gpu_smoke.sh                     # on the GPU machine (unpacks bench/wheels/ when pydantic is missing)
    python bench/gpu_smoke.py --device cpu --small   # the same checks on this machine, on a tiny model, ~1 min

Checks, each a row of the table (and a non-zero exit when any fails):
  in-memory lsq           prune k layers, lsq compensation; the recipe replayed on a fresh copy gives the same
                          tensors bit for bit (on CUDA too)
  in-memory refine        magnitude compensation + refinement (channels); calibration KL lowered
  in-memory reconstruct   block reconstruction (both sides) on float32 copies of bf16 layers: the error falls at
                          every step (or the fit is declined), the weights stay bf16, the recipe replays bit for bit
  in-memory refit         the sequential refit after the last removal, the dense layers read one at a time from
                          the folder onto the device: errors fall (or fits are declined), bf16 kept, replay exact
  streamed magnitude      layer-streamed, one decoder layer on the GPU at a time; same layers as in-memory
  streamed reconstruct    layer-streamed block reconstruction (one layer pair on the GPU for the fit, kept fits
                          in spill files): same layers as in-memory reconstruct, errors fall or fits are declined,
                          the recorded layers keep the model's dtype
  weight dtype            the in-memory model kept bf16 weights on CUDA; statistics (scales) finite
  level fast / balanced / best   prunecomp.engine.compress.compress at each quality level's own settings
                          (prunecomp.levels.level_settings merged into PruneConfig(n_layers=k, metric="bi"); the
                          gains and the reconstruction fit on max(64, --samples) windows, a superset of the scoring
                          ones): k layers removed, the gains fitted (balanced, best), every removal reconstructed
                          (best); its seconds beside the seconds bench/projection.py projects for the same shape,
                          windows and settings on this device (an H100's constants on any GPU but an H200, this
                          CPU's measured sgemm rate on the CPU), so the projection is checked whenever a GPU runs this
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SPECS = {"1B": dict(hidden=2048, inter=5632, n_layers=16, vocab=32000, heads=16, kv_heads=4),
         "small": dict(hidden=128, inter=344, n_layers=6, vocab=512, heads=4, kv_heads=2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--small", action="store_true", help="a tiny model (for a CPU check of the script)")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--refine-steps", type=int, default=20)
    ap.add_argument("--levels", default="fast,balanced,best", help="the quality levels timed (comma-separated; "
                    "empty to skip)")
    ap.add_argument("--work", default=None, help="where the synthetic model is written (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args()

    import torch
    from memory import write_synthetic
    from transformers import AutoModelForCausalLM

    from prunecomp.config import PruneConfig
    from prunecomp.engine.compress import compress
    from prunecomp.engine.loop import prune_and_compensate
    from prunecomp.engine.streamed import StreamedModel
    from prunecomp.recipes.apply import apply_recipe

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    spec = SPECS["small" if args.small else "1B"]
    work = Path(args.work or tempfile.mkdtemp(prefix="prunecomp-gpu-smoke-"))
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    t = time.perf_counter()
    folder = work / ("synthetic-small" if args.small else "synthetic-1b")
    params = write_synthetic(folder, **spec)
    rows.append({"check": "write synthetic model", "ok": True, "seconds": time.perf_counter() - t,
                 "detail": f"{params / 1e9:.2f} B params"})
    ids = torch.randint(0, spec["vocab"], (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))

    def load() -> Any:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(name: str, fn: Any) -> Any:
        sync()
        t = time.perf_counter()
        try:
            ok, detail, out = fn()
        except Exception as exc:  # a smoke test reports every check, then fails
            ok, detail, out = False, f"{type(exc).__name__}: {exc}", None
        sync()
        rows.append({"check": name, "ok": bool(ok), "seconds": time.perf_counter() - t, "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {name:<22} {rows[-1]['seconds']:8.1f} s  {detail}", flush=True)
        return out

    source = {"content_hash": "synthetic", "architecture": "LlamaForCausalLM"}

    def lsq() -> tuple[bool, str, Any]:
        model = load()
        report = prune_and_compensate(model, ids, PruneConfig(n_layers=args.k, metric="bi", compensation="lsq"),
                                      batch_size=4)
        replay = apply_recipe(load(), report.recipe(source))
        a, b = model.state_dict(), replay.state_dict()
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        bf16 = all(p.dtype == dtype for p in model.parameters())
        finite = all(s.measured_scale == s.measured_scale and 0 < s.measured_scale < 1e3 for s in report.steps)
        del model, replay
        return same and bf16 and finite, (f"removed {report.removed}, recipe replay bit-identical: {same}, "
                                          f"weights {dtype}: {bf16}, scales finite: {finite}"), report.removed

    def refine() -> tuple[bool, str, Any]:
        model = load()
        cfg = PruneConfig(n_layers=args.k, metric="bi", compensation="magnitude", refine="channels",
                          refine_steps=args.refine_steps, refine_batch=2, refine_topk=64)
        report = compress(model, ids, cfg, batch_size=4)
        r = report.refine or {}
        del model
        return r.get("loss_after", 1e9) < r.get("loss_before", 0), (
            f"removed {report.removed}, KL {r.get('loss_before', float('nan')):.4f} -> "
            f"{r.get('loss_after', float('nan')):.4f} in {r.get('seconds', 0):.1f} s"), report.removed

    def reconstruct() -> tuple[bool, str, Any]:
        model = load()
        cfg = PruneConfig(n_layers=args.k, metric="bi", reconstruct="both", reconstruct_steps=args.refine_steps,
                          reconstruct_batch=2)
        report = prune_and_compensate(model, ids, cfg, batch_size=4)
        replay = apply_recipe(load(), report.recipe(source))
        a, b = model.state_dict(), replay.state_dict()
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        fell = all(s.reconstruct and (s.reconstruct["loss_after"] < s.reconstruct["loss_before"]
                                      or not s.reconstruct["kept"]) for s in report.steps)
        kept = all(p.dtype == dtype for p in model.parameters())
        errors = ", ".join(f"{s.reconstruct['loss_before']:.3f}->{s.reconstruct['loss_after']:.3f}"
                           for s in report.steps if s.reconstruct)
        del model, replay
        return same and fell and kept, (f"removed {report.removed}, errors {errors}, replay bit-identical: {same}, "
                                        f"weights {dtype}: {kept}"), report.removed

    def refit() -> tuple[bool, str, Any]:
        model = load()
        cfg = PruneConfig(n_layers=args.k, metric="bi", refit="sequential", refit_steps=args.refine_steps,
                          reconstruct_batch=2)
        report = compress(model, ids, cfg, batch_size=4, dense=StreamedModel(folder, device=device, dtype=dtype))
        replay = apply_recipe(load(), report.recipe(source))
        a, b = model.state_dict(), replay.state_dict()
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        r = report.refit or {}
        fell = all(x <= y for x, y in zip(r.get("loss_after", []), r.get("loss_before", []), strict=True))
        kept = all(p.dtype == dtype for p in model.parameters())
        del model, replay
        return same and fell and kept, (f"removed {report.removed}, refitted {r.get('layers')} in "
                                        f"{r.get('seconds', 0):.1f} s, errors fell: {fell}, replay bit-identical: "
                                        f"{same}, weights {dtype}: {kept}"), report.removed

    def magnitude() -> tuple[bool, str, Any]:
        model = load()
        report = prune_and_compensate(model, ids, PruneConfig(n_layers=args.k, metric="bi"), batch_size=4)
        del model
        return True, f"removed {report.removed}", report.removed

    def streamed(expected: Any) -> Any:
        def run() -> tuple[bool, str, Any]:
            sm = StreamedModel(folder, device=device, dtype=dtype)
            report = prune_and_compensate(sm, ids, PruneConfig(n_layers=args.k, metric="bi"), batch_size=4)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            return report.removed == expected, (f"removed {report.removed} (in-memory {expected}), "
                                                f"{sm.layer_loads} layer loads, peak GPU {peak:.2f} GiB"), None
        return run

    def streamed_reconstruct(expected: Any) -> Any:
        def run() -> tuple[bool, str, Any]:
            sm = StreamedModel(folder, device=device, dtype=dtype)
            cfg = PruneConfig(n_layers=args.k, metric="bi", reconstruct="both", reconstruct_steps=args.refine_steps,
                              reconstruct_batch=2)
            report = prune_and_compensate(sm, ids, cfg, batch_size=4)
            fell = all(s.reconstruct and (s.reconstruct["loss_after"] < s.reconstruct["loss_before"]
                                          or not s.reconstruct["kept"]) for s in report.steps)
            records = [s.layer_weights for s in report.steps if s.layer_weights is not None]
            kept = all(w[name].dtype == dtype for w in records for name in list(w)[:2])
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            return (report.removed == expected and fell and kept,
                    f"removed {report.removed} (in-memory {expected}), {len(records)} fits kept in spill files, "
                    f"records {dtype}: {kept}, peak GPU {peak:.2f} GiB", None)
        return run

    @functools.cache
    def projection_device() -> Any:
        """The device whose constants the level rows are projected on (the smoke test may run on any GPU)."""
        import projection

        if device != "cuda":
            return projection.cpu_device(*projection.measure_cpu())
        return projection.H200 if "H200" in torch.cuda.get_device_name() else projection.H100

    def level_row(level: str) -> Any:
        def run() -> tuple[bool, str, Any]:
            import projection

            from prunecomp.levels import level_settings

            settings = level_settings(level, args.samples)
            cfg = PruneConfig.model_validate({"n_layers": args.k, "metric": "bi"} | settings)
            fit_n = settings.get("refine_samples")
            fit = None
            if fit_n:  # the first --samples windows are the scoring ones: the fitting set is a superset
                more = torch.randint(0, spec["vocab"], (fit_n - args.samples, args.seq_len),
                                     generator=torch.Generator().manual_seed(1))
                fit = torch.cat([ids, more])
            model = load()
            sync()
            t = time.perf_counter()
            report = compress(model, ids, cfg, batch_size=4, refine_windows=fit)
            sync()
            seconds = time.perf_counter() - t
            shape = projection.Shape(f"synthetic {params / 1e9:.2f}B", spec["hidden"], spec["inter"],
                                     spec["n_layers"], spec["vocab"], spec["heads"], spec["kv_heads"])
            calib = projection.Calibration("smoke", args.samples, args.seq_len, 4, held_out=0)
            dev = projection_device()
            proj = projection.project(shape, calib, cfg, dev, level=level, fit_windows=fit_n, teacher_batch=4)
            projected = sum(proj.seconds.get(name, 0.0) for name in projection.COMPRESS_STAGES)
            stages = {name: round(v, 3) for name, v in proj.seconds.items() if name in projection.COMPRESS_STAGES}
            refined = cfg.refine == "none" or bool(report.refine)
            rebuilt = cfg.reconstruct == "none" or all(s.reconstruct for s in report.steps)
            ok = len(report.removed) == args.k and refined and rebuilt
            del model
            return ok, (f"removed {report.removed}, compress {seconds:.1f} s, projected {projected:.1f} s on "
                        f"{dev.name} (measured / projected {seconds / projected:.2f}; {proj.scoring} scoring"
                        f"{', ' + str(fit_n) + ' fitting windows' if fit_n else ''})"), {
                "level": level, "compress_s": seconds, "projected_s": projected, "projected_stages_s": stages,
                "projection_device": dev.name, "fit_windows": fit_n}
        return run

    timed("in-memory lsq", lsq)
    timed("in-memory refine", refine)
    rebuilt = timed("in-memory reconstruct", reconstruct)
    timed("in-memory refit", refit)
    removed = timed("in-memory magnitude", magnitude)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed("streamed magnitude", streamed(removed))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed("streamed reconstruct", streamed_reconstruct(rebuilt))
    for level in [lv for lv in args.levels.split(",") if lv]:
        out = timed(f"level {level}", level_row(level))
        if out:
            rows[-1].update(out)
    ok = all(r["ok"] for r in rows)
    info = {"device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "torch": torch.__version__, "python": platform.python_version(), "dtype": str(dtype),
            "spec": spec, "k": args.k, "calibration": [args.samples, args.seq_len], "rows": rows,
            "seconds": time.perf_counter() - t0, "ok": ok}
    print(json.dumps({k: v for k, v in info.items() if k != "rows"}))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
