"""Layer-streamed Prune&Comp for models larger than memory: one decoder layer in memory at a time.

The model is a skeleton whose decoder layers live on the ``meta`` device (no storage); the token embedding,
final norm, output head and rotary tables are real. Each pass captures the stream entering layer 0 with the
catch forward of :mod:`prunecomp.models.sequential`, then reads every kept layer from the safetensors files,
runs it over all calibration batches, folds in its pending compensation scale, and frees it again. Peak memory:
one layer + two boundaries of calibration activations + embedding/head (the guard of guarded compensation runs
as many of its (scale, batch) items per pass over the layers after the gap as half the memory budget holds).

Compensation is bookkeeping until the model is written: removing layer ``l`` with scale ``s`` multiplies the
in-memory embedding (and, when tied, divides the final norm) right away and records ``s`` as a pending factor
of every kept layer upstream of the gap, applied whenever that layer is loaded, for a pass or for the output.
The output is a plain sharded safetensors HF folder (one shard per layer) written atomically.

Block reconstruction (``config.reconstruct``) runs here too: the gap's streams are read in a layer-by-layer pass,
the two layers beside the gap are loaded for the fit (:func:`prunecomp.method.reconstruct.reconstruct_layers`, the
in-memory fit), and a kept fit goes to a file of the spill folder (:meth:`StreamedModel.keep_layer`), which
:meth:`StreamedModel.load_layer` reads instead of the source from then on. The step's record of those weights is
lazy (:class:`~prunecomp.models.tensorfiles.LazyTensors`), so a long run holds none of them in memory.

Scoring here is exact (every step re-runs every kept layer): the incremental cache of
:mod:`prunecomp.engine.incremental` holds every boundary, which is exactly what a model too large for memory cannot.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunecomp.engine.backends import STREAMED
from prunecomp.engine.scanners import memory_budget
from prunecomp.errors import PrunecompError
from prunecomp.method import metrics as M
from prunecomp.method.compensation import compensate, is_tied, scale_layer_writers
from prunecomp.method.guard import DEFAULT_BUDGET, GuardBudget, GuardResult, guard_tail
from prunecomp.method.scoring import LayerScan
from prunecomp.models.adapters import decoder_layers, get_adapter, resolve
from prunecomp.models.pruning import original_indices, remove_layer
from prunecomp.models.sequential import catch_layer_inputs, head_nll, run_layer
from prunecomp.models.storage import write_dir
from prunecomp.models.tensorfiles import LazyTensors, Renamed, SafetensorsWeights
from prunecomp.recipes.recipe import Recipe, write_recipe_files

__all__ = ["STREAMED_METRICS", "SafetensorsWeights", "StreamedModel"]

STREAMED_METRICS: frozenset[str] = STREAMED.metrics or frozenset()  # declared in prunecomp.engine.backends


class StreamedModel:
    """A causal LM whose decoder layers stay on disk until used; see the module docstring."""

    def __init__(self, folder: str | Path, *, dtype: torch.dtype | None = None, device: str | None = None,
                 spill_dir: str | Path | None = None) -> None:
        """``device``: CUDA when available, else CPU; ``dtype``: bf16 on CUDA, fp32 on CPU (statistics are fp32).
        ``spill_dir``: where the weights of fitted layers (block reconstruction) are kept, one file per fit (default:
        a temporary folder, removed with this object)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise PrunecompError(f"layer streaming needs a local HF folder with config.json, got {folder!r}")
        self.weights = SafetensorsWeights(self.folder)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        config = AutoConfig.from_pretrained(self.folder)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self.model.eval()
        self.adapter = get_adapter(self.model)
        self._materialize_shell()
        self.source_layers = len(decoder_layers(self.model, self.adapter))
        self.pending = [1.0] * self.source_layers  # compensation factor per ORIGINAL layer, applied on load
        self.layer_loads = 0
        # ORIGINAL layer -> the file holding its weights since a fit (see keep_layer); read instead of the source
        self.overrides: dict[int, Path] = {}
        self._spill_root = Path(spill_dir) if spill_dir is not None else None
        self._spill_tmp: tempfile.TemporaryDirectory[str] | None = None

    def _materialize_shell(self) -> None:
        """Load everything but the decoder layers for real."""
        layers_path = self.adapter.layers
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        for name, module in self.model.named_modules():
            if name == layers_path or name.startswith(layers_path + ".") or name == "":
                continue
            own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
            if not own or not any(t.is_meta for t in own.values()):
                continue
            module.to_empty(device=self.device, recurse=False)
            # HF's own initializer recomputes what checkpoints do not hold (rotary tables, Gemma's embed scale);
            # the parameters it randomizes are overwritten from the checkpoint next.
            self.model._init_weights(module)
            for pname, tensor in module.named_parameters(recurse=False):
                key = f"{name}.{pname}"
                if key not in self.weights:
                    if tied and name == self.adapter.lm_head:
                        continue
                    raise PrunecompError(f"checkpoint in {self.folder} has no tensor {key!r}")
                with torch.no_grad():
                    tensor.copy_(self.weights.get(key).to(tensor.dtype))
        if tied:
            resolve(self.model, self.adapter.lm_head).weight = resolve(self.model, self.adapter.embed).weight

    def load_layer(self, current: int) -> nn.Module:
        """Current layer ``current`` materialized with its pending compensation folded in (caller frees it)."""
        layer = decoder_layers(self.model, self.adapter)[current]
        orig = original_indices(self.model)[current]
        if orig in self.overrides:
            from safetensors.torch import load_file

            state = load_file(str(self.overrides[orig]))
        else:
            state = self.weights.with_prefix(f"{self.adapter.layers}.{orig}.")
        layer.to_empty(device=self.device)
        missing, unexpected = layer.load_state_dict({k: v.to(self.dtype) for k, v in state.items()}, strict=False)
        if missing or unexpected:
            raise PrunecompError(f"layer {orig} in {self.folder}: missing {missing}, unexpected {unexpected}")
        if self.pending[orig] != 1.0:
            with torch.no_grad():
                scale_layer_writers(layer, self.pending[orig], self.adapter)
        self.layer_loads += 1
        return layer

    @staticmethod
    def free(layer: nn.Module) -> None:
        layer.to("meta")

    @contextmanager
    def sourced(self, layers: Mapping[int, int]) -> Iterator[None]:
        """Inside the block the layers ``layers`` names (current index -> ORIGINAL index) load the source's weights
        with nothing folded: the final check's view of the plain layer-removed model, for reconstructed layers
        (:data:`prunecomp.engine.final_check.Sourced`)."""
        saved = {o: (self.overrides.pop(o, None), self.pending[o]) for o in layers.values()}
        try:
            for o in saved:
                self.pending[o] = 1.0
            yield
        finally:
            for o, (path, factor) in saved.items():
                if path is not None:
                    self.overrides[o] = path
                self.pending[o] = factor

    def _spill(self) -> Path:
        if self._spill_root is not None:
            self._spill_root.mkdir(parents=True, exist_ok=True)
            return self._spill_root
        if self._spill_tmp is None:
            self._spill_tmp = tempfile.TemporaryDirectory(prefix="prunecomp-layers-")
        return Path(self._spill_tmp.name)

    def keep_layer(self, current: int, layer: nn.Module, *, tag: str) -> Mapping[str, Tensor]:
        """Make ``layer``'s weights (current layer ``current``, loaded with :meth:`load_layer` and then changed in
        place, e.g. by a local fit) the layer's weights from now on. They go to a new file of the spill folder
        (``tag`` names it: one file per fit, never overwritten, so earlier fits stay readable), not to memory;
        the layer's pending compensation is in them, so its pending factor restarts at 1. Returns the weights by
        their name in the model (current index), parameters only (as the in-memory loop records them), read lazily
        from that file: the record a recipe keeps. It keeps the spill folder alive as long as it is referenced."""
        from safetensors.torch import save_file

        orig = original_indices(self.model)[current]
        path = self._spill() / f"{tag}-layer{orig}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}, str(path),
                  metadata={"format": "pt"})
        self.overrides[orig] = path
        self.pending[orig] = 1.0
        prefix = f"{self.adapter.layers}.{current}."
        lazy = LazyTensors(path, keep=self._spill_tmp)
        return Renamed(lazy, {prefix + name: name for name, _ in layer.named_parameters()})

    @torch.no_grad()
    def scan(self, ids: Tensor, metric: str, *, batch_size: int,
             on_layer: Callable[[int], None] | None = None) -> LayerScan:
        """BI / angular scores and gap scales of every current layer: one layer-by-layer pass."""
        if metric not in STREAMED_METRICS:
            raise PrunecompError(f"layer streaming supports metrics {sorted(STREAMED_METRICS)}, got {metric!r}")
        caught = catch_layer_inputs(self.model, ids, batch_size)
        xs = caught.hidden
        scores, scales = [], []
        for j in range(len(decoder_layers(self.model, self.adapter))):
            layer = self.load_layer(j)
            out = run_layer(layer, xs, [kw[j] for kw in caught.kwargs])
            self.free(layer)
            stats: M.LayerStats | None = None
            for x_in, x_out in zip(xs, out, strict=True):
                stats = M.accumulate_layer(stats, x_in, x_out, (metric,))
            assert stats is not None
            scores.append(M.layer_score(stats, metric))
            scales.append(M.layer_scale(stats))
            xs = out
            if on_layer is not None:
                on_layer(j)
        return LayerScan(scores=scores, scales=scales, layer_forwards=len(scores) * ids.shape[0])

    @torch.no_grad()
    def perplexity(self, ids: Tensor, *, batch_size: int) -> float:
        """Perplexity of the current (pruned, compensated) model on windows ``ids``, one layer at a time."""
        return math.exp(self.mean_nll(ids, batch_size=batch_size))

    def mean_nll(self, ids: Tensor, *, batch_size: int) -> float:
        """Mean next-token NLL of the current model on windows ``ids``, one layer at a time (what the final check
        compares; the in-memory model's counterpart is :func:`prunecomp.evaluation.perplexity.mean_nll`)."""
        caught = catch_layer_inputs(self.model, ids, batch_size)
        xs = caught.hidden
        for j in range(len(decoder_layers(self.model, self.adapter))):
            layer = self.load_layer(j)
            xs = run_layer(layer, xs, [kw[j] for kw in caught.kwargs])
            self.free(layer)
        total, count = 0.0, 0
        for b, x in enumerate(xs):
            nll, n = head_nll(self.model, x, ids[b * batch_size : (b + 1) * batch_size], self.adapter)
            total, count = total + nll, count + n
        return total / count

    @torch.no_grad()
    def guard(self, ids: Tensor, current: int, s: float, exponents: Sequence[float], *, batch_size: int,
              memory_bytes: int | None = None, budget: GuardBudget = DEFAULT_BUDGET) -> GuardResult:
        """The guard for removing current layer ``current``, on the windows the in-memory guard measures
        (``budget``; the same search, :func:`~prunecomp.method.guard.guard_tail`): one pass through the layers before
        the gap for just those windows, then per round of the search the layers after it, as many (scale, batch)
        items per pass over the tail as fit ``memory_bytes`` (default: half of
        :func:`~prunecomp.engine.scanners.memory_budget`)."""
        n = budget.windows(ids.shape[0], ids.shape[1])
        sub = ids[:n]
        caught = catch_layer_inputs(self.model, sub, batch_size)
        xs = caught.hidden
        for j in range(current):
            layer = self.load_layer(j)
            xs = run_layer(layer, xs, [kw[j] for kw in caught.kwargs])
            self.free(layer)
        per_item = max(x.numel() * x.element_size() for x in xs) * 2  # the item and its layer output
        room = max(1, (memory_bytes if memory_bytes is not None else memory_budget(self.device) // 2)
                   // max(per_item, 1))
        batches = [sub[i : i + batch_size] for i in range(0, n, batch_size)]
        return guard_tail(s, exponents, self.load_layer, current + 1, len(decoder_layers(self.model, self.adapter)),
                          xs, caught.kwargs, batches,
                          lambda x, b, k: head_nll(self.model, x, b, self.adapter, stride=k),
                          budget=budget, of_windows=ids.shape[0], group=lambda _k: room, release=self.free)

    def remove(self, current: int, s: float) -> None:
        """Drop current layer ``current`` and fold ``s`` upstream (embedding now, writers when loaded)."""
        orig = original_indices(self.model)
        remove_layer(self.model, current)  # list + config bookkeeping; works on meta layers
        if s != 1.0:
            compensate(self.model, current, s, self.adapter)  # real embedding / final norm; meta layers: no-op
            for o in orig[:current]:
                self.pending[o] *= s

    def apply(self, recipe: Recipe) -> None:
        """Replay ``recipe``'s removals and magnitude folds (pending, like :meth:`remove`) on this model."""
        from prunecomp.recipes.apply import check_applicable

        if recipe.refine is not None or recipe.progressive or any(s.gap_map is not None for s in recipe.steps):
            raise PrunecompError("layer streaming replays removals, magnitude scales and reconstructed layers only; "
                                 "this recipe also folds lsq maps or refinement gains: apply it without "
                                 "--stream-layers")
        done = self.source_layers - len(decoder_layers(self.model, self.adapter))
        check_applicable(recipe, architecture=type(self.model).__name__, num_layers=self.source_layers,
                         kept=original_indices(self.model), start=done)
        for i, s in enumerate(recipe.steps[done:], start=done):
            if original_indices(self.model)[s.current] != s.removed:
                raise PrunecompError(f"recipe step {i}: layer {s.removed} is not at index {s.current} of the model")
            self.remove(s.current, 1.0 if s.scale is None else s.scale)
            if s.layers is not None:
                self._set_layers(s.layers, tag=f"recipe{i}")

    def _set_layers(self, weights: Mapping[str, Tensor], *, tag: str) -> None:
        """A recipe step's layer record (parameters by name in the model then, as
        :func:`prunecomp.recipes.apply.apply_layers` sets them in memory), one layer at a time into the spill folder."""
        from prunecomp.recipes.apply import apply_layers

        prefix = self.adapter.layers + "."
        by_layer: dict[int, list[str]] = {}
        for name in weights:
            j, dot, _rest = name.removeprefix(prefix).partition(".")
            if not name.startswith(prefix) or not dot or not j.isdigit():
                raise PrunecompError(f"recipe reconstruction names parameter {name!r}, which is not in a decoder "
                                     "layer: a layer-streamed model sets whole decoder layers only")
            by_layer.setdefault(int(j), []).append(name)
        n = len(decoder_layers(self.model, self.adapter))
        for j, names in sorted(by_layer.items()):
            if j >= n:
                raise PrunecompError(f"recipe reconstruction names layer {j}; the model has {n} at that step")
            layer = self.load_layer(j)
            try:
                with torch.no_grad():
                    own = {name.removeprefix(f"{prefix}{j}."): name for name in names}
                    apply_layers(layer, Renamed(weights, own))
                self.keep_layer(j, layer, tag=tag)
            finally:
                self.free(layer)

    def save(self, uri: str, *, tokenizer: Any = None, report: dict[str, Any] | None = None,
             recipe: Recipe | None = None, overwrite: bool = False, owned: bool = False,
             extra: Callable[[Path], None] | None = None) -> str:
        """Write the pruned, compensated model as sharded safetensors (one shard per layer), atomically;
        ``extra(folder)`` adds more files to the same atomic folder; ``overwrite`` / ``owned`` as for
        :func:`prunecomp.models.storage.write_dir`."""
        from safetensors.torch import save_file

        def fill(tmp: Path) -> None:
            n = len(decoder_layers(self.model, self.adapter))
            names = [f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors" for i in range(n + 1)]
            weight_map: dict[str, str] = {}
            total = 0
            shell = {k: v for k, v in self.model.state_dict().items()
                     if not k.startswith(self.adapter.layers + ".") and not v.is_meta}
            if is_tied(self.model, self.adapter):
                shell.pop(f"{self.adapter.lm_head}.weight", None)
            for j in range(n):
                layer = self.load_layer(j)
                state = {f"{self.adapter.layers}.{j}.{k}": v.detach().cpu().contiguous()
                         for k, v in layer.state_dict().items()}
                self.free(layer)
                save_file(state, str(tmp / names[j + 1]), metadata={"format": "pt"})
                for k, v in state.items():
                    weight_map[k] = names[j + 1]
                    total += v.numel() * v.element_size()
                del state
            save_file({k: v.detach().cpu().contiguous() for k, v in shell.items()}, str(tmp / names[0]),
                      metadata={"format": "pt"})
            for k, v in shell.items():
                weight_map[k] = names[0]
                total += v.numel() * v.element_size()
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
            config = copy.deepcopy(self.model.config)
            config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if report is not None:
                (tmp / "prunecomp_report.json").write_text(json.dumps(report, indent=2, default=str))
            if recipe is not None:
                write_recipe_files(recipe, tmp)
            if extra is not None:
                extra(tmp)

        return write_dir(uri, fill, overwrite=overwrite, owned=owned)
