"""What each cached task computes, as frozen specs with a deterministic key and artifact URI.

A job holds exactly the scalars that determine its result (content hashes, validated configs, step, code version,
store) plus where to read its inputs from. :attr:`Job.key` hashes the first group only: the same model content at
another URI is the same input. The artifact of a job lives at ``<store>/<kind>/<key>``, so a resumed run finds
the checkpoint an interrupted run wrote, and a changed input can never pick up a stale one.

Left out of every key on purpose: the *contents* of the data files behind ``data_dir`` (treated as immutable;
``shared/data`` ships SHA256SUMS; the calibration digest, which covers the token ids, does enter the step keys),
the torch version and the device (CPU runs are deterministic here; set ``PRUNECOMP_CODE_VERSION`` to separate
environments explicitly).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from prunecomp.config import CalibrationConfig, EvalConfig, PruneConfig
from tasks.keys import code_version, stable_hash

__all__ = ["CalibrationJob", "EvalJob", "Job", "ModelJob", "StepJob"]


class Job(BaseModel):
    """Base of the job specs: ``store`` and ``code`` always enter the key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ClassVar[str] = "jobs"
    not_in_key: ClassVar[frozenset[str]] = frozenset()

    store: str
    code: str = Field(default_factory=code_version)

    def key_payload(self) -> dict[str, object]:
        return self.model_dump(mode="json", exclude=set(self.not_in_key))

    @property
    def key(self) -> str:
        """24 hex of the sha256 of :meth:`key_payload` (~96 bits: collisions are not a practical concern)."""
        return stable_hash(self.kind, self.key_payload())[:24]

    @property
    def uri(self) -> str:
        return f"{self.store.rstrip('/')}/{self.kind}/{self.key}"


class ModelJob(Job):
    """Materialise a source model as a safetensors checkpoint (GGUF dequantised once, not on every step)."""

    kind: ClassVar[str] = "models"
    not_in_key: ClassVar[frozenset[str]] = frozenset({"source_uri", "revision"})

    source_uri: str | None
    revision: str | None = None
    source_hash: str
    allow_pickle: bool = False
    trust_remote_code: bool = False


class CalibrationJob(Job):
    """Tokenised calibration windows of one model's tokenizer."""

    kind: ClassVar[str] = "calibration"
    not_in_key: ClassVar[frozenset[str]] = frozenset({"model_uri"})

    model_uri: str
    model_hash: str
    calibration: CalibrationConfig
    data_dir: str | None

    def key_payload(self) -> dict[str, object]:
        payload = super().key_payload()
        payload["calibration"] = self.calibration.model_dump(mode="json", exclude={"batch_size"})  # no effect
        return payload


class StepJob(Job):
    """One iteration (score -> remove -> compensate -> checkpoint) applied to a parent checkpoint."""

    kind: ClassVar[str] = "checkpoints"
    # candidate_scores: computed by fanned-out tasks from exactly the inputs in the key (see tasks.candidates)
    not_in_key: ClassVar[frozenset[str]] = frozenset({"parent_uri", "calibration_uri", "candidate_scores"})

    parent_uri: str
    parent_hash: str
    calibration_uri: str
    calibration_digest: str
    prune: PruneConfig
    step: int = Field(ge=0)
    batch_size: int = Field(gt=0)  # summation order of the scores: it can flip a near-tie
    candidate_scores: dict[int, float] | None = None

    def key_payload(self) -> dict[str, object]:
        payload = super().key_payload()
        # Refinement runs after the last step (RefineJob): a refined run reuses the plain run's steps.
        payload["prune"] = {k: v for k, v in dict(payload["prune"]).items() if not k.startswith("refine")}
        return payload


class RefineJob(Job):
    """Distil the dense model (``base``) into folded gains of the last pruned checkpoint (``parent``)."""

    kind: ClassVar[str] = "refined"
    not_in_key: ClassVar[frozenset[str]] = frozenset({"base_uri", "parent_uri", "calibration_uri"})

    base_uri: str
    base_hash: str
    parent_uri: str
    parent_hash: str
    calibration_uri: str
    calibration_digest: str
    mode: Literal["norms", "norms+writers", "channels"]
    steps: int = Field(ge=1)
    lr: float = Field(gt=0.0)
    batch: int = Field(ge=1)
    topk: int = Field(ge=1)
    batch_size: int = Field(gt=0)


class EvalJob(Job):
    """Perplexity (and optional QA) of one checkpoint."""

    kind: ClassVar[str] = "evals"
    not_in_key: ClassVar[frozenset[str]] = frozenset({"checkpoint_uri"})

    checkpoint_uri: str
    checkpoint_hash: str
    evaluation: EvalConfig
    data_dir: str | None
    qa_tasks: tuple[str, ...] = ()
    qa_limit: int | None = None
    seed: int = 0
