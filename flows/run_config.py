"""The compress flow's parameters from ``prunecomp run``'s options: flags alone, or a config file (YAML/JSON, the
deployments' ``parameters.config`` format; its ``prune`` section flat or the tree of stages) with the flags given
beside it replacing their entries (flags win). Unknown keys are errors; a store or tracking URI that carries
credentials goes to the run through the environment, never as a flow parameter.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from rich.console import Console

from prunecomp.cli import explicit_options, preset_settings
from prunecomp.cli.options import given_prune_fields, load_config_file, option_fields
from prunecomp.config import PruneConfig, flatten_tree
from prunecomp.errors import PrunecompError

__all__ = ["build_config", "csv"]

err = Console(stderr=True)


def csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


_OPTION_PATHS: dict[str, tuple[str, ...]] = {
    **{name: (name,) for name in ("model", "revision", "allow_pickle", "trust_remote_code", "quality",
                                  "max_ppl_ratio", "qa_tasks", "qa_limit", "data_dir", "run_name",
                                  "parallel_candidates", "stream_layers")},
    **{param: where for param, where in option_fields().items() if where[0] != "prune"},
    "preset": ("calibration",), "quick_datasets": ("quick_eval",), "quick_max_windows": ("quick_eval",),
    "registered_model": ("tracking", "registered_model"), "register": ("tracking", "log_and_register"),
}
"""Where an option lands in a config file (``prune`` fields land under ``prune``): a flag given beside
``--config`` replaces that entry of the file."""


def build_config(kw: dict[str, Any]) -> Any:
    """Options -> validated :class:`~flows.params.CompressConfig`. With ``--config FILE`` the file is the base and
    every flag given on the command line replaces its entry (flags win); unknown keys in the file are errors."""
    from flows.params import CompressConfig

    where = _credentials_to_env({k: v for k, v in (("store", kw["store"]), ("tracking_uri", kw["tracking_uri"]))
                                 if v})
    explicit = explicit_options()
    flags = _flag_config(kw, where, explicit)
    if not kw["config"]:
        return CompressConfig.model_validate(flags)
    data = load_config_file(kw["config"])
    data["tracking"] = _credentials_to_env(dict(data.get("tracking") or {}) | where)
    try:  # the file's prune section may be the tree of stages: flags name flat fields
        prune = flatten_tree(dict(data.get("prune") or {}))
    except ValueError as exc:
        raise PrunecompError(f"config file {kw['config']!r}: prune: {exc}") from exc
    for name in explicit:
        if name in PruneConfig.model_fields:
            prune[name] = flags["prune"][name]
            if name in ("n_layers", "fraction"):  # one way of saying how many: the flag's
                prune.pop("fraction" if name == "n_layers" else "n_layers", None)
        elif name in _OPTION_PATHS:
            section, *field = _OPTION_PATHS[name]
            if field and isinstance(data.get(section), dict):
                data[section][field[0]] = flags[section][field[0]]
            else:  # a whole section, or one the file leaves out: the flags' (preset included)
                data[section] = copy.deepcopy(flags[section])
            if name == "preset":
                data["evaluation"] = copy.deepcopy(flags["evaluation"])
    data["prune"] = prune
    return CompressConfig.model_validate(data)


def _flag_config(kw: dict[str, Any], where: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The parameters the flags alone describe (their defaults included, except the pruning fields a
    ``--quality`` level fills: only the ones given)."""
    cal, ev = preset_settings(kw)
    quick = csv(kw["quick_datasets"])
    tracking = where | {"log_and_register": kw["register"]}
    if kw["registered_model"]:
        tracking["registered_model"] = kw["registered_model"]
    return {
        "model": kw["model"], "revision": kw["revision"], "allow_pickle": kw["allow_pickle"],
        "trust_remote_code": kw["trust_remote_code"], "quality": kw["quality"],
        "prune": given_prune_fields(kw, explicit),
        "calibration": cal, "evaluation": ev,
        "quick_eval": {"datasets": quick, "seq_len": ev["seq_len"], "max_windows": kw["quick_max_windows"]}
        if quick else None,
        "max_ppl_ratio": kw["max_ppl_ratio"], "qa_tasks": csv(kw["qa_tasks"]), "qa_limit": kw["qa_limit"],
        "data_dir": kw["data_dir"], "run_name": kw["run_name"], "tracking": tracking,
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
