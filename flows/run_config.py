"""The compress flow's parameters from ``prunecomp run``'s options: flags alone, or a config file (YAML/JSON, the
deployments' ``parameters.config`` format; its ``prune`` section flat or the tree of stages) merged with the flags
by the one rule ``prune`` uses (:mod:`prunecomp.cli.parameters`). This module only adds where the pipeline's own
options land. A store or tracking URI that carries credentials goes to the run through the environment, never as a
flow parameter.
"""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console

from prunecomp.cli import explicit_options, preset_settings
from prunecomp.cli.options import shared_flags, shared_paths
from prunecomp.cli.parameters import FILE_KEYS, PIPELINE_KEYS, Entry, merged_parameters

__all__ = ["build_config", "csv"]

err = Console(stderr=True)


def csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


_PIPELINE_ENTRIES: dict[str, tuple[Entry, ...]] = {
    **{name: ((name,),) for name in ("max_ppl_ratio", "qa_tasks", "qa_limit", "run_name", "parallel_candidates",
                                     "stream_layers")},
    "quick_datasets": (("quick_eval",),), "quick_max_windows": (("quick_eval",),),
    "store": (("tracking", "store"),), "tracking_uri": (("tracking", "tracking_uri"),),
    "registered_model": (("tracking", "registered_model"),), "register": (("tracking", "log_and_register"),),
}
"""Where the options only ``run`` has land in a parameter file (the shared ones: ``shared_paths``)."""


def build_config(kw: dict[str, Any]) -> Any:
    """Options -> validated :class:`~flows.params.CompressConfig`. With ``--config FILE`` the file and the flags
    merge by the rule ``prune`` uses (:mod:`prunecomp.cli.parameters`: a flag given wins, then the file, then the
    flag's default); unknown keys in the file are errors."""
    from flows.params import CompressConfig

    explicit = explicit_options()
    flags = shared_flags(kw, explicit) | _pipeline_flags(kw)
    doc = merged_parameters(kw, explicit, flags, shared_paths() | _PIPELINE_ENTRIES, FILE_KEYS + PIPELINE_KEYS)
    doc["tracking"] = _credentials_to_env(dict(doc.get("tracking") or {}))
    return CompressConfig.model_validate(doc)


def _pipeline_flags(kw: dict[str, Any]) -> dict[str, Any]:
    """The pipeline-only parameters the flags describe, defaults included."""
    quick = csv(kw["quick_datasets"])
    cal_ev = preset_settings(kw)[1]
    tracking = {k: kw[k] for k in ("store", "tracking_uri", "registered_model") if kw[k]}
    return {
        "quick_eval": {"datasets": quick, "seq_len": cal_ev["seq_len"], "max_windows": kw["quick_max_windows"]}
        if quick else None,
        "max_ppl_ratio": kw["max_ppl_ratio"], "qa_tasks": csv(kw["qa_tasks"]), "qa_limit": kw["qa_limit"],
        "run_name": kw["run_name"], "tracking": tracking | {"log_and_register": kw["register"]},
        "parallel_candidates": kw["parallel_candidates"], "stream_layers": kw["stream_layers"],
    }


_ENV_OF = {"store": "PRUNECOMP_STORE", "tracking_uri": "MLFLOW_TRACKING_URI"}


def _credentials_to_env(where: dict[str, Any]) -> dict[str, Any]:
    """A store or tracking URI with a password goes to the run through the environment, not as a flow parameter:
    Prefect stores flow parameters in its database and shows them in its UI."""
    from tasks.settings import redact

    out = dict(where)
    for key, var in _ENV_OF.items():
        value = out.get(key)
        if isinstance(value, str) and redact(value) != value:
            os.environ[var] = value
            del out[key]
            err.print(f"{key.replace('_', '-')} carries credentials: passed to the run through ${var}, not as a "
                      "flow parameter (Prefect stores parameters)", highlight=False)
    return out
