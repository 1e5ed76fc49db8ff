"""What each cached task computes, as frozen specs with a deterministic key and artifact URI.

A job holds exactly the scalars that determine its result (content hashes, validated configs, step, code version,
device type and dtype, store) plus where to read its inputs from. :attr:`Job.key` hashes the first group only: the
same model content at another URI is the same input. The artifact of a job lives at ``<store>/<kind>/<key>``, so a
resumed run finds the checkpoint an interrupted run wrote, and a changed input can never pick up a stale one.

In every key: the store, the code version (:func:`tasks.keys.code_version`: the sources, the shipped QA task
configs, the versions of the libraries that change numbers), the device type (``cpu``, ``cuda``) and the compute
dtype the task loads the model with (bf16 on CUDA and fp32 on CPU give other numbers, other removed layers, other
final tensors: a shared store must not hand one's steps or final model to the other). They are fields, filled in
from this machine by default, and the tasks load with what the job says, so the key describes what was computed.
The calibration windows do not depend on them, but carry them too: one rule for every job, and tokenising again
on the other kind of machine costs seconds.

The local files a result is read from enter by content: a calibration or evaluation text given as a file or
folder, and the files of the data folder that the corpora resolve to (:func:`prunecomp.corpora.data.text_files`; for QA,
the folder of each task's local set), never the whole data folder. :class:`~tasks.keys.DataFile` records carry
their sha256 (in the key) and size and mtime (not in it); the task checks them before reading
(:func:`tasks.keys.check_files`). A model source enters by its content hash; the job also carries the
:class:`~tasks.keys.SourceRecord` made when the flow hashed it, and every task that loads the source checks the
files against it first (:func:`tasks.keys.check_source`).

Left out of every key, on purpose:

* where things lie (URIs of the base model, recipe parts, calibration cache, teacher predictions, checkpoint): the
  hashes and digests beside them say what they are; the data files' size and mtime and the source record's
  stamps, likewise (they describe one copy of the bytes, not the bytes);
* text from the Hugging Face hub: named by dataset, config and split (the windows' origin), not by content;
  those datasets are published snapshots, and the calibration digest (token ids) still enters every step key;
* the GPU model, CUDA and driver versions: the same device type and dtype are taken to give the same results up
  to kernel rounding; set ``PRUNECOMP_CODE_VERSION`` per machine to keep such caches apart;
* per-job exceptions, each said where the job is defined (``batch_size`` of the calibration windows, the
  refinement and refit options of a step, the report beside a final model, candidate scores).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prunecomp.config import CalibrationConfig, EvalConfig, PruneConfig
from prunecomp.corpora.data import text_files
from tasks.keys import (
    DataFile,
    SourceRecord,
    code_version,
    default_device,
    default_dtype,
    fingerprint_files,
    recorded_source,
    stable_hash,
)

__all__ = ["CalibrationJob", "EvalJob", "FinalJob", "Job", "ModelJob", "RefineJob", "StateJob", "StepJob",
           "TeacherJob", "eval_files"]


class Job(BaseModel):
    """Base of the job specs: ``store``, ``code``, ``device`` and ``dtype`` always enter the key.

    ``source_record``: this process's :class:`~tasks.keys.SourceRecord` of the model the job reads (the field
    :attr:`record_of` names), filled in when the job is built and carried with it to whichever process runs it;
    never in the key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ClassVar[str] = "jobs"
    not_in_key: ClassVar[frozenset[str]] = frozenset()
    record_of: ClassVar[str | None] = None

    store: str
    code: str = Field(default_factory=code_version)
    device: str = Field(default_factory=default_device, pattern=r"^[a-z]+$")  # a device type: cpu, cuda, mps
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default_factory=lambda data: default_dtype(str(data.get("device", "cpu"))))
    source_record: SourceRecord | None = None

    @model_validator(mode="before")
    @classmethod
    def _recorded_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.record_of is not None and data.get("source_record") is None:
            record = recorded_source(data.get(cls.record_of))
            if record is not None:
                return {**data, "source_record": record}
        return data

    def key_payload(self) -> dict[str, object]:
        payload = self.model_dump(mode="json", exclude={*self.not_in_key, "source_record"})
        if "data_files" in payload:  # by content: where a copy lies and when it was written are not what it is
            payload["data_files"] = {f["path"]: f["sha256"] for f in payload["data_files"]}
        return payload

    @property
    def key(self) -> str:
        """24 hex of the sha256 of :meth:`key_payload` (~96 bits: collisions are not a practical concern)."""
        return stable_hash(self.kind, self.key_payload())[:24]

    @property
    def uri(self) -> str:
        return f"{self.store.rstrip('/')}/{self.kind}/{self.key}"


def _qa_files(tasks: tuple[str, ...], data_dir: str | None) -> list[Path]:
    """Every file in the folder of each QA task's local set (labels and readme included: what the readers open is
    theirs to say, and a folder holds one set); none from the hub (``data_dir`` unset)."""
    if not tasks or data_dir is None:
        return []
    from prunecomp.evaluation.qa_data import LOCAL_SETS

    root = Path(data_dir).expanduser()
    folders = {(root / LOCAL_SETS[t].path).parent for t in tasks if t in LOCAL_SETS}
    return [p.resolve() for folder in folders if folder.is_dir() for p in folder.iterdir() if p.is_file()]


def eval_files(evaluation: EvalConfig, data_dir: str | None, qa_tasks: tuple[str, ...] = (),
               final_check: CalibrationConfig | None = None) -> list[Path]:
    """The local files an evaluation reads: each corpus's evaluation split, the QA sets, and the calibration
    split the final check draws its held-out windows from."""
    paths = [p for name in evaluation.datasets for p in text_files(name, "evaluation", data_dir)]
    if final_check is not None and final_check.held_out > 0:
        paths += text_files(final_check.source, "calibration", data_dir)
    return paths + _qa_files(qa_tasks, data_dir)


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
    record_of: ClassVar[str | None] = "model_uri"  # its tokenizer files are part of the model's content hash

    model_uri: str
    model_hash: str
    calibration: CalibrationConfig
    data_dir: str | None
    # calibration: the scoring (or fitting) windows; decision: the held-out windows after the final check's, on
    # which the gains and block reconstruction are kept or declined (held_out_windows with after=held_out)
    windows: Literal["calibration", "decision"] = "calibration"
    # the files the windows are read from, by content; default: hashed now, in this process
    data_files: tuple[DataFile, ...] = Field(default_factory=lambda data: fingerprint_files(
        text_files(data["calibration"].source, "calibration", data.get("data_dir")) if "calibration" in data
        else ()))

    def key_payload(self) -> dict[str, object]:
        payload = super().key_payload()
        payload["calibration"] = self.calibration.model_dump(mode="json", exclude={"batch_size"})  # no effect
        if self.windows == "calibration":  # the scoring windows' keys of earlier runs unchanged
            payload.pop("windows", None)
        return payload


class StateJob(Job):
    """A job on one model state: the base model (``base_uri``/``base_hash``) plus recipe parts (URIs of step and
    refinement parts, in order) whose recipe digest is ``state_digest``. Where things lie is not in the key; the
    base hash and the digest, which say what the model is, are."""

    not_in_key: ClassVar[frozenset[str]] = frozenset({"base_uri", "parts"})
    record_of: ClassVar[str | None] = "base_uri"

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
                                                      "fit_uri", "check_uri"})

    calibration_uri: str
    calibration_digest: str
    prune: PruneConfig
    step: int = Field(ge=0)
    batch_size: int = Field(gt=0)  # summation order of the scores: it can flip a near-tie
    candidate_scores: dict[int, float] | None = None
    # The windows of block reconstruction's local fit (prune.reconstruct), when they are not the calibration ones.
    fit_uri: str | None = None
    fit_digest: str | None = None
    # The held-out windows each reconstruction must improve to be kept (none: decided on the fitting windows).
    check_uri: str | None = None
    check_digest: str | None = None

    def key_payload(self) -> dict[str, object]:
        payload = super().key_payload()
        for name in ("fit_digest", "check_digest"):  # absent: the keys of runs without them unchanged
            if payload.get(name) is None:
                payload.pop(name, None)
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
    record_of: ClassVar[str | None] = "base_uri"

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
    not_in_key: ClassVar[frozenset[str]] = frozenset({"base_uri", "parts", "calibration_uri", "teacher_uri",
                                                      "check_uri"})

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
    # the held-out windows the fit must improve to be folded (a decision CalibrationJob's artifact), when kept
    check_uri: str | None = None
    check_digest: str | None = None

    def key_payload(self) -> dict[str, object]:
        payload = super().key_payload()
        if self.check_digest is None:  # not checked: the keys of earlier runs unchanged
            payload.pop("check_digest", None)
        return payload


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
    record_of: ClassVar[str | None] = "base_uri"

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
    # The final check (prunecomp.engine.final_check) on this calibration config's held-out windows; a pipeline state
    # only.
    final_check: CalibrationConfig | None = None
    # the files every part of the evaluation reads (eval_files), by content; default: hashed now, in this process
    data_files: tuple[DataFile, ...] = Field(default_factory=lambda data: fingerprint_files(eval_files(
        data["evaluation"], data.get("data_dir"), data.get("qa_tasks", ()), data.get("final_check")))
        if "evaluation" in data else ())
