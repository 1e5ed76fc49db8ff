"""Build the calibration cache: the tokenised windows every step scores on, saved once as safetensors.

Scoring reads the same ``[n, seq_len]`` ids at every step, so they are tokenised once per (tokenizer, calibration
config, content of the text files) and the digest of the exact ids goes into every step's cache key. The text
files and the tokenizer are checked against what the job was keyed with before (and the files after) reading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from prunecomp.corpora.calibration import TokenWindows, calibration_windows
from prunecomp.corpora.data import text_files
from prunecomp.engine.final_check import decision_windows
from prunecomp.errors import PrunecompError
from prunecomp.models.redact import redact
from prunecomp.models.sources import resolve_source
from prunecomp.models.storage import is_complete, write_dir
from tasks.caching import JOB_KEY, RESULT_SERIALIZER, json_result
from tasks.files import read_bytes, read_json
from tasks.jobs import CalibrationJob
from tasks.keys import check_files
from tasks.working import verify_source

__all__ = ["build_calibration", "load_windows"]

_WINDOWS = "windows.safetensors"
_META = "meta.json"


def load_windows(uri: str, expected_digest: str | None = None) -> TokenWindows:
    """Read cached windows back; refuses them when their digest is not the expected one."""
    meta = read_json(f"{uri}/{_META}")
    ids = load_safetensors(read_bytes(f"{uri}/{_WINDOWS}"))["ids"]
    windows = TokenWindows(ids=ids, origin=meta["origin"], digest=meta["digest"])
    if expected_digest is not None and windows.digest != expected_digest:
        raise PrunecompError(f"calibration cache {redact(uri)!r} does not hold the expected windows; delete it")
    return windows


@task(name="build-calibration", cache_policy=JOB_KEY, persist_result=True, result_serializer=RESULT_SERIALIZER)
def build_calibration(job: CalibrationJob) -> dict[str, Any]:
    """Tokenise the calibration windows with the model's tokenizer; returns URI, digest, origin and shape."""
    if is_complete(job.uri):
        return dict(json_result(read_json(f"{job.uri}/{_META}")))
    from transformers import AutoTokenizer

    cfg = job.calibration
    files = text_files(cfg.source, "calibration", job.data_dir)
    check_files(job.data_files, files)
    if not verify_source(job.model_uri, job.model_hash, job.source_record):
        raise PrunecompError(redact(f"model {job.model_uri!r} is not the {job.model_hash[:12]} this job was keyed "
                                    "by: it changed after the run hashed it; run again"))
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(job.model_uri).local_dir)
    if job.windows == "decision":
        windows = decision_windows(tokenizer, cfg, job.data_dir)
    else:
        windows = calibration_windows(tokenizer, cfg.source, n_samples=cfg.n_samples, seq_len=cfg.seq_len,
                                      seed=cfg.seed, data_dir=job.data_dir)
    check_files(job.data_files, files)  # and not rewritten while it was read
    meta = {"uri": job.uri, "digest": windows.digest, "origin": windows.origin, "n_samples": windows.n,
            "seq_len": windows.seq_len, "key": job.key}

    def fill(tmp: Path) -> None:
        import json

        save_file({"ids": windows.ids.contiguous()}, str(tmp / _WINDOWS))
        (tmp / _META).write_text(json.dumps(meta, indent=2))

    write_dir(job.uri, fill, owned=True)
    return dict(json_result(meta))
