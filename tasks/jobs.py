"""What each cached task computes, as frozen specs with a deterministic key and artifact URI.

A job holds exactly the scalars that determine its result (content hashes, validated configs, step, code version,
store) plus where to read its inputs from. :attr:`Job.key` hashes the first group only: the same model content at
another URI is the same input. The artifact of a job lives at ``<store>/<kind>/<key>``, so a resumed run finds
the checkpoint an interrupted run wrote, and a changed input can never pick up a stale one.

Left out of every key on purpose: the *contents* of the data files behind ``data_dir`` (treated as immutable;
``shared/data`` ships SHA256SUMS; the calibration digest, which covers the token ids, does enter the step keys)
and the device (CPU runs are deterministic here; set ``PRUNECOMP_CODE_VERSION`` to separate environments
explicitly). The code version (:func:`tasks.keys.code_version`) covers the sources, the shipped QA task configs and
the versions of the libraries that change numbers.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from prunecomp.config import CalibrationConfig, EvalConfig, PruneConfig
from tasks.keys import code_version, stable_hash

__all__ = ["CalibrationJob", "EvalJob", "FinalJob", "Job", "ModelJob", "RefineJob", "StateJob", "StepJob",
           "TeacherJob"]


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


class StateJob(Job):
    """A job on one model state: the base model (``base_uri``/``base_hash``) plus recipe parts (URIs of step and
    refinement parts, in order) whose recipe digest is ``state_digest``. Where things lie is not in the key; the
    base hash and the digest, which say what the model is, are."""

    not_in_key: ClassVar[frozenset[str]] = frozenset({"base_uri", "parts"})

    base_uri: str
    base_hash: str
    parts: tuple[str, ...] = ()
    state_digest: str
    stream: bool = False  # layer-streamed model (the pipeline's --stream-layers): other arithmetic, other results


class StepJob(StateJob):
    """One iteration (score -> remove -> compensate) on a model state; its artifact is the step's recipe part."""

    kind: ClassVar[str] = "steps"
    # candidate_scores: computed by fanned-out tasks from exactly the inputs in the key (see tasks.candidates)
    not_in_key: ClassVar[frozenset[str]] = frozenset({"base_uri", "parts", "calibration_uri", "candidate_scores",
                                                      "fit_uri"})

    calibration_uri: str
    calibration_digest: str
    prune: PruneConfig
    step: int = Field(ge=0)
    batch_size: int = Field(gt=0)  # summation order of the scores: it can flip a near-tie
    candidate_scores: dict[int, float] | None = None
    # The windows of block reconstruction's local fit (prune.reconstruct), when they are not the calibration ones.
    fit_uri: str | None = None
    fit_digest: str | None = None

    def key_payload(self) -> dict[str, object]:
        payload = super().key_payload()
        if self.fit_digest is None:  # no local fit on windows of its own: the keys of earlier runs unchanged
            payload.pop("fit_digest", None)
        # Refinement is its own task (RefineJob): a run refined at the end reuses the plain run's steps, and a
        # progressive run's steps after the first differ by their parent state's digest, which is in the key.
        # The sequential refit after the last removal (prune.refit) is its own task too (RefitJob).
        payload["prune"] = {k: v for k, v in dict(payload["prune"]).items() if not k.startswith(("refine", "refit"))}
        return payload


class TeacherJob(Job):
    """The base model's top-``topk`` next-token log-probs on the refinement windows, computed once per run (not
    once per refinement: a progressive run refines after every step) and kept as their own artifact."""

    kind: ClassVar[str] = "teacher"
    not_in_key: ClassVar[frozenset[str]] = frozenset({"base_uri", "calibration_uri"})

    base_uri: str
    base_hash: str
    calibration_uri: str
    calibration_digest: str
    topk: int = Field(ge=1)
    batch_size: int = Field(gt=0)  # batched forwards: float summation order of the logits


class RefineJob(StateJob):
    """Distil the base model's predictions into folded gains of a pruned state (after the last step, or after
    every step with ``refine_at="each"``); artifact: the gains part. ``teacher_uri``: the :class:`TeacherJob`
    artifact, which the base hash, windows digest, ``topk`` and ``batch_size`` in this key already determine."""

    kind: ClassVar[str] = "refined"
    not_in_key: ClassVar[frozenset[str]] = frozenset({"base_uri", "parts", "calibration_uri", "teacher_uri"})

    teacher_uri: str

    calibration_uri: str
    calibration_digest: str
    mode: Literal["norms", "norms+writers", "channels"]
    steps: int = Field(ge=1)
    lr: float = Field(gt=0.0)
    batch: int = Field(ge=1)
    topk: int = Field(ge=1)
    loss: Literal["tail", "topk"] = "tail"
    batch_size: int = Field(gt=0)


class RefitJob(StateJob):
    """Refit every layer after the first gap of a pruned state to the base model's streams (the sequential refit,
    after the last step and before the end refinement); artifact: a layers part. The base model is the dense
    source (its layers are read one at a time), so nothing beyond ``base_hash`` names it."""

    kind: ClassVar[str] = "refit"
    not_in_key: ClassVar[frozenset[str]] = frozenset({"base_uri", "parts", "calibration_uri"})

    calibration_uri: str
    calibration_digest: str
    steps: int = Field(ge=1)
    lr: float = Field(gt=0.0)
    batch: int = Field(ge=1)


class FinalJob(StateJob):
    """Write the final model of a state once: a plain HF folder with its full recipe, at ``<store>/final/<key>``."""

    kind: ClassVar[str] = "final"

    source: dict[str, str | int | None]  # the recipe's source document (content hash, architecture, depth, uri)
    report: dict[str, object] = Field(default_factory=dict)  # written beside it; the audit trail, not the key

    def key_payload(self) -> dict[str, object]:
        payload = super().key_payload()
        payload.pop("report", None)
        payload["source"] = {k: v for k, v in self.source.items() if k != "uri"}
        return payload


class EvalJob(Job):
    """Perplexity (and optional QA) of one model: a saved checkpoint (``checkpoint_uri``), or a pipeline state
    (``base_uri`` + ``parts``, evaluated on the working copy). ``checkpoint_hash`` says which model it is: a
    checkpoint's tensor hash or a state's recipe digest."""

    kind: ClassVar[str] = "evals"
    # a state's digest already covers its base hash: the same model evaluated from its saved checkpoint (the
    # evaluate flow) or from the working copy (the compress flow) shares one result
    not_in_key: ClassVar[frozenset[str]] = frozenset({"checkpoint_uri", "base_uri", "base_hash", "parts"})

    checkpoint_uri: str | None = None
    checkpoint_hash: str
    base_uri: str | None = None
    base_hash: str | None = None
    parts: tuple[str, ...] = ()
    stream: bool = False
    evaluation: EvalConfig
    data_dir: str | None
    qa_tasks: tuple[str, ...] = ()
    qa_limit: int | None = None
    seed: int = 0
    # The final check (prunecomp.final_check) on this calibration config's held-out windows; a pipeline state only.
    final_check: CalibrationConfig | None = None
