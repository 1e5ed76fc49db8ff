"""Typed, validated configuration: what to prune, how to calibrate, how to evaluate; and the named presets.

Validated once at the edge (CLI, flow parameters, notebooks) with ``extra="forbid"`` so a typo is an error, not a
silently ignored option.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from prunecomp.errors import PrunecompError

__all__ = ["PRESETS", "STAGES", "CalibrationConfig", "EvalConfig", "Preset", "PruneConfig", "StageSettings",
           "default_preset_name", "flatten_tree", "stage_fields"]


Metric = Literal["bi", "angular", "block", "taylor", "mag", "ppl"]
"""Layer importance metrics (:mod:`prunecomp.method.scoring`)."""

DEFAULT_EXPONENTS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
"""The guard's exponents: ``c = s ** a`` from no compensation (0) through the paper's scale (1) to a little beyond
it (1.25) (:mod:`prunecomp.method.guard`)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


STAGES = ("removal", "scoring", "selection", "compensation", "reconstruct", "refit", "refine", "calibration",
          "evaluation")
"""The method's stages, in the order ``--help`` lists their options."""


def _field(default: Any, stage: str, description: str, *, flag: str | None = None, common: bool = False,
           **constraints: Any) -> Any:
    """A config field with what the CLI is generated from: its one-line description, its stage, the flag's name
    (default: the field's, with dashes) and whether it is a common option (listed first) or an expert one."""
    assert stage in STAGES, stage
    return Field(default, description=description, json_schema_extra={"stage": stage, "common": common,
                                                                      "flag": flag}, **constraints)


class CalibrationConfig(_Frozen):
    """Calibration windows: ``n_samples`` random windows of ``seq_len`` tokens of ``source``, seeded.

    ``held_out`` more windows of the same source, disjoint from those (and from the fitting windows of a run that
    fits), are the final check's (did what the run folded beat plain removal of the same layers? see
    :mod:`prunecomp.engine.final_check`); ``held_out`` more after them decide whether the gains are folded (see
    :func:`prunecomp.method.refine.refine`) and each block reconstruction kept (see
    :func:`prunecomp.method.reconstruct.fit_layers`). 0 skips both."""

    source: str = _field("c4", "calibration", "Calibration text: wikitext2, c4, ptb, tinystories, or a "
                         ".txt/.jsonl/.parquet file.", flag="calib-source")
    n_samples: int = _field(32, "calibration", "Calibration windows.", flag="calib-samples", gt=0)
    seq_len: int = _field(512, "calibration", "Tokens per calibration window.", flag="calib-seq-len", ge=2)
    seed: int = _field(0, "calibration", "Seed of the calibration sampling.", flag="seed")
    batch_size: int = _field(4, "calibration", "Calibration batch size.", flag="batch-size", gt=0)
    held_out: int = _field(8, "calibration", "Held-out windows of the final check, and as many more on which the "
                           "gains and block reconstruction are kept or declined (0 skips both).",
                           flag="calib-held-out", ge=0)


class EvalConfig(_Frozen):
    """Perplexity evaluation: contiguous windows of ``seq_len``; ``max_windows=None`` means the whole split."""

    datasets: tuple[str, ...] = _field(("wikitext2", "c4", "ptb"), "evaluation", "Perplexity before/after on these "
                                       "corpora (comma-separated; empty to skip).", flag="eval-datasets")
    seq_len: int = _field(2048, "evaluation", "Perplexity window length.", flag="eval-seq-len", ge=2)
    max_windows: int | None = _field(None, "evaluation", "Perplexity windows per corpus (default: all).",
                                     flag="eval-max-windows", gt=0)
    batch_size: int = _field(1, "evaluation", "Perplexity batch size.", flag="eval-batch-size", gt=0)


class PruneConfig(_Frozen):
    """What to remove and how: every field says, in its description, what it does; fields are grouped by the
    method's stages (``json_schema_extra["stage"]``), which is how ``--help`` lists them
    (:mod:`prunecomp.cli.options` generates the options from these fields).

    The stages: which layers go (``n_layers`` / ``fraction``, ``protect``: ORIGINAL indices, negative from the
    end) and how they are scored (``metric``, ``mode``, ``scoring``: see :mod:`prunecomp.engine.incremental`); which one
    goes (``selection``: :mod:`prunecomp.method.selection`); what is folded at each gap (``compensation``: ``guarded``
    measures ``s ** a`` for the ``guard_exponents`` and folds the best, :mod:`prunecomp.method.guard`; ``magnitude`` is
    the paper bit for bit; ``lsq`` adds a gap map, :mod:`prunecomp.method.fitting`); block reconstruction after every
    removal (:mod:`prunecomp.method.reconstruct`); the sequential refit after the last (:mod:`prunecomp.method.refit`);
    the per-channel gains (:mod:`prunecomp.method.refine`; wired by the caller:
    :func:`prunecomp.engine.compress.compress`, the CLI, the pipeline's refine task). Everything fitted is folded: zero
    run-time cost. ``reconstruct`` and ``refit`` are not combined with ``lsq`` (a gap map changes the stream they fit),
    nor ``refit`` with ``refine_at="each"``.
    """

    metric: Metric = _field("bi", "scoring", "Layer importance: bi (Block Influence, 1 - cos), angular, block "
                            "(contiguous-block cosine), taylor (Taylor+), mag (Mag+), ppl (perplexity with the layer "
                            "skipped).")
    n_layers: int | None = _field(None, "removal", "Decoder layers to remove.", flag="layers", common=True, gt=0)
    fraction: float | None = _field(None, "removal", "Or: the fraction of the layers to remove (0-1).",
                                    common=True, gt=0.0, lt=1.0)
    mode: Literal["iterative", "one-shot"] = _field("iterative", "scoring", "iterative re-scores after every "
                                                    "removal (the paper); one-shot scores once.")
    compensation: Literal["guarded", "magnitude", "none", "lsq"] = _field(
        "guarded", "compensation", "guarded folds the paper's gap scale s only as far as it lowers the calibration "
        "loss (s**a, best a of --guard-exponents); magnitude is the paper's method exactly; none is naive removal; "
        "lsq adds a least-squares gap map folded into the last writer before the gap, kept only when it helps.")
    guard_exponents: tuple[float, ...] = _field(DEFAULT_EXPONENTS, "compensation", "Exponents a of the guard's "
                                                "candidates s**a (comma-separated; must include 0 and 1).")
    protect: tuple[int, ...] | None = _field(None, "removal", "Original layer indices never removed, e.g. 0,-1 "
                                             "(default: the last layer; Taylor+/Mag+ also the first four and "
                                             "second-to-last).")
    lsq_ridge: float = _field(1e-3, "compensation", "Ridge of the lsq gap map's normal equations.", ge=0.0)
    selection: Literal["score", "loss"] = _field("score", "selection", "score removes the lowest-scoring layer; "
                                                 "loss tries the --selection-pool lowest-scoring layers with "
                                                 "compensation and removes the one costing the least calibration "
                                                 "loss.")
    selection_pool: int = _field(4, "selection", "Candidates tried per step with --selection loss.", ge=1)
    scoring: Literal["incremental", "exact"] = _field("incremental", "scoring", "incremental re-runs only the "
                                                      "layers after each gap from cached activations (same "
                                                      "choices); exact recomputes the whole model every step.")
    refine: Literal["none", "norms", "norms+writers", "channels"] = _field(
        "none", "refine", "Per-channel gains distilled from the dense model's predictions and folded: into the "
        "norms, also the residual writers, or every linear (channels); none fits nothing.")
    refine_steps: int = _field(80, "refine", "Adam steps of each gains fit.", ge=1)
    refine_lr: float = _field(3e-3, "refine", "Learning rate of the gains.", gt=0.0)
    refine_batch: int = _field(2, "refine", "Windows per gains step.", ge=1)
    refine_topk: int = _field(256, "refine", "Teacher tokens kept per position.", ge=1)
    refine_loss: Literal["tail", "topk"] = _field("tail", "refine", "tail: KL to the dense model over its top "
                                                  "tokens plus one bucket for the rest; topk: renormalised over the "
                                                  "top tokens (it makes the student overconfident).")
    refine_samples: int | None = _field(None, "refine", "Windows the fits (gains, reconstruction, refit) use: same "
                                        "source, seed and length, a superset of the scoring windows (default: the "
                                        "scoring windows).", gt=0)
    refine_at: Literal["end", "each"] = _field("end", "refine", "end fits the gains once, after the last removal; "
                                               "each fits after every removal and re-scores the refined model "
                                               "(iterative mode).")
    reconstruct: Literal["none", "before", "after", "both"] = _field(
        "none", "reconstruct", "Block reconstruction after every removal: fine-tune the layer before the gap, "
        "after it, or both, to write the stream the model had there before the removal.")
    reconstruct_steps: int = _field(200, "reconstruct", "Adam steps of each reconstruction fit.", ge=1)
    reconstruct_lr: float = _field(1e-3, "reconstruct", "Learning rate of the reconstruction.", gt=0.0)
    reconstruct_batch: int = _field(4, "reconstruct", "Windows per step of the reconstruction and the refit.", ge=1)
    refit: Literal["none", "sequential"] = _field("none", "refit", "sequential: after the last removal, refit every "
                                                  "layer from the first gap on, in order, to the dense model's "
                                                  "stream (dense layers read one at a time).")
    refit_steps: int = _field(50, "refit", "Adam steps per layer of the refit.", ge=1)
    refit_lr: float = _field(1e-3, "refit", "Learning rate of the refit.", gt=0.0)

    @model_validator(mode="before")
    @classmethod
    def _nested(cls, data: Any) -> Any:
        """Accept the tree (``{"reconstruct": {"method": "both", "steps": 100}, ...}``) as well as flat fields."""
        return flatten_tree(data) if isinstance(data, dict) else data

    def stage(self, name: str) -> StageSettings:
        """The typed settings of stage ``name`` (its fields by their short names: see :func:`stage_fields`), what
        that stage's component is built from."""
        model = _stage_model(name)
        return model.model_validate({short: getattr(self, f) for short, f in stage_fields(name).items()})

    def tree(self) -> dict[str, dict[str, Any]]:
        """The configuration as the tree users read and write: stage -> its settings (JSON-able)."""
        return {s: self.stage(s).model_dump(mode="json") for s in STAGES if stage_fields(s)}

    @model_validator(mode="after")
    def _count(self) -> PruneConfig:
        if self.n_layers is not None and self.fraction is not None:
            raise ValueError("give n_layers or fraction, not both")
        if 0.0 not in self.guard_exponents or 1.0 not in self.guard_exponents:
            raise ValueError("guard_exponents must include 0 (no compensation) and 1 (the paper's scale)")
        if any(not -4.0 <= a <= 4.0 for a in self.guard_exponents):
            raise ValueError("guard_exponents must lie in [-4, 4]")
        if self.refine_at == "each" and self.refine != "none" and self.mode != "iterative":
            raise ValueError("refine_at='each' re-scores the refined model after every removal: it needs "
                             "mode='iterative'")
        if self.reconstruct != "none" and self.compensation == "lsq":
            raise ValueError("reconstruct fits the layers beside the gap to the stream before the removal, which an "
                             "lsq gap map changes: use compensation 'guarded', 'magnitude' or 'none' with it")
        if self.refit != "none" and self.compensation == "lsq":
            raise ValueError("refit is not supported with lsq gap maps yet: use compensation 'guarded', 'magnitude' "
                             "or 'none' with it")
        if self.refit != "none" and self.refine != "none" and self.refine_at == "each":
            raise ValueError("refit runs after the last removal, where progressive refinement (refine_at='each') "
                             "fits too: use refine_at='end' with it")
        return self

    @property
    def guarded(self) -> bool:
        """Whether the scale folded at each step is chosen by the guard (``guarded`` and ``lsq``)."""
        return self.compensation in ("guarded", "lsq")

    @property
    def fits(self) -> bool:
        """Whether the run fits anything on windows (the gains, block reconstruction, the refit)."""
        return self.refine != "none" or self.reconstruct != "none" or self.refit != "none"

    @property
    def decides_held_out(self) -> bool:
        """Whether a stage is kept or declined on held-out windows: the gains and block reconstruction (the
        refit decides per layer on its fitting windows)."""
        return self.refine != "none" or self.reconstruct != "none"

    def fit_samples(self, calibration_samples: int) -> int:
        """How many windows of the calibration draw the run fits or scores on: ``refine_samples`` when it fits
        anything on a larger superset, else the scoring windows. Held-out windows avoid all of them."""
        if self.fits and self.refine_samples is not None:
            return max(calibration_samples, self.refine_samples)
        return calibration_samples

    @property
    def compensates(self) -> bool:
        """Whether any scale is folded (everything but ``none``)."""
        return self.compensation != "none"

    def layers_to_remove(self, source_num_layers: int) -> int:
        """How many layers go from a model that had ``source_num_layers`` originally."""
        k = self.n_layers if self.n_layers is not None else round((self.fraction or 0.0) * source_num_layers)
        if self.n_layers is None and self.fraction is None:
            raise PrunecompError("say how many layers to remove: n_layers (--layers) or fraction (--fraction)")
        if not 0 < k < source_num_layers:
            raise PrunecompError(
                f"layers to remove must be between 1 and {source_num_layers - 1} for a model with "
                f"{source_num_layers} decoder layers, got {k}"
            )
        return k

    def protected(self, source_num_layers: int) -> set[int]:
        """Original indices that may never be removed."""
        n = source_num_layers
        spec = self.protect
        if spec is None:
            spec = (0, 1, 2, 3, -2, -1) if self.metric in ("taylor", "mag") else (-1,)
        out = set()
        for i in spec:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise PrunecompError(f"protected layer {i} is out of range for a model with {n} layers")
            out.add(j)
        return out


StageSettings = BaseModel
"""The type of one stage's settings (:meth:`PruneConfig.stage`): a frozen model generated from the stage's fields."""


def _short(stage: str, field: str) -> str:
    """A field's name within its stage: the stage's switch is ``method``, a ``<stage>_`` prefix is dropped."""
    return "method" if field == stage else field.removeprefix(stage + "_")


def flatten_tree(data: dict[str, Any]) -> dict[str, Any]:
    """The flat :class:`PruneConfig` fields of a configuration given as a tree (stage -> settings, as
    :meth:`PruneConfig.tree` writes it), flat, or mixed: a stage's section is a mapping, a flat field its value.
    Unknown settings of a stage, and a field given both ways, are errors."""
    if not any(isinstance(data.get(s), dict) for s in STAGES):
        return data
    flat = {k: v for k, v in data.items() if not (k in STAGES and isinstance(v, dict))}
    for stage, section in data.items():
        if stage not in STAGES or not isinstance(section, dict):
            continue
        names = stage_fields(stage)
        unknown = sorted(set(section) - set(names))
        if unknown:
            raise ValueError(f"{stage}: unknown setting(s) {', '.join(unknown)} (it has {', '.join(names)})")
        for short, value in section.items():
            if names[short] in flat:
                raise ValueError(f"{names[short]} is given twice: flat and in {stage}")
            flat[names[short]] = value
    return flat


@cache
def stage_fields(stage: str) -> dict[str, str]:
    """Short name -> :class:`PruneConfig` field, for the fields of ``stage`` (in declaration order)."""
    return {_short(stage, name): name for name, f in PruneConfig.model_fields.items()
            if (f.json_schema_extra or {}).get("stage") == stage}  # type: ignore[union-attr]


@cache
def _stage_model(stage: str) -> type[BaseModel]:
    fields: dict[str, Any] = {short: (PruneConfig.model_fields[name].annotation, PruneConfig.model_fields[name])
                              for short, name in stage_fields(stage).items()}
    return create_model(f"{stage.capitalize()}Settings", __config__=ConfigDict(extra="forbid", frozen=True),
                        **fields)


class Preset(_Frozen):
    """A named pair of calibration and evaluation settings."""

    calibration: CalibrationConfig
    evaluation: EvalConfig
    why: str


PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        calibration=CalibrationConfig(n_samples=32, seq_len=256, batch_size=8),
        evaluation=EvalConfig(seq_len=512, max_windows=20, batch_size=4),
        why="fits a 2-core CPU (about 1 s per 512-token forward of a 135M model): the main job prunes 5 layers of "
        "SmolLM2-135M in a few minutes; perplexity on the first 20 x 512 tokens of each corpus",
    ),
    "paper": Preset(
        calibration=CalibrationConfig(n_samples=128, seq_len=2048, batch_size=1),
        evaluation=EvalConfig(seq_len=2048, max_windows=None),
        why="the paper's protocol: 128 x 2048 calibration tokens, full test splits in 2048-token windows",
    ),
}


def default_preset_name() -> str:
    """``paper`` on a GPU, ``cpu`` otherwise."""
    return "paper" if torch.cuda.is_available() else "cpu"
