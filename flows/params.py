"""Flow parameters as pydantic models: Prefect turns them into the deployment's enforced schema, and the CLI and
config files validate through the same classes, so a bad parameter fails before any work starts.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prunecomp.config import PRESETS, CalibrationConfig, EvalConfig, PruneConfig
from prunecomp.levels import DEFAULT_LEVEL, Level, resolve
from tasks.evaluate import QA_MODULE, qa_available
from tasks.gates import DEFAULT_GATES, MetricGate
from tasks.keys import stable_hash

__all__ = ["CompressConfig", "EvaluateConfig", "PromoteConfig", "TrackingConfig"]

_NAME = r"^[a-z0-9][a-z0-9._-]*$"


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrackingConfig(_Params):
    """Where things go. ``None`` everywhere = the embedded defaults of :mod:`tasks.settings`."""

    store: str | None = Field(None, description="Checkpoints/caches: local path or s3:// URL ($PRUNECOMP_STORE)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI ($MLFLOW_TRACKING_URI; default sqlite)")
    experiment: str = "prunecomp"
    registered_model: str | None = Field(None, pattern=_NAME, description="default: prunecomp-<model>-adhoc (the "
                                         "deployments name theirs; see CompressConfig.model_name)")
    log_and_register: bool = Field(True, description="log the run to MLflow and register the model version")


class CompressConfig(_Params):
    """Everything the ``compress`` flow needs. Defaults: SmolLM2-135M, 5 layers, BI, quality ``fast`` (guarded
    compensation), ``cpu`` preset.

    ``quality`` picks the stages and their settings (:mod:`prunecomp.levels`); the fields given under ``prune``
    override it, and what they changed is kept in ``quality_overridden`` (in the run's report and MLflow params)."""

    model: str | None = Field(None, description="hub id, local folder, .gguf, s3:// URL; default SmolLM2-135M")
    revision: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    quality: Level = Field(DEFAULT_LEVEL, description="fast | balanced | best: the stages and their settings "
                           "(prunecomp.levels); fields given under prune override it")
    quality_overridden: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="filled in: the prune fields given against the level, {field: {level, "
        "given}}")
    prune: PruneConfig = PruneConfig(n_layers=5)
    calibration: CalibrationConfig = PRESETS["cpu"].calibration
    quick_eval: EvalConfig | None = Field(
        EvalConfig(datasets=("wikitext2",), seq_len=512, max_windows=8),
        description="cheap perplexity after every step (the quality floor watches it); null to skip")
    evaluation: EvalConfig = PRESETS["cpu"].evaluation
    qa_tasks: tuple[str, ...] = Field((), description=f"lm-eval tasks for the final evaluation (needs {QA_MODULE})")
    qa_limit: int | None = Field(None, gt=0)
    max_ppl_ratio: float | None = Field(None, gt=1.0, description="quality floor: stop when the quick perplexity "
                                        "exceeds this multiple of the dense one (that step is not kept)")
    data_dir: str | None = None
    run_name: str | None = Field(None, pattern=_NAME, description="default: derived from the parameters")
    tracking: TrackingConfig = TrackingConfig()
    stream_layers: bool | None = Field(None, description="score, compensate and write one decoder layer at a time "
                                       "(models larger than memory); null: automatically when the weights do not "
                                       "fit the memory budget")
    parallel_candidates: int = Field(1, ge=1, description="split a per-candidate metric's scoring (PPL-on-skip) "
                                     "into this many tasks, run by the flow's task runner (threads or Dask)")

    @model_validator(mode="before")
    @classmethod
    def _apply_level(cls, data: Any) -> Any:
        """Fill the prune fields the level sets and the parameters did not give; record the ones they gave
        against it. Idempotent: a validated config dumped and validated again (Prefect's parameters) is
        unchanged."""
        if not isinstance(data, dict):
            return data
        level = data.get("quality") or DEFAULT_LEVEL
        prune = data.get("prune", {"n_layers": 5})
        if isinstance(prune, PruneConfig):
            given = {name: getattr(prune, name) for name in prune.model_fields_set}
        elif isinstance(prune, dict):
            given = dict(prune)
        else:
            return data
        calibration = data.get("calibration", PRESETS["cpu"].calibration)
        windows = (calibration.n_samples if isinstance(calibration, CalibrationConfig)
                   else dict(calibration).get("n_samples", CalibrationConfig().n_samples))
        try:
            fields, overridden = resolve(str(level), given, int(windows))
        except ValueError:
            return data  # an unknown level: the field's own validation names it
        return {**data, "prune": fields, "quality": level, "quality_overridden": overridden}

    @model_validator(mode="after")
    def _consistent(self) -> CompressConfig:
        if self.prune.n_layers is None and self.prune.fraction is None:
            raise ValueError("prune: say how many layers to remove (n_layers or fraction)")
        if self.prune.mode != "iterative":
            raise ValueError("prune.mode: the compress flow checkpoints one iteration at a time, so it is "
                             "iterative only (use `prunecomp prune --mode one-shot` for one-shot)")
        if self.max_ppl_ratio is not None and (self.quick_eval is None or not self.quick_eval.datasets):
            raise ValueError("max_ppl_ratio needs quick_eval with at least one dataset")
        if self.qa_tasks and not qa_available():
            raise ValueError(f"qa_tasks needs {QA_MODULE}, which is not in this checkout")
        return self

    def model_slug(self) -> str:
        """``smollm2-135m``, ``stories260k``...: the last part of the model argument, lowercased."""
        model = (self.model or "smollm2-135m").rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf")
        return re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:40] or "model"

    def run_id(self) -> str:
        """Deterministic from the parameters, so the same command resumes the same run."""
        if self.run_name:
            return self.run_name
        k = self.prune.n_layers if self.prune.n_layers is not None else f"f{self.prune.fraction}"
        # how the work is spread, and where results are kept, do not change the result: not the run's identity
        digest = stable_hash(self.model_dump(mode="json", exclude={
            "run_name": True, "parallel_candidates": True, "tracking": {"store", "tracking_uri"}}))[:8]
        return f"{self.model_slug()}-{self.prune.metric}-k{k}-{digest}"

    def model_name(self) -> str:
        """The registered model name: explicit, else ``prunecomp-<model slug>-adhoc``.

        Why a suffix: the deployments (``deployments/configs/compress-*.yaml``) name their registered model,
        ``prunecomp-<model slug>``, and the promote deployment moves its ``champion``. An ad-hoc ``prunecomp run``
        with other settings must not add versions there: the newest version is what a promotion gates by default,
        and its metrics would not be comparable with the line's champion."""
        return self.tracking.registered_model or f"prunecomp-{self.model_slug()}-adhoc"


class EvaluateConfig(_Params):
    """Re-evaluate any checkpoint: a path/URL, or ``models:/<name>/<version>`` / ``models:/<name>@<alias>``."""

    checkpoint: str
    evaluation: EvalConfig = PRESETS["cpu"].evaluation
    qa_tasks: tuple[str, ...] = ()
    qa_limit: int | None = Field(None, gt=0)
    data_dir: str | None = None
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _qa(self) -> EvaluateConfig:
        if self.qa_tasks and not qa_available():
            raise ValueError(f"qa_tasks needs {QA_MODULE}, which is not in this checkout")
        return self


class PromoteConfig(_Params):
    """Move ``alias`` to ``version`` (default newest) of ``registered_model`` when every gate passes.

    At least one gate (a promotion that checks nothing would move the alias to anything); each gate's metric is a
    known final metric (:data:`tasks.gates.METRIC_PATTERNS`), so a misspelt gate fails here, before any work."""

    registered_model: str = Field(pattern=_NAME)
    version: str | None = Field(None, pattern=r"^[0-9]+$")
    alias: str = Field("champion", pattern=r"^[a-z][a-z0-9_-]*$")
    gates: tuple[MetricGate, ...] = Field(DEFAULT_GATES, description="at least one; see tasks.gates for what a "
                                          "gate reads")
    tracking_uri: str | None = None

    @field_validator("gates")
    @classmethod
    def _some_gate(cls, gates: tuple[MetricGate, ...]) -> tuple[MetricGate, ...]:
        if not gates:
            raise ValueError("at least one gate is needed (a promotion that checks nothing would move the alias to "
                             "any version); leave gates out for the default gates, or list the ones to apply")
        return gates
