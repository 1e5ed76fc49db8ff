"""Each quality level's time projected from counted work: FLOPs and bytes per stage, for SmolLM2-135M, the 0.92 B
synthetic Llama of ``bench/pipeline_scale.py``, Llama-3-8B and Llama-3-70B, on one H100 and on this machine's CPU,
set beside the CPU seconds measured in ``bench/results``.

Why a model on paper: no GPU timing of the levels exists yet, and the question "how long does ``--quality best``
take on an 8B model" has to be answered before one is lent. Counting the work per stage from the code (what each
stage runs, on how many windows, how many times) also says *where* the time goes, which a single wall-clock number
does not; ``bench/gpu_smoke.py`` prints the same projection beside a measured row per level, so the model is
checked the first time a GPU runs it.

The formula, per stage (a stage's work summed over its removals)::

    seconds = max(F / (P * e) + F32 / (P32 * e), B / W) + C * c + H / W_pcie + D / W_disk

    F    matmul + attention FLOPs in the model's dtype (bf16 on the GPU, fp32 on the CPU)
    F32  FLOPs in float32: the block reconstruction fits float32 copies of the layers (prunecomp/method/reconstruct.py),
         whose matmuls run in TF32 on CUDA (``tf32_matmuls``), so P32 is the TF32 peak on the GPU; the column
         "best, full float32 fits" projects them at the float32 peak (PyTorch's default, before that change)
    P, P32, e   peak FLOP/s (H100 SXM: 989e12 dense bf16, 67e12 fp32, 495e12 TF32) and the assumed efficiency
         (MATMUL_EFFICIENCY = 0.4 on the GPU; on the CPU P is a measured single-thread sgemm rate at the models'
         shapes and e = CPU_EFFICIENCY = 0.7, what a decoder layer's passes reach of it in the profile)
    B, W bytes to and from device memory (weights once per batch per pass, activations, logits, optimizer state)
         and its bandwidth (H100: 3.35e12 B/s; CPU: a measured copy rate)
    C, c layer calls (a decoder layer applied to one batch, forward or backward) and the dispatch overhead per call
         (CALL_OVERHEAD_S: Python and ~30 kernel launches; it only matters for small batches)
    H, D bytes over PCIe (teacher targets to the host and back) and from disk (a layer-streamed model's layers)

FLOPs per token: a decoder layer's forward is ``2 * P_layer + 2 * T * d`` (its matmul weights, and causal attention
over ``T`` positions: ``4 T d`` halved by the mask); the head's is ``2 * d * V``. A backward through frozen weights
(the gains) costs one forward more (input gradients only), through trained weights (the reconstruction) two.

The work per stage, counted from the code (k removals; the gap of removal i sits ``RERUN_FRACTION`` of the way from
the end of the ``L - i`` layers left):
  scoring      incremental (the boundary cache fits a quarter of free device memory): all L layers once, then per
               removal only the layers after the gap (+1 when a reconstruction changed the layer before it);
               exact otherwise: every layer *and the full-vocabulary head* every step (``scan_layers`` calls
               ``model(...)``, which computes logits nobody reads)
  guard        GUARD_CANDIDATES scales x the guard's windows (``GuardBudget``: 1/32 of them, >= 512 tokens) x the
               tail after the gap, then the head on every ``stride``-th position (+ a prefix pass when not cached)
  capture      best: per removal, a prefix pass over the fitting windows up to the layer after the gap
  reconstruct  best: per removal, 2 layers x (audit error before and after on every fitting window + steps x
               ``reconstruct_batch`` windows forward and backward) in float32, Adam over both layers
  teacher      balanced, best: the dense model once over the fitting windows, log-softmax and top-k over the
               vocabulary, the targets to the host
  gains        balanced, best: audit loss before and after on 16 windows, steps x ``refine_batch`` windows through
               the whole pruned model and the head, forward and backward, with the tail loss
  final check  the CLI's held-out check: 2 forward passes of the pruned model over 8 held-out windows
  evaluation   perplexity of the dense and the pruned model (EVAL_TOKENS per preset; not part of any level)

Levels (``prunecomp/levels.py``): fast = scoring + guard; balanced = fast + teacher + gains; best = balanced +
capture + reconstruct. The final check and the evaluation are shown apart. A model whose bf16 weights do not fit
the device is projected layer-streamed (``--stream-layers``: layers read from disk every pass) for the stages that
stream; the gains back-propagate through the whole model and cannot stream, so their time is projected "as if it
fit" and flagged.

    OMP_NUM_THREADS=1 .venv/bin/python bench/projection.py             # ~15 s (measures the CPU, reads the results)
    .venv/bin/python bench/projection.py --cpu-flops 8.8e10 --cpu-bw 1e10 --no-read-config   # stated, no measuring
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

# Device constants (H100 SXM5, dense, no sparsity) and the assumed efficiency.
H100_BF16_FLOPS = 989e12
H100_FP32_FLOPS = 67e12
H100_TF32_FLOPS = 494.7e12
H100_HBM_BYTES_S = 3.35e12
H100_MEMORY_BYTES = 80e9
H200_HBM_BYTES_S = 4.8e12
H200_MEMORY_BYTES = 141e9
MATMUL_EFFICIENCY = 0.4
"""Share of the peak that the matmuls of an eager HF Llama reach (cuBLAS on large GEMMs reaches 60-75%; attention,
norms and small batches pull the whole pass down)."""
PCIE_BYTES_S = 25e9
DISK_BYTES_S = 3e9
"""A layer-streamed 70B model (141 GB of bf16 weights) does not fit the page cache of a 128 GiB host: its layers
come from an NVMe disk."""
CALL_OVERHEAD_S = 1.5e-4
CPU_EFFICIENCY = 0.7
"""Share of the best single-thread sgemm rate that a decoder layer's passes reach on this CPU: 66-78 GFLOP/s in the
capture, the reconstruction's audit, forward and backward spans of ``bench/results/profile_best.json`` against
96 GFLOP/s sgemm measured by the same run."""

# What the stages' work depends on beyond the code's settings.
RERUN_FRACTION = 0.4
"""Share of the layers left that lie after the gap. SmolLM2-135M, BI, k = 5 (the main job: layers 25, 14, 17, 15, 13
removed) re-ran 4 + 14 + 11 + 12 of 29 + 28 + 27 + 26 layers after its first four removals: 0.37."""
GUARD_CANDIDATES = 3.2
GUARD_ROUNDS = 2.2
"""Mean candidates measured and search rounds per removal in ``bench/results/guard_cost.json`` (3, 3, 4, 3, 3
candidates in 2, 2, 3, 2, 2 rounds)."""
ACTIVATION_ELEMENTS = (12, 6)
"""Activation elements read and written per token per layer forward, as ``(a, b)`` in ``a * d + b * f`` (q, k, v,
the attention output, the residual adds and norms; gate, up, their product and its activation): the bytes a layer
moves besides its weights, and what a backward keeps for it."""
LOSS_PASSES = {"none": 0, "ce": 4, "tail": 5, "tail_backward": 7, "teacher": 4}
"""Full-vocabulary fp32 passes over the logits per token: none (logits computed and dropped: exact scoring),
cross-entropy (cast, log-softmax, read, gather), the tail loss (cast, log-sum-exp, scatter copy, log-sum-exp,
gather) and its backward, the teacher (cast, log-softmax, top-k)."""
EVAL_TOKENS = {"paper": 1.0e6, "cpu": 3 * 20 * 512, "quality": 3 * 8 * 512}
"""Perplexity tokens per model: the paper's full test splits (about 1.3 + 0.45 + ~2 MB of WikiText-2, PTB and C4
text at ~4 characters a token: an assumption), the ``cpu`` preset's first 20 x 512 tokens of each corpus, the
quality protocol's 8 x 512."""


@dataclass(frozen=True)
class Shape:
    """A Llama's dimensions: what every count below is made of."""

    name: str
    hidden: int
    inter: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = False

    @property
    def matmul_params(self) -> int:
        """Weights of one decoder layer's matmuls (q, k, v, o, gate, up, down)."""
        d, kv = self.hidden, self.kv_heads * (self.hidden // self.heads)
        return 2 * d * d + 2 * d * kv + 3 * d * self.inter

    @property
    def layer_params(self) -> int:
        return self.matmul_params + 2 * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def layer_flops(self, seq_len: int) -> float:
        """Forward FLOPs per token of one decoder layer on windows of ``seq_len`` tokens."""
        return 2.0 * self.matmul_params + 2.0 * seq_len * self.hidden

    @property
    def head_flops(self) -> float:
        return 2.0 * self.hidden * self.vocab

    @property
    def activation_elements(self) -> int:
        a, b = ACTIVATION_ELEMENTS
        return a * self.hidden + b * self.inter


SMOLLM2_135M = Shape("SmolLM2-135M", 576, 1536, 30, 49152, 9, 3, tied=True)
SYNTHETIC_092B = Shape("synthetic 0.92B", 2048, 5632, 16, 49152, 16, 4)
LLAMA3_8B = Shape("Llama-3-8B", 4096, 14336, 32, 128256, 32, 8)
LLAMA3_70B = Shape("Llama-3-70B", 8192, 28672, 80, 128256, 64, 8)
KS: dict[str, tuple[int, ...]] = {SMOLLM2_135M.name: (3, 5, 8), SYNTHETIC_092B.name: (3, 5, 8),
                                  LLAMA3_8B.name: (5, 8), LLAMA3_70B.name: (10, 20)}
"""Removals projected: the quality protocol's 3 / 5 / 8 for the small models; about 1/6 and 1/4 of the depth for the
big ones (5 and 8 of 32, 10 and 20 of 80)."""


@dataclass(frozen=True)
class Calibration:
    """Scoring windows (``n`` x ``seq_len`` in batches of ``batch``), held-out windows and perplexity tokens.
    The fitting windows are the level's rule, ``max(64, n)`` (``prunecomp.levels.level_settings``)."""

    name: str
    n: int
    seq_len: int
    batch: int
    held_out: int = 8
    eval_tokens: float = 0.0


PAPER = Calibration("paper", 128, 2048, 1, eval_tokens=EVAL_TOKENS["paper"])
CPU_PRESET = Calibration("cpu", 32, 256, 8, eval_tokens=EVAL_TOKENS["cpu"])
QUALITY = Calibration("quality", 8, 512, 4, eval_tokens=EVAL_TOKENS["quality"])
"""``paper`` and ``cpu``: the presets of ``prunecomp/config.py``; ``quality``: ``bench/quality.py``'s protocol (8 x
512 scoring windows, batch 4), on which the levels' CPU seconds were measured."""


@dataclass(frozen=True)
class Device:
    """What the roofline needs of a machine; ``weight_bytes`` / ``act_bytes``: the model's dtype there."""

    name: str
    flops: float
    flops32: float
    efficiency: float
    bandwidth: float
    memory: float
    weight_bytes: int
    act_bytes: int
    gpu: bool = True


H100 = Device("H100 SXM", H100_BF16_FLOPS, H100_TF32_FLOPS, MATMUL_EFFICIENCY, H100_HBM_BYTES_S,
              H100_MEMORY_BYTES, 2, 2)
H100_FP32 = replace(H100, name="H100 SXM, full float32 fits", flops32=H100_FP32_FLOPS)
H200 = replace(H100, name="H200", bandwidth=H200_HBM_BYTES_S, memory=H200_MEMORY_BYTES)


def cpu_device(flops: float, bandwidth: float, memory: float | None = None) -> Device:
    """This machine at a measured (or stated) single-thread sgemm rate and copy bandwidth, at
    :data:`CPU_EFFICIENCY`; fp32 weights."""
    mem = memory if memory is not None else float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return Device("CPU, 1 thread", flops, flops, CPU_EFFICIENCY, bandwidth, mem, 4, 4, gpu=False)


@dataclass
class Cost:
    """Counted work of a stage; :meth:`seconds` is the formula of the module doc."""

    flops: float = 0.0
    flops32: float = 0.0
    bytes: float = 0.0
    calls: float = 0.0
    pcie: float = 0.0
    disk: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values(), strict=True)))

    def seconds(self, dev: Device) -> float:
        compute = self.flops / (dev.flops * dev.efficiency) + self.flops32 / (dev.flops32 * dev.efficiency)
        return (max(compute, self.bytes / dev.bandwidth) + self.calls * CALL_OVERHEAD_S
                + (self.pcie / PCIE_BYTES_S + self.disk / DISK_BYTES_S if dev.gpu else 0.0))


def layers_pass(shape: Shape, dev: Device, *, windows: float, seq_len: int, layers: float, batch: int,
                backward: str = "none", fp32: bool = False) -> Cost:
    """``layers`` decoder layers over ``windows`` windows in batches of ``batch``; ``backward``: ``none``, ``inputs``
    (frozen weights: one forward more) or ``all`` (trained weights: two more). ``fp32``: on float32 copies."""
    extra = {"none": 0.0, "inputs": 1.0, "all": 2.0}[backward]
    tokens = windows * seq_len * layers
    batches = math.ceil(windows / batch) * layers
    per_token = shape.layer_flops(seq_len) + extra * (2.0 * shape.matmul_params + 4.0 * seq_len * shape.hidden)
    wb, ab = (4, 4) if fp32 else (dev.weight_bytes, dev.act_bytes)
    moved = batches * shape.layer_params * wb * (1 + extra) + tokens * shape.activation_elements * ab * (1 + extra)
    cost = Cost(bytes=moved, calls=batches * (1 + extra))
    if fp32:
        cost.flops32 = tokens * per_token
    else:
        cost.flops = tokens * per_token
    return cost


def head_pass(shape: Shape, dev: Device, *, tokens: float, batches: float, loss: str, backward: bool = False) -> Cost:
    """Final norm and lm_head on ``tokens`` positions, and ``loss``'s passes over their full-vocabulary logits."""
    passes = LOSS_PASSES[loss] + (LOSS_PASSES["tail_backward"] if backward else 0)
    logits = tokens * shape.vocab
    return Cost(flops=tokens * shape.head_flops * (2 if backward else 1),
                bytes=batches * shape.vocab * shape.hidden * dev.weight_bytes * (2 if backward else 1)
                + logits * (dev.act_bytes + 4 * passes))


def capture_cost(shape: Shape, dev: Device, *, windows: int, seq_len: int, prefix: float, batch: int,
                 held_out: int = 0) -> Cost:
    """``capture_gap`` beside a gap after ``prefix`` layers (side ``both``): every fitting window, and the
    ``held_out`` windows the fit is kept or declined on, through the layers up to the one after the gap."""
    return layers_pass(shape, dev, windows=windows + held_out, seq_len=seq_len, layers=prefix + 2, batch=batch)


def fit_cost(shape: Shape, dev: Device, *, windows: int, seq_len: int, steps: int, batch: int,
             held_out: int = 0) -> Cost:
    """``fit_layers`` on two layers (side ``both``), float32: the error before and after on every window and on
    the ``held_out`` windows, ``steps`` steps of ``batch`` windows forward and backward, Adam (p, grad, m, v: 32
    bytes a parameter a step), the copies out and back, and the stream scaled by the folded scale."""
    run = layers_pass(shape, dev, windows=2 * (windows + held_out), seq_len=seq_len, layers=2, batch=batch,
                      fp32=True)
    run += layers_pass(shape, dev, windows=steps * batch, seq_len=seq_len, layers=2, batch=batch, backward="all",
                       fp32=True)
    adam = 2 * shape.layer_params * (steps * 32.0 + 2 * (dev.weight_bytes + 4))
    return run + Cost(bytes=adam + windows * seq_len * shape.hidden * dev.act_bytes * 2)


def teacher_cost(shape: Shape, dev: Device, *, windows: int, seq_len: int, batch: int, topk: int) -> Cost:
    """``teacher_targets``: the dense model over the fitting windows, log-softmax and top-k, the targets to the
    host."""
    return (layers_pass(shape, dev, windows=windows, seq_len=seq_len, layers=shape.layers, batch=batch)
            + head_pass(shape, dev, tokens=windows * seq_len, batches=math.ceil(windows / batch), loss="teacher")
            + Cost(pcie=windows * seq_len * topk * 12.0))


def gains_cost(shape: Shape, dev: Device, *, layers: int, windows: int, seq_len: int, steps: int, batch: int,
               topk: int, eval_windows: int = 16, held_out: int = 0) -> Cost:
    """``refine`` on a model of ``layers`` layers: the audit loss before and after on ``min(eval_windows,
    windows)`` windows, ``steps`` steps of ``batch`` windows through the model and the head, forward and backward
    through frozen weights, with the tail loss; the targets to the device; the next-token NLL with and without the
    gains on the ``held_out`` windows that keep or decline them."""
    e = min(eval_windows, windows)
    audit = (layers_pass(shape, dev, windows=2 * e, seq_len=seq_len, layers=layers, batch=batch)
             + head_pass(shape, dev, tokens=2 * e * seq_len, batches=2 * math.ceil(e / batch), loss="tail"))
    if held_out:
        audit += (layers_pass(shape, dev, windows=2 * held_out, seq_len=seq_len, layers=layers, batch=batch)
                  + head_pass(shape, dev, tokens=2 * held_out * seq_len,
                              batches=2 * math.ceil(held_out / batch), loss="ce"))
    train = (layers_pass(shape, dev, windows=steps * batch, seq_len=seq_len, layers=layers, batch=batch,
                         backward="inputs")
             + head_pass(shape, dev, tokens=steps * batch * seq_len, batches=steps, loss="tail", backward=True))
    return audit + train + Cost(pcie=(2 * e + steps * batch) * seq_len * topk * 12.0)


def cache_bytes(shape: Shape, windows: int, seq_len: int) -> float:
    """``prunecomp.engine.incremental.cache_bytes``: the boundary cache of incremental scoring."""
    return (shape.layers + 1) * windows * seq_len * shape.hidden * 4.0


@dataclass
class Projection:
    """One model, calibration, k and level on one device: the work and seconds per stage."""

    shape: str
    calibration: str
    k: int
    level: str
    device: str
    settings: dict[str, Any]
    scoring: str
    streamed: bool
    gains_fit: bool
    stages: dict[str, Cost] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def level_seconds(self) -> float:
        return sum(v for k, v in self.seconds.items() if k not in ("final check", "evaluation"))

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "calibration": self.calibration, "k": self.k, "level": self.level,
                "device": self.device, "settings": self.settings, "scoring": self.scoring, "streamed": self.streamed,
                "gains_fit_device": self.gains_fit, "level_seconds": self.level_seconds, "seconds": self.seconds,
                "work": {name: asdict(c) for name, c in self.stages.items()}}


def level_config(level: str, k: int, n_windows: int, **overrides: Any) -> Any:
    """The :class:`~prunecomp.config.PruneConfig` a run at ``level`` uses (``prunecomp.levels``), as gpu_smoke
    builds it: the level's settings merged into ``PruneConfig(n_layers=k, metric="bi")``."""
    from prunecomp.config import PruneConfig
    from prunecomp.levels import level_settings

    return PruneConfig.model_validate({"n_layers": k, "metric": "bi"} | level_settings(level, n_windows) | overrides)


def project(shape: Shape, calib: Calibration, config: Any, dev: Device, *, level: str = "custom",
            fit_windows: int | None = None, refine_eval_windows: int = 16, teacher_batch: int | None = None,
            cache_budget: float | None = None) -> Projection:
    """The work and seconds of every stage ``config`` (a PruneConfig) runs, removing ``config.n_layers`` layers of
    ``shape`` on ``calib`` on ``dev``. ``fit_windows``: the fitting windows (default ``config.refine_samples``, else
    the scoring windows); ``cache_budget``: the incremental cache's budget (default: a quarter of the device memory
    the weights leave, as ``prunecomp.engine.scanners.memory_budget``)."""
    from prunecomp.method.guard import DEFAULT_BUDGET

    k, L = int(config.n_layers), shape.layers
    n, T, b = calib.n, calib.seq_len, calib.batch
    m = fit_windows or config.refine_samples or n
    weights = shape.params * dev.weight_bytes
    streamed = dev.gpu and weights > 0.9 * dev.memory
    free = dev.memory - (0 if streamed else weights) if dev.gpu else dev.memory
    budget = cache_budget if cache_budget is not None else free / 4
    incremental = not streamed and config.scoring == "incremental" and cache_bytes(shape, n, T) <= budget
    guarded = config.compensation in ("guarded", "lsq")
    rebuild = config.reconstruct != "none"
    layer_bytes = shape.layer_params * dev.weight_bytes
    st: dict[str, Cost] = {name: Cost() for name in ("scoring", "guard", "capture", "reconstruct", "teacher", "gains",
                                                     "final check", "evaluation")}

    def run(windows: float, layers: float, batch: int, **kw: Any) -> Cost:
        return layers_pass(shape, dev, windows=windows, seq_len=T, layers=layers, batch=batch, **kw)

    gw = DEFAULT_BUDGET.windows(n, T)
    stride = DEFAULT_BUDGET.positions(n, T)
    prev_tail = 0.0
    for i in range(k):
        left = L - i
        tail = RERUN_FRACTION * (left - 1)
        prefix = left - 1 - tail
        if incremental:
            st["scoring"] += run(n, L if i == 0 else prev_tail + (1 if rebuild else 0), b)
        else:
            st["scoring"] += run(n, left, b)
            if streamed:  # the layer-streamed scanner: every layer read again, no head
                st["scoring"] += Cost(disk=left * layer_bytes)
            else:  # scan_layers calls model(...): full-vocabulary logits nobody reads
                st["scoring"] += head_pass(shape, dev, tokens=n * T, batches=math.ceil(n / b), loss="none")
        if guarded:
            st["guard"] += run(GUARD_CANDIDATES * gw, tail, b)
            st["guard"] += head_pass(shape, dev, tokens=GUARD_CANDIDATES * gw * (T - 1) / stride,
                                     batches=GUARD_CANDIDATES * math.ceil(gw / b), loss="ce")
            if not incremental:
                st["guard"] += run(gw, prefix, b)
            if streamed:
                st["guard"] += Cost(disk=(GUARD_ROUNDS * tail + prefix) * layer_bytes)
        if rebuild:
            st["capture"] += capture_cost(shape, dev, windows=m, seq_len=T, prefix=prefix,
                                          batch=config.reconstruct_batch, held_out=calib.held_out)
            st["capture"] += Cost(disk=(prefix + 2) * layer_bytes if streamed else 0.0)
            st["reconstruct"] += fit_cost(shape, dev, windows=m, seq_len=T, steps=config.reconstruct_steps,
                                          batch=config.reconstruct_batch, held_out=calib.held_out)
        prev_tail = tail
    if config.refine != "none":
        st["teacher"] = teacher_cost(shape, dev, windows=m, seq_len=T, batch=teacher_batch or b,
                                     topk=config.refine_topk)
        st["gains"] = gains_cost(shape, dev, layers=L - k, windows=m, seq_len=T, steps=config.refine_steps,
                                 batch=config.refine_batch, topk=config.refine_topk,
                                 eval_windows=refine_eval_windows, held_out=calib.held_out)
    left = L - k
    st["final check"] = run(2 * calib.held_out, left, b) + head_pass(
        shape, dev, tokens=2 * calib.held_out * T, batches=2 * math.ceil(calib.held_out / b), loss="ce")
    ev = calib.eval_tokens / T
    st["evaluation"] = run(ev, L + left, 1) + head_pass(shape, dev, tokens=2 * calib.eval_tokens, batches=2 * ev,
                                                        loss="ce")
    if streamed:
        st["final check"] += Cost(disk=2 * left * layer_bytes)
        st["evaluation"] += Cost(disk=(L + left) * layer_bytes)
    st = {name: c for name, c in st.items() if c.flops or c.flops32 or c.bytes}
    gains_memory = 0.0
    if config.refine != "none":  # the weights, what one step's backward keeps, the step's logits and their copies
        tokens = config.refine_batch * T
        gains_memory = (weights + tokens * (L - k) * shape.activation_elements * dev.act_bytes
                        + tokens * shape.vocab * (dev.act_bytes + 4 * 4))
    gains_fit = config.refine == "none" or (not streamed and gains_memory <= dev.memory)
    settings = {"n": n, "seq_len": T, "batch": b, "fit_windows": m if (rebuild or config.refine != "none") else None,
                "reconstruct_steps": config.reconstruct_steps if rebuild else None,
                "refine_steps": config.refine_steps if config.refine != "none" else None,
                "guard_windows": gw if guarded else None, "guard_stride": stride if guarded else None}
    settings["gains_memory_gb"] = gains_memory / 1e9 if gains_memory else None
    return Projection(shape.name, calib.name, k, level, dev.name, settings,
                      "incremental" if incremental else ("streamed" if streamed else "exact"), streamed, gains_fit,
                      st, {name: c.seconds(dev) for name, c in st.items()})


def project_level(shape: Shape, calib: Calibration, level: str, k: int, dev: Device, **kw: Any) -> Projection:
    """:func:`project` of ``level``'s configuration (see :func:`level_config`)."""
    return project(shape, calib, level_config(level, k, calib.n), dev, level=level, **kw)


COMPRESS_STAGES = ("scoring", "guard", "capture", "reconstruct", "teacher", "gains")
"""What :func:`prunecomp.engine.compress.compress` runs (no final check, no evaluation): what gpu_smoke's level rows
time."""


def measure_cpu(seconds: float = 3.0) -> tuple[float, float]:
    """Single-thread (``torch.get_num_threads()``) sgemm FLOP/s at the 135M and 0.92B layers' shapes, and copy
    bandwidth (read + write bytes/s into a preallocated tensor): the CPU device's ``P`` and ``W``. Each is the best
    of repeated timings (another process on a shared core only slows a timing down); the sgemm rate the median
    over the shapes."""
    import torch

    def best(fn: Any, budget: float) -> float:
        fn()
        fastest, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < budget:
            t = time.perf_counter()
            fn()
            fastest = min(fastest, time.perf_counter() - t)
        return fastest

    rates = []
    for m, kk, n in ((2048, 576, 1536), (2048, 1536, 576), (512, 2048, 5632)):
        a, w = torch.randn(m, kk), torch.randn(kk, n)
        rates.append(2.0 * m * kk * n / best(lambda a=a, w=w: a @ w, seconds / 4))
    x = torch.randn(32 * 2**20)
    y = torch.empty_like(x)
    bandwidth = 2.0 * x.numel() * 4 / best(lambda: y.copy_(x), seconds / 4)
    return sorted(rates)[1], bandwidth


def read_smollm2() -> Shape:
    """SmolLM2-135M's dimensions from the default model's own config (the GGUF's header)."""
    from transformers import AutoConfig

    from prunecomp.models.sources import resolve_source

    src = resolve_source(None)
    c = AutoConfig.from_pretrained(src.local_dir, gguf_file=src.gguf_file)
    return Shape("SmolLM2-135M", c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size,
                 c.num_attention_heads, c.num_key_value_heads, bool(c.tie_word_embeddings))


def _get(doc: Any, *path: Any) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def measured_rows(smol: Shape, cpu: Device) -> list[dict[str, Any]]:
    """The CPU seconds in ``bench/results`` that measured a level's stages on SmolLM2-135M or the 0.92 B model,
    each beside the projection of the same stages with the same settings. Only numbers present in the files."""
    rows: list[dict[str, Any]] = []

    def add(file: str, what: str, measured: list[float], proj: Projection, stages: tuple[str, ...],
            note: str = "") -> None:
        p = sum(proj.seconds.get(s, 0.0) for s in stages)
        rows.append({"file": file, "what": what, "measured_s": measured, "projected_s": p,
                     "stages": list(stages), "ratio": (sum(measured) / len(measured)) / p if p else None,
                     "note": note, "projection": proj.to_dict()})

    path = RESULTS / "guard_cost.json"
    if path.exists():
        doc = json.loads(path.read_text())
        k = int(doc["settings"]["k"])
        for comp, stages in (("guarded", ("scoring", "guard")), ("magnitude", ("scoring",))):
            runs = [r for r in doc["runs"] if r["compensation"] == comp]
            cfg = level_config("fast", k, CPU_PRESET.n, compensation=comp)
            proj = project(smol, CPU_PRESET, cfg, cpu, level="fast")
            add(path.name, f"135M cpu preset k={k} {comp}: prune steps", [r["seconds"]["prune"] for r in runs], proj,
                stages, "runs[].seconds.prune (scoring, guard and folds of 5 steps)")
            if comp == "guarded":
                add(path.name, f"135M cpu preset k={k}: final check", [r["seconds"]["final_check"] for r in runs],
                    proj, ("final check",), "runs[].seconds.final_check")
    for file, level, variant in (("quality_tail64.json", "best", "refine-reconstruct"),
                                 ("quality_balanced_tail64.json", "balanced", "refine-guarded")):
        path = RESULTS / file
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        res = _get(doc, "metrics", "bi", variant, "results")
        m = int(doc["settings"]["refine_samples"])
        for k_text, r in sorted(res.items(), key=lambda kv: int(kv[0])):
            k = int(k_text)
            proj = project_level(smol, QUALITY, level, k, cpu, fit_windows=m)
            pruning = ("scoring", "guard", "capture", "reconstruct") if level == "best" else ("scoring", "guard")
            add(file, f"135M quality protocol k={k} {level}: pruning", [r["prune_seconds"]], proj, pruning,
                f"metrics.bi.{variant}.results.{k}.prune_seconds (cumulative over the k steps)")
            add(file, f"135M quality protocol k={k} {level}: gains", [r["refine"]["seconds"]], proj, ("gains",),
                f"metrics.bi.{variant}.results.{k}.refine.seconds (teacher computed apart)")
    path = RESULTS / "profile_best.json"
    if path.exists():
        doc = json.loads(path.read_text())
        st = doc["settings"]
        if doc["model"] == "smollm2-135m":
            m, T, rb = int(st["fit_windows"]), int(st["seq_len"]), int(st["reconstruct_batch"])
            proj = Projection(smol.name, "profile", 1, "best", cpu.name, st, "-", False, True)
            proj.stages = {
                "teacher": teacher_cost(smol, cpu, windows=m, seq_len=T, batch=int(st["teacher_batch"]),
                                        topk=int(st["refine_topk"])),
                "capture": capture_cost(smol, cpu, windows=m, seq_len=T, prefix=int(doc["layer_removed"]), batch=rb),
                "reconstruct": fit_cost(smol, cpu, windows=m, seq_len=T, steps=int(st["steps_run"]["reconstruct"]),
                                        batch=rb),
                "gains": gains_cost(smol, cpu, layers=smol.layers - 1, windows=m, seq_len=T,
                                    steps=int(st["steps_run"]["refine"]), batch=int(st["refine_batch"]),
                                    topk=int(st["refine_topk"])),
            }
            proj.seconds = {name: c.seconds(cpu) for name, c in proj.stages.items()}
            for stage, context in (("teacher", "teacher"), ("capture", "capture"), ("reconstruct", "reconstruct"),
                                   ("gains", "refine")):
                steps = st["steps_run"].get(context)
                add(path.name, f"135M one removal, {m}x{T}: {context}" + (f" ({steps} steps)" if steps else ""),
                    [sum(doc["phases"][context].values())], proj, (stage,), f"phases.{context}, summed")
    path = RESULTS / "pipeline_scale_reconstruct.json"
    if path.exists():
        doc = json.loads(path.read_text())
        s = doc["settings"]
        calib = Calibration("pipeline_scale", int(s["calib_samples"]), int(s["calib_seq_len"]), int(s["batch"]))
        for row in doc["rows"]:
            if row["row"] != "library reconstructed":
                continue
            cfg = level_config("best", int(s["k"]), calib.n, reconstruct_steps=int(s["refine_steps"]),
                               refine_steps=int(s["refine_steps"]), refine_samples=calib.n,
                               reconstruct_lr=float(s["reconstruct_lr"]))
            proj = project(SYNTHETIC_092B, calib, cfg, cpu, level="best", fit_windows=calib.n)
            add(path.name, f"0.92B k={s['k']} {calib.n}x{calib.seq_len}: reconstruction fits ({s['refine_steps']} "
                "steps)", [sum(x["seconds"] for x in row["reconstructed"])], proj, ("reconstruct",),
                "rows[library reconstructed].reconstructed[].seconds, summed over the 3 fits")
            add(path.name, f"0.92B k={s['k']} {calib.n}x{calib.seq_len}: gains ({s['refine_steps']} steps)",
                [row["fits"][0]["seconds"]], proj, ("gains",), "rows[library reconstructed].fits[0].seconds")
    return rows


def _fmt(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 100:
        return f"{s:.0f} s"
    return f"{s:.1f} s" if s >= 1 else f"{s:.2f} s"


def level_table(projections: list[Projection], columns: list[tuple[str, str, str]], order: list[str]) -> str:
    """Seconds per level per model (in ``order``), calibration and k; ``columns``: ``(title, level, device)``."""
    lines = ["| model | calibration | k | scoring | " + " | ".join(c[0] for c in columns) + " | final check | "
             "evaluation |", "|" + "---|" * 4 + "---:|" * (len(columns) + 2)]
    keys = sorted({(p.shape, p.calibration, p.k) for p in projections},
                  key=lambda t: (order.index(t[0]), t[1], t[2]))
    by = {(p.shape, p.calibration, p.k, p.level, p.device): p for p in projections}
    for shape, calib, k in keys:
        cells = []
        first = None
        for _title, level, device in columns:
            p = by.get((shape, calib, k, level, device))
            if p is None:
                cells.append("-")
                continue
            first = first or p
            cell = _fmt(p.level_seconds)
            if not p.gains_fit:
                cell = f"({cell}, does not fit)"
            elif p.streamed:
                cell += " (streamed)"
            cells.append(cell)
        assert first is not None
        lines.append(f"| {shape} | {calib} | {k} | {first.scoring} | " + " | ".join(cells)
                     + f" | {_fmt(first.seconds['final check'])} | {_fmt(first.seconds['evaluation'])} |")
    return "\n".join(lines)


def stage_table(p: Projection) -> str:
    """One projection's stages: FLOPs, bytes, seconds and share."""
    total = p.level_seconds
    lines = [f"{p.shape}, {p.calibration} calibration, k = {p.k}, {p.level}, {p.device} ({p.scoring} scoring):", "",
             "| stage | TFLOP (model dtype) | TFLOP (fp32) | GB moved | layer calls | seconds | share |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in p.stages.items():
        share = f"{100 * p.seconds[name] / total:.0f}%" if name not in ("final check", "evaluation") else "-"
        lines.append(f"| {name} | {c.flops / 1e12:.1f} | {c.flops32 / 1e12:.1f} | {c.bytes / 1e9:.1f} | "
                     f"{c.calls:.0f} | {_fmt(p.seconds[name])} | {share} |")
    return "\n".join(lines)


def measured_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| file | what | measured | projected (CPU) | measured / projected |", "|---|---|---:|---:|---:|"]
    for r in rows:
        meas = " / ".join(f"{x:.1f}" for x in r["measured_s"])
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        lines.append(f"| {r['file']} | {r['what']} | {meas} s | {r['projected_s']:.1f} s | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-flops", type=float, default=None, help="state the CPU's FLOP/s instead of measuring it")
    ap.add_argument("--cpu-bw", type=float, default=None, help="state the CPU's copy bandwidth (B/s)")
    ap.add_argument("--no-read-config", action="store_true", help="use SmolLM2-135M's dimensions as written here "
                    "instead of reading the default model's config")
    ap.add_argument("--out", default=str(RESULTS / "projection.json"))
    args = ap.parse_args()
    import torch

    t0 = time.perf_counter()
    load_before = list(os.getloadavg())
    config_source = "constants in bench/projection.py"
    smol = SMOLLM2_135M
    if not args.no_read_config:
        try:
            smol = read_smollm2()
            config_source = "the default model's GGUF config (prunecomp.models.sources.resolve_source(None))"
            if smol != SMOLLM2_135M:
                print(f"SmolLM2-135M's config differs from the constants: {smol}", file=sys.stderr)
        except Exception as exc:  # offline without the model: the constants are its config
            print(f"could not read SmolLM2-135M's config ({exc}); using the constants", file=sys.stderr)
    measured = args.cpu_flops is None or args.cpu_bw is None
    flops, bw = measure_cpu() if measured else (args.cpu_flops, args.cpu_bw)
    flops = args.cpu_flops or flops
    bw = args.cpu_bw or bw
    cpu = cpu_device(flops, bw)
    shapes = [smol, SYNTHETIC_092B, LLAMA3_8B, LLAMA3_70B]
    order = [s.name for s in shapes]
    projections: list[Projection] = []
    for shape in shapes:
        for calib in (PAPER, CPU_PRESET):
            for k in KS[shape.name]:
                for level in ("fast", "balanced", "best"):
                    projections.append(project_level(shape, calib, level, k, H100))
                    if shape.params < 2e9:
                        projections.append(project_level(shape, calib, level, k, cpu))
                    if level == "best":
                        projections.append(project_level(shape, calib, level, k, H100_FP32))
    rows = measured_rows(smol, cpu)
    levels = ("fast", "balanced", "best")
    gpu_table = level_table([p for p in projections if p.device in (H100.name, H100_FP32.name)],
                            [(lv, lv, H100.name) for lv in levels]
                            + [("best, full float32 fits", "best", H100_FP32.name)], order)
    cpu_table = level_table([p for p in projections if p.device == cpu.name],
                            [(lv, lv, cpu.name) for lv in levels], order)
    detail = [p for p in projections if p.device == H100.name and p.level == "best" and p.calibration == "paper"
              and (p.shape, p.k) in ((LLAMA3_8B.name, 5), (LLAMA3_70B.name, 20))]
    detail += [p for p in projections if p.device == cpu.name and p.level == "best" and p.calibration == "cpu"
               and (p.shape, p.k) == (smol.name, 5)]
    text = "\n\n".join([
        f"## Projected seconds per level, one {H100.name} (bf16 {H100.flops:.3g} FLOP/s, TF32 fits "
        f"{H100.flops32:.3g}, fp32 {H100_FP32_FLOPS:.3g}, {MATMUL_EFFICIENCY:.0%} of peak; "
        f"HBM {H100.bandwidth:.3g} B/s)",
        gpu_table,
        "best (full float32 fits): the same with the reconstruction's float32 matmuls at the float32 rate "
        "(PyTorch's default; the fits now run in TF32 on CUDA). "
        "(x, does not fit): the bf16 weights exceed the device; the gains cannot stream.",
        f"## Projected seconds per level, this CPU (sgemm {flops:.3g} FLOP/s, copy {bw:.3g} B/s, "
        f"{'measured' if measured else 'stated'}, one thread)",
        cpu_table,
        "## Where best spends its time",
        *[stage_table(p) for p in detail],
        "## Measured on the CPU (bench/results) against the projection of the same stages and settings",
        measured_table(rows),
    ])
    print(text)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    payload = {
        "formula": "seconds = max(F / (P * e) + F32 / (P32 * e), B / W) + calls * c + pcie / W_pcie + disk / W_disk",
        "constants": {"H100_BF16_FLOPS": H100_BF16_FLOPS, "H100_FP32_FLOPS": H100_FP32_FLOPS,
                      "H100_TF32_FLOPS": H100_TF32_FLOPS, "H100_HBM_BYTES_S": H100_HBM_BYTES_S,
                      "H100_MEMORY_BYTES": H100_MEMORY_BYTES, "MATMUL_EFFICIENCY": MATMUL_EFFICIENCY,
                      "PCIE_BYTES_S": PCIE_BYTES_S, "DISK_BYTES_S": DISK_BYTES_S, "CALL_OVERHEAD_S": CALL_OVERHEAD_S,
                      "RERUN_FRACTION": RERUN_FRACTION, "GUARD_CANDIDATES": GUARD_CANDIDATES,
                      "GUARD_ROUNDS": GUARD_ROUNDS, "ACTIVATION_ELEMENTS": ACTIVATION_ELEMENTS,
                      "LOSS_PASSES": LOSS_PASSES, "EVAL_TOKENS": EVAL_TOKENS},
        "cpu": {"flops": flops, "bandwidth": bw, "measured": measured, "threads": torch.get_num_threads(),
                "machine": platform.machine(), "processor": platform.processor()},
        "shapes": {s.name: asdict(s) | {"params": s.params} for s in shapes},
        "smollm2_config_from": config_source,
        "calibrations": {c.name: asdict(c) for c in (PAPER, CPU_PRESET, QUALITY)},
        "ks": KS,
        "projections": [p.to_dict() for p in projections],
        "measured": rows,
        "commit": commit,
        "load_before": load_before,
        "load_after": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "seconds": time.perf_counter() - t0,
        "markdown": text,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
