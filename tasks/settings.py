"""Where a pipeline run keeps its files, and how it reaches S3: resolved from the environment at run time.

Embedded defaults (nothing configured): everything lives under one local directory, ``$PRUNECOMP_HOME`` or
``./.prunecomp``::

    .prunecomp/
      store/        checkpoints, calibration caches, evaluation results, run journals (``$PRUNECOMP_STORE``)
      prefect/      Prefect's home: temporary-server DB and task results/cache records (``$PREFECT_HOME``)
      mlflow.db     MLflow tracking + registry (sqlite; ``$MLFLOW_TRACKING_URI`` overrides)
      mlartifacts/  MLflow artifacts (``$PRUNECOMP_MLFLOW_ARTIFACTS``; defaults to ``<store>/mlflow`` when the
                    store is remote so models land next to the checkpoints)

``$PRUNECOMP_STORE`` may be any fsspec URL (``s3://bucket/prefix``). The S3 endpoint comes from the usual variables
(``FSSPEC_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, ``MLFLOW_S3_ENDPOINT_URL``) and the
credentials from the AWS chain; neither is ever logged. :func:`redact` and :func:`redact_all` (from
:mod:`prunecomp.models.redact`, so the library's error lines follow the same rule) mask userinfo and query-string
credentials in whatever a run writes or shows. Nothing here imports Prefect or MLflow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunecomp.models.redact import redact, redact_all  # one rule for the library and the pipeline

__all__ = ["ENDPOINT_VARS", "Locations", "configure_s3", "locations", "redact", "redact_all", "s3_endpoint"]

ENDPOINT_VARS = ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")

# Small, bounded retries: an unreachable endpoint must fail in seconds with a clear message, not hang for minutes
# (botocore's default retries plus s3fs's own make a refused connection take ~10 s; these ~1 s).
_S3_CONFIG: dict[str, Any] = {"retries": {"max_attempts": 3, "mode": "standard"}, "connect_timeout": 3,
                              "read_timeout": 60}


@dataclass(frozen=True)
class Locations:
    """The resolved places of one pipeline run (all strings: local paths or URLs)."""

    home: str
    store: str
    tracking_uri: str
    mlflow_artifacts: str

    def child(self, *parts: str) -> str:
        """``store/part/part`` for local paths and URLs alike."""
        return "/".join([self.store.rstrip("/"), *parts])


def _home() -> Path:
    return Path(os.environ.get("PRUNECOMP_HOME") or ".prunecomp").expanduser().resolve()


def locations(store: str | None = None, tracking_uri: str | None = None) -> Locations:
    """Resolve the run's locations: explicit arguments, else the environment, else the embedded defaults."""
    home = _home()
    store = store or os.environ.get("PRUNECOMP_STORE") or str(home / "store")
    if "://" not in store:
        store = str(Path(store).expanduser().resolve())
    tracking = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
    default_artifacts = f"{store.rstrip('/')}/mlflow" if "://" in store else str(home / "mlartifacts")
    artifacts = os.environ.get("PRUNECOMP_MLFLOW_ARTIFACTS") or default_artifacts
    return Locations(str(home), store, tracking, artifacts)


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the first of :data:`ENDPOINT_VARS` that is set (``None``: AWS itself)."""
    for var in ENDPOINT_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


_applied: dict[str, Any] = {}


def configure_s3() -> None:
    """Give fsspec's s3 filesystem the endpoint from the environment and small bounded retries.

    fsspec's global config is the one place both prunecomp's storage helpers and our tasks pick options up from,
    so this runs at the start of every flow (never at import) and follows the environment as it is *now*. Values
    the user put into ``fsspec.config.conf`` themselves are left alone. MLflow uses boto3 directly, so the
    endpoint is mirrored to ``MLFLOW_S3_ENDPOINT_URL`` when only another variable names it.
    """
    import fsspec

    conf = fsspec.config.conf.setdefault("s3", {})
    endpoint = s3_endpoint()
    if conf.get("endpoint_url") in (None, _applied.get("endpoint_url")):
        if endpoint:
            conf["endpoint_url"] = _applied["endpoint_url"] = endpoint
        else:
            conf.pop("endpoint_url", None)
            _applied.pop("endpoint_url", None)
    if endpoint and os.environ.get("MLFLOW_S3_ENDPOINT_URL") in (None, "", _applied.get("mlflow")):
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = _applied["mlflow"] = endpoint
    config_kwargs = conf.setdefault("config_kwargs", {})
    for key, value in _S3_CONFIG.items():
        config_kwargs.setdefault(key, value)
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # instances built before this call kept the old options
    except ImportError:  # pragma: no cover - s3fs is a core dependency
        pass
