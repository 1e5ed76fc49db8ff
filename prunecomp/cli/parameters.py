"""A parameter file and the flags given beside it, merged by one rule for ``prune``, ``run`` and the deployments'
files: **a flag the user gives wins; otherwise the file's entry; otherwise the flag's default.**

The document is the compress parameters' format (``deployments/configs/*.yaml``): ``model``, ``quality``, ``prune``
(flat fields or the tree of stages), ``calibration``, ``evaluation``... plus the keys only the pipeline uses. Every
option names the entries it sets (``prunecomp.cli.options.shared_paths``; the pipeline adds its own), so the rule
is applied per entry by one pure function, :func:`merge`. Two choices span entries: how many layers go
(``n_layers`` or ``fraction``: the flag's, when given, replaces the file's) and the preset (``--preset`` replaces
the whole calibration and evaluation sections).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunecomp.config import flatten_tree
from prunecomp.errors import PrunecompError

__all__ = ["FILE_KEYS", "PIPELINE_KEYS", "Entry", "load_config_file", "merge", "merged_parameters",
           "read_parameter_file"]

Entry = tuple[str, ...]
"""Where an option lands in the document: ("prune", "n_layers"), ("quick_eval",) for a whole section."""

FILE_KEYS = ("model", "revision", "quality", "prune", "calibration", "evaluation", "data_dir", "allow_pickle",
             "trust_remote_code")
"""Keys of a parameter file that ``prunecomp prune`` uses."""
PIPELINE_KEYS = ("quick_eval", "max_ppl_ratio", "qa_tasks", "qa_limit", "run_name", "tracking",
                 "parallel_candidates", "stream_layers")
"""Keys of a parameter file that only ``prunecomp run`` (and the deployments) use; ``prune`` ignores them."""

_HOW_MANY = ("n_layers", "fraction")


def load_config_file(path: str) -> dict[str, Any]:
    """A YAML/JSON file as a mapping (one ``error:`` line when it cannot be read or is not one)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PrunecompError(f"cannot read config file {path!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise PrunecompError(f"config file {path!r} must hold a mapping of parameters")
    return data


def read_parameter_file(path: str) -> dict[str, Any]:
    """A parameter file, checked: unknown keys are one ``error:`` line, and the ``prune`` section (flat, the tree
    of stages, or mixed) comes back flat."""
    data = load_config_file(path)
    unknown = sorted(set(data) - set(FILE_KEYS) - set(PIPELINE_KEYS))
    if unknown:
        raise PrunecompError(f"config file {path!r}: unknown key(s) {', '.join(unknown)} (it takes "
                             f"{', '.join(FILE_KEYS)}; and, for `prunecomp run`, {', '.join(PIPELINE_KEYS)})")
    try:
        data["prune"] = flatten_tree(dict(data.get("prune") or {}))
    except ValueError as exc:
        raise PrunecompError(f"config file {path!r}: prune: {exc}") from exc
    return data


def merge(file: Mapping[str, Any], flags: Mapping[str, Any], given: set[Entry]) -> dict[str, Any]:
    """The rule, on plain documents: ``flags`` (every option, defaults included) under ``file``, then every entry
    in ``given`` (the options the user gave) set back to the flags' value, or removed where the flags have none.

    A section the file sets to null stays null unless a flag inside it is given (then the flags' section)."""
    out = copy.deepcopy(dict(flags))
    for key, value in file.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **copy.deepcopy(dict(value))}
        else:
            out[key] = copy.deepcopy(value)
    for path in sorted(given, key=len):  # whole sections before their entries
        source: Any = flags
        target: dict[str, Any] = out
        for part in path[:-1]:
            source = source.get(part) if isinstance(source, Mapping) else None
            if not isinstance(target.get(part), dict):  # a section the file nulled or left out
                target[part] = copy.deepcopy(dict(source)) if isinstance(source, Mapping) else {}
            target = target[part]
        if isinstance(source, Mapping) and path[-1] in source:
            target[path[-1]] = copy.deepcopy(source[path[-1]])
        else:
            target.pop(path[-1], None)
    return out


def merged_parameters(kw: Mapping[str, Any], explicit: set[str], flags: dict[str, Any],
                      paths: Mapping[str, tuple[Entry, ...]], keep: tuple[str, ...]) -> dict[str, Any]:
    """The run's parameter document: ``flags`` (what the options say, every default included; ``prune`` only the
    fields given plus how many layers go, since the quality level fills the rest) merged with ``--config``'s file
    by :func:`merge`, keeping the keys ``keep``. ``explicit``: the options the user gave; ``paths``: where each
    option lands."""
    if not kw.get("config"):
        return {k: v for k, v in flags.items() if k in keep}
    file = read_parameter_file(str(kw["config"]))
    flags = copy.deepcopy(flags)
    how_many = set(_HOW_MANY) & explicit
    if not how_many and set(_HOW_MANY) & set(file["prune"]):  # the file says how many: not the flags' default
        for name in _HOW_MANY:
            flags["prune"].pop(name, None)
    given = {path for name in explicit for path in paths.get(name, ())}
    out = merge({k: v for k, v in file.items() if k in keep}, flags, given)
    if how_many:  # one way of saying how many: the flag's
        for name in set(_HOW_MANY) - how_many:
            out["prune"].pop(name, None)
    return {k: v for k, v in out.items() if k in keep}

