"""Fixtures of the orchestration tests: one Prefect test harness, one MLflow sqlite DB and one moto S3 server per
session (each costs seconds to start), a small stories260K configuration, and helpers.

Prefect reads its settings at import and ``prefect_test_harness`` ignores ``monkeypatch.setenv``, so the result
storage is set with ``temporary_settings``; our own variables (``PRUNECOMP_*``, ``AWS_*``) are read at run time
and may be patched normally.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.needs_shared import missing

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "true",
               "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
DATA = SHARED / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def stories() -> Path:
    if not (STORIES / "config.json").is_file() or not (DATA / "README.md").is_file():
        missing(f"stories260K or shared data missing beside the checkout ({SHARED})")
    return STORIES


@pytest.fixture(scope="session")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A temporary Prefect API + a result storage of our own; yields what a subprocess needs to join them."""
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    with prefect_test_harness(server_startup_timeout=90), \
            temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: results}):
        yield {"PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(results)}


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite MLflow DB for the session (its first use runs the migrations, ~6 s)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real local S3 server (moto) on 127.0.0.1 with a bucket ``prunecomp``; sets the AWS variables."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "PRUNECOMP_CACHE_DIR": str(tmp_path_factory.mktemp("download-cache"))}
    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        mp.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("prunecomp")
    try:
        yield env
    finally:
        mp.undo()
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def small_config(store: str, tracking_uri: str, **overrides: Any) -> Any:
    """The compress parameters of the tests: stories260K, 2 layers, 8 x 128 calibration tokens of TinyStories."""
    from flows.params import CompressConfig

    base: dict[str, Any] = {
        "model": str(STORIES), "data_dir": str(DATA),
        "prune": {"metric": "bi", "n_layers": 2},
        "calibration": {"source": "tinystories", "n_samples": 8, "seq_len": 128, "batch_size": 8},
        "quick_eval": {"datasets": ["tinystories"], "seq_len": 128, "max_windows": 4, "batch_size": 4},
        "evaluation": {"datasets": ["tinystories"], "seq_len": 128, "max_windows": 8, "batch_size": 8},
        "tracking": {"store": store, "tracking_uri": tracking_uri},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = base[key] | value
        else:
            base[key] = value
    return CompressConfig.model_validate(base)


@pytest.fixture(scope="session")
def make_config(stories: Path) -> Any:
    """:func:`small_config` as a fixture (test modules must not import from conftest)."""
    return small_config


@pytest.fixture(scope="session")
def port_factory() -> Any:
    return free_port
