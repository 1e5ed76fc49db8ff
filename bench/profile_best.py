"""Where ``--quality best`` spends its time on a CPU: one block reconstruction and one gains fit of SmolLM2-135M
(or, ``--small``, of ``../shared/models/stories260K``), each at a reduced number of steps, split into forward,
backward, head (final norm and lm_head, the loss), optimizer and data movement, by wall-clock timers hooked around
the library's own calls.

Why timers and not only a profiler: the question is which *phase* of a fit costs what (the audit passes, the
training forward, its backward, the loss over the vocabulary), and a phase is a span of many small ops. The timers
are hooks outside the library (global module forward hooks on the decoder layers and the head, backward hooks on
the lm_head, ``Tensor.backward``, the optimizer's step hooks, ``copy.deepcopy``); on a CPU everything runs
synchronously, so each span is exactly the time its work took (plus the hooks' few microseconds a module call).
``--ops`` also runs the whole thing under ``torch.profiler`` and sums the ops' self time by kind (matmul,
attention, elementwise, reductions, copies and indexing = data movement, optimizer).

What runs, in the order ``prunecomp.engine.compress.compress`` runs it for one removal at ``--quality best``:
  teacher      ``compress.teacher_for``: the dense model's top-k predictions on the fitting windows
  capture      ``reconstruct.capture_gap``: the stream beside the gap, before the removal (a prefix pass)
  reconstruct  ``reconstruct.reconstruct`` on the two layers beside the gap, ``--reconstruct-steps`` steps
  refine       ``compress.refine_as_configured``: the gains, ``--refine-steps`` steps
The level's settings (``prunecomp.levels.level_settings("best", windows)``) except the steps; the report also
extrapolates each fit to the level's steps (per-step phases times the steps, the rest once) and prints the CPU
projection of ``bench/projection.py`` for the same work.

    OMP_NUM_THREADS=1 .venv/bin/python bench/profile_best.py                 # SmolLM2-135M, ~4 min on one thread
    OMP_NUM_THREADS=1 .venv/bin/python bench/profile_best.py --ops           # + the profiler's pass, ~7 min
    OMP_NUM_THREADS=1 .venv/bin/python bench/profile_best.py --small --out /tmp/profile_small.json   # seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PHASES = ("forward", "forward (no grad)", "head", "head (no grad)", "loss", "loss (no grad)", "backward",
          "backward (loss)", "backward (head)", "optimizer", "data movement", "other")
"""The spans a context's time is split into. ``head``: final norm and lm_head forward; ``loss``: from the head's
output to the next span (the distillation loss; for the teacher its log-softmax and top-k); ``backward (loss)`` /
``(head)``: the backward up to and through the lm_head (the rest of a backward is ``backward``); ``data
movement``: ``copy.deepcopy`` of the layers a fit trains; ``other``: everything else (embedding, the catch pass,
indexing, the scheduler, copying fitted weights back)."""
GROUPS = {"forward": ("forward", "forward (no grad)"), "backward": ("backward",),
          "head": ("head", "head (no grad)", "loss", "loss (no grad)", "backward (loss)", "backward (head)"),
          "optimizer": ("optimizer",), "data movement": ("data movement",), "other": ("other",)}
"""The split asked for: forward / backward / head (lm_head + loss, both directions) / optimizer / data movement."""
PER_STEP = ("forward", "head", "loss", "backward", "backward (loss)", "backward (head)", "optimizer")
"""Phases that a fit repeats every step (everything with gradients on); the no-grad ones (audits, teacher,
capture), the copies and the rest are paid once per fit."""


class Phases:
    """Exclusive wall time per (context, phase): a stack of open spans; time with none open goes to the idle
    phase (``other``, or ``loss`` right after the head)."""

    def __init__(self) -> None:
        self.totals: dict[tuple[str, str], float] = defaultdict(float)
        self.stack: list[str] = []
        self.context = "setup"
        self.idle = "other"
        self.t = time.perf_counter()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.totals[(self.context, self.stack[-1] if self.stack else self.idle)] += now - self.t
        self.t = now

    def push(self, name: str) -> None:
        self._tick()
        self.stack.append(name)
        self.idle = "other"

    def pop(self) -> None:
        self._tick()
        if self.stack:
            self.stack.pop()

    def relabel(self, name: str) -> None:
        """Close the open span and go on under ``name`` (the backward's stages)."""
        self._tick()
        if self.stack:
            self.stack[-1] = name

    def set_idle(self, name: str) -> None:
        self._tick()
        self.idle = name

    @contextmanager
    def within(self, context: str) -> Iterator[None]:
        self._tick()
        outer, self.context, self.idle = self.context, context, "other"
        try:
            yield
        finally:
            self._tick()
            self.context, self.idle = outer, "other"

    def table(self, context: str) -> dict[str, float]:
        return {p: self.totals.get((context, p), 0.0) for p in PHASES}


@contextmanager
def instrumented(ph: Phases, head_modules: tuple[Any, Any]) -> Iterator[None]:
    """Hooks that open and close the spans (all removed on exit): decoder layers by class name, the final norm and
    the lm_head by identity, ``Tensor.backward``, every optimizer's step, ``copy.deepcopy`` (outermost call)."""
    import torch
    from torch.nn.modules import module as nn_module
    from torch.optim import optimizer as optim

    norm, lm_head = head_modules

    def grad_suffix(name: str) -> str:
        return name if torch.is_grad_enabled() else f"{name} (no grad)"

    def pre(mod: Any, _args: Any) -> None:
        if mod is norm or mod is lm_head:
            ph.push(grad_suffix("head"))
        elif type(mod).__name__.endswith("DecoderLayer"):
            ph.push(grad_suffix("forward"))

    def post(mod: Any, _args: Any, _out: Any) -> None:
        if mod is norm or type(mod).__name__.endswith("DecoderLayer"):
            ph.pop()
        elif mod is lm_head:
            ph.pop()
            ph.set_idle(grad_suffix("loss"))

    handles = [nn_module.register_module_forward_pre_hook(pre), nn_module.register_module_forward_hook(post),
               optim.register_optimizer_step_pre_hook(lambda *_: ph.push("optimizer")),
               optim.register_optimizer_step_post_hook(lambda *_: ph.pop()),
               lm_head.register_full_backward_pre_hook(lambda *_: ph.relabel("backward (head)")),
               lm_head.register_full_backward_hook(lambda *_: ph.relabel("backward"))]
    original_backward = torch.Tensor.backward
    original_deepcopy = copy.deepcopy
    depth = [0]

    def backward(self: Any, *args: Any, **kwargs: Any) -> Any:
        ph.push("backward (loss)" if ph.context == "refine" else "backward")
        try:
            return original_backward(self, *args, **kwargs)
        finally:
            ph.pop()

    def deepcopy(obj: Any, memo: Any = None, _nil: Any = None) -> Any:
        if depth[0]:
            return original_deepcopy(obj, memo)
        depth[0] += 1
        ph.push("data movement")
        try:
            return original_deepcopy(obj, memo)
        finally:
            ph.pop()
            depth[0] -= 1

    torch.Tensor.backward = backward  # type: ignore[method-assign]
    copy.deepcopy = deepcopy  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.Tensor.backward = original_backward  # type: ignore[method-assign]
        copy.deepcopy = original_deepcopy
        for h in handles:
            h.remove()


OP_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("attention", ("scaled_dot_product", "flash_attention", "aten::_softmax", "aten::softmax")),
    ("optimizer", ("_foreach_", "adam")),
    ("data movement", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::cat", "aten::index",
                       "aten::gather", "aten::scatter", "aten::contiguous", "aten::stack", "aten::embedding",
                       "aten::cos", "aten::sin", "aten::empty", "aten::zeros", "aten::ones", "aten::fill_",
                       "aten::slice", "aten::select", "aten::view", "aten::reshape", "aten::transpose",
                       "aten::expand", "aten::t", "aten::permute", "aten::unsqueeze", "aten::as_strided")),
    ("reductions", ("aten::logsumexp", "aten::log_softmax", "aten::_log_softmax", "aten::topk", "aten::sum",
                    "aten::mean", "aten::max", "aten::nll_loss", "aten::cross_entropy")),
)


def op_kind(name: str) -> str:
    """The kind of one profiled op (the first of :data:`OP_KINDS` whose pattern it contains; else elementwise)."""
    lowered = name.lower()
    for kind, patterns in OP_KINDS:
        if any(p.lower() in lowered for p in patterns):
            return kind
    return "elementwise and other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="../shared/models/stories260K instead of SmolLM2-135M")
    ap.add_argument("--model", default=None, help="any model prunecomp loads (default: SmolLM2-135M)")
    ap.add_argument("--reconstruct-steps", type=int, default=10)
    ap.add_argument("--refine-steps", type=int, default=5)
    ap.add_argument("--windows", type=int, default=32, help="scoring windows; the fits use max(64, this), as the "
                    "level does (the cpu preset's 32)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per window (the cpu preset's 256)")
    ap.add_argument("--batch", type=int, default=8, help="the teacher's batch (the cpu preset's 8)")
    ap.add_argument("--layer", type=int, default=None, help="the layer removed (default 17 of SmolLM2, one of "
                    "the five the main job removes, 25 14 17 15 13, near their middle; the middle of a small model)")
    ap.add_argument("--source", default="c4")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--ops", action="store_true", help="also run under torch.profiler: self time per op kind")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile_best.json"))
    args = ap.parse_args()

    import torch
    from projection import (
        Shape,
        capture_cost,
        cpu_device,
        fit_cost,
        gains_cost,
        level_config,
        measure_cpu,
        read_smollm2,
        teacher_cost,
    )

    from prunecomp.corpora.calibration import calibration_windows
    from prunecomp.engine.compress import refine_as_configured, teacher_for
    from prunecomp.levels import LEVELS
    from prunecomp.method.reconstruct import capture_gap, reconstruct
    from prunecomp.models.adapters import get_adapter, resolve
    from prunecomp.models.pruning import original_indices, remove_layer
    from prunecomp.models.sources import load_model

    t_all = time.perf_counter()
    load_before = list(os.getloadavg())
    model_ref = args.model or (str(ROOT.parent / "shared" / "models" / "stories260K") if args.small else None)
    lm = load_model(model_ref, device="cpu")
    model = lm.model
    cfg_hf = model.config
    n_layers = int(cfg_hf.num_hidden_layers)
    layer = args.layer if args.layer is not None else (17 if model_ref is None else n_layers // 2)
    config = level_config("best", 1, args.windows, reconstruct_steps=args.reconstruct_steps,
                          refine_steps=args.refine_steps)
    fit_n = int(config.refine_samples)
    ids = calibration_windows(lm.tokenizer, args.source, n_samples=fit_n, seq_len=args.seq_len, seed=0,
                              data_dir=args.data_dir).ids
    adapter = get_adapter(model)
    head = (resolve(model, adapter.final_norm), resolve(model, adapter.lm_head))
    ph = Phases()
    reports: dict[str, Any] = {}

    def stages() -> None:
        with ph.within("teacher"):
            targets = teacher_for(model, ids, config, batch_size=args.batch)
        assert targets is not None
        with ph.within("capture"):
            gap = capture_gap(model, layer, ids, config.reconstruct, batch_size=config.reconstruct_batch)
        assert gap is not None
        with ph.within("removal"):
            remove_layer(model, layer)
        with ph.within("reconstruct"):
            done = reconstruct(model, gap, 1.0, steps=config.reconstruct_steps, lr=config.reconstruct_lr, seed=0,
                               removed=layer, originals=original_indices(model))
        reports["reconstruct"] = done.to_dict()
        with ph.within("refine"):
            fit = refine_as_configured(model, ids, targets, config)
        reports["refine"] = fit.to_dict()

    def run(fn: Callable[[], None]) -> float:
        t = time.perf_counter()
        with instrumented(ph, head):
            fn()
        return time.perf_counter() - t

    torch.manual_seed(0)
    wall = run(stages)
    contexts = ("teacher", "capture", "reconstruct", "refine")
    phases = {c: ph.table(c) for c in contexts}
    ops: dict[str, Any] | None = None
    if args.ops:  # a second pass on a fresh copy of the model, under the profiler
        lm2 = load_model(model_ref, device="cpu")
        model = lm2.model
        adapter = get_adapter(model)
        head = (resolve(model, adapter.final_norm), resolve(model, adapter.lm_head))
        ph = Phases()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            profiled_wall = run(stages)
        by_kind: dict[str, float] = defaultdict(float)
        top = []
        for evt in prof.key_averages():
            by_kind[op_kind(evt.key)] += evt.self_cpu_time_total / 1e6
            top.append((evt.self_cpu_time_total / 1e6, evt.key, evt.count))
        top.sort(reverse=True)
        ops = {"wall_s": profiled_wall, "self_s_by_kind": dict(by_kind),
               "top_ops": [{"op": k, "self_s": s, "calls": c} for s, k, c in top[:20]]}

    # Extrapolation to the level's steps, and the CPU projection of the same work.
    level = LEVELS["best"]
    steps_run = {"reconstruct": config.reconstruct_steps, "refine": config.refine_steps}
    steps_level = {"reconstruct": int(level["reconstruct_steps"]), "refine": int(level["refine_steps"])}
    at_level = {}
    for c in ("reconstruct", "refine"):
        per_step = {p: v / steps_run[c] for p, v in phases[c].items() if p in PER_STEP}
        at_level[c] = {p: (per_step[p] * steps_level[c] if p in per_step else v) for p, v in phases[c].items()}
    try:
        shape = read_smollm2() if model_ref is None else None
    except Exception:  # the loaded model's config is the same thing
        shape = None
    if shape is None:
        shape = Shape(type(model).__name__, cfg_hf.hidden_size, cfg_hf.intermediate_size, n_layers,
                      cfg_hf.vocab_size, cfg_hf.num_attention_heads, cfg_hf.num_key_value_heads,
                      bool(cfg_hf.tie_word_embeddings))
    flops, bw = measure_cpu()
    cpu = cpu_device(flops, bw)
    rb = config.reconstruct_batch
    projected = {
        "teacher": teacher_cost(shape, cpu, windows=fit_n, seq_len=args.seq_len, batch=args.batch,
                                topk=config.refine_topk).seconds(cpu),
        "capture": capture_cost(shape, cpu, windows=fit_n, seq_len=args.seq_len, prefix=layer, batch=rb
                                ).seconds(cpu),
        "reconstruct": fit_cost(shape, cpu, windows=fit_n, seq_len=args.seq_len, steps=config.reconstruct_steps,
                                batch=rb).seconds(cpu),
        "refine": gains_cost(shape, cpu, layers=n_layers - 1, windows=fit_n, seq_len=args.seq_len,
                             steps=config.refine_steps, batch=config.refine_batch, topk=config.refine_topk
                             ).seconds(cpu),
    }
    projected_level = {
        "reconstruct": fit_cost(shape, cpu, windows=fit_n, seq_len=args.seq_len, steps=steps_level["reconstruct"],
                                batch=rb).seconds(cpu),
        "refine": gains_cost(shape, cpu, layers=n_layers - 1, windows=fit_n, seq_len=args.seq_len,
                             steps=steps_level["refine"], batch=config.refine_batch,
                             topk=config.refine_topk).seconds(cpu),
    }

    def grouped(table: dict[str, float]) -> dict[str, float]:
        return {g: sum(table[p] for p in ps) for g, ps in GROUPS.items()}

    lines = [f"model {lm.source.uri} ({n_layers} layers, vocabulary {cfg_hf.vocab_size}), layer {layer} removed, "
             f"{fit_n} fitting windows x {args.seq_len} tokens, one thread ({torch.get_num_threads()}), "
             f"load {load_before[0]:.2f}", "",
             "| stage | steps | " + " | ".join(PHASES) + " | total | projected (CPU) |",
             "|---|---:|" + "---:|" * (len(PHASES) + 2)]
    for c in contexts:
        total = sum(phases[c].values())
        steps = str(steps_run.get(c, "-"))
        lines.append(f"| {c} | {steps} | " + " | ".join(f"{phases[c][p]:.2f}" for p in PHASES)
                     + f" | {total:.1f} | {projected[c]:.1f} |")
    for c in ("reconstruct", "refine"):
        total = sum(at_level[c].values())
        lines.append(f"| {c} at the level's steps | {steps_level[c]} | "
                     + " | ".join(f"{at_level[c][p]:.2f}" for p in PHASES)
                     + f" | {total:.1f} | {projected_level[c]:.1f} |")
    lines += ["", "| stage | " + " | ".join(GROUPS) + " |", "|---|" + "---:|" * len(GROUPS)]
    for name, table in [*((c, phases[c]) for c in contexts),
                        *((f"{c} at the level's steps", at_level[c]) for c in ("reconstruct", "refine"))]:
        g = grouped(table)
        total = sum(g.values())
        lines.append(f"| {name} | " + " | ".join(f"{100 * v / total:.0f}% ({v:.1f} s)" for v in g.values()) + " |")
    if ops is not None:
        total = sum(ops["self_s_by_kind"].values())
        lines += ["", f"torch.profiler, self CPU time by op kind (second pass, {ops['wall_s']:.1f} s wall under the "
                  "profiler):", "", "| op kind | self s | share |", "|---|---:|---:|"]
        for kind, v in sorted(ops["self_s_by_kind"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {kind} | {v:.1f} | {100 * v / total:.0f}% |")
    text = "\n".join(lines)
    print(text)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    payload = {
        "model": lm.source.uri, "layers": n_layers, "vocab": int(cfg_hf.vocab_size), "layer_removed": layer,
        "settings": {"fit_windows": fit_n, "seq_len": args.seq_len, "teacher_batch": args.batch,
                     "reconstruct": config.reconstruct, "reconstruct_batch": rb,
                     "reconstruct_lr": config.reconstruct_lr,
                     "refine": config.refine, "refine_batch": config.refine_batch, "refine_topk": config.refine_topk,
                     "refine_loss": config.refine_loss, "steps_run": steps_run, "steps_level": steps_level,
                     "source": args.source},
        "phases": phases, "groups": {c: grouped(phases[c]) for c in contexts},
        "at_level_steps": at_level, "at_level_groups": {c: grouped(at_level[c]) for c in at_level},
        "projected_cpu_s": projected, "projected_cpu_level_s": projected_level,
        "cpu": {"flops": flops, "bandwidth": bw}, "ops": ops, "fits": reports, "wall_s": wall,
        "seconds": time.perf_counter() - t_all, "threads": torch.get_num_threads(), "commit": commit,
        "load_before": load_before, "load_after": list(os.getloadavg()), "python": platform.python_version(),
        "torch": torch.__version__, "markdown": text,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
