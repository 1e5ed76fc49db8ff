"""Quality levels: one table that turns a goal (``fast``, ``balanced``, ``best``) into the method's stages and
their settings, so a user gives k and a level and nothing else.

- ``fast``: Prune&Comp with guarded compensation (the paper's gap scale, folded only as far as it lowers the
  calibration loss); minutes on a CPU for 135M.
- ``balanced``: ``fast`` plus per-channel gains fitted to the dense model's predictions after the last removal
  (``refine: channels``, the tail loss), about a quarter of an hour more on one CPU core for 135M.
- ``best``: block reconstruction of the layers on both sides of every gap (100 Adam steps) plus the gains.

Every level keeps zero run-time cost: whatever is fitted is folded into the remaining weights.

Settings are rules, not values fitted to one model: the fitting windows are ``max(64, calibration windows)``
(a superset of the scoring windows, as refinement requires). Flags a user gives explicitly override the level;
:func:`apply_level` returns what was overridden so reports, recipes and MLflow record it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_args

from prunecomp.config import PruneConfig, flatten_tree
from prunecomp.errors import PrunecompError

__all__ = ["DEFAULT_LEVEL", "LEVELS", "MEASURED_RECOVERY", "MEASURED_SECONDS", "Level", "apply_level", "describe",
           "level_settings", "measured_cost", "measured_recovery", "resolve"]

Level = Literal["fast", "balanced", "best"]
DEFAULT_LEVEL: Level = "fast"

FIT_WINDOWS_MIN = 64
"""Fewest windows the gains and block reconstruction fit on: 8 windows (the cpu preset's scoring windows)
overfit the gains; 64 recovered most of the degradation at k = 3, 5 and 8 on the quality protocol."""

_OFF: dict[str, Any] = {"refine": "none", "reconstruct": "none", "refit": "none"}
_GAINS: dict[str, Any] = {"refine": "channels", "refine_at": "end", "refine_steps": 80, "refine_lr": 3e-3,
                          "refine_loss": "tail"}

LEVELS: dict[str, dict[str, Any]] = {
    "fast": {"compensation": "guarded", **_OFF},
    "balanced": {"compensation": "guarded", **_OFF, **_GAINS},
    "best": {"compensation": "guarded", **_OFF, **_GAINS, "reconstruct": "both", "reconstruct_steps": 100,
             "reconstruct_lr": 1e-3},
}
"""Level -> :class:`~prunecomp.config.PruneConfig` fields. ``refine_samples`` is a rule (:func:`level_settings`)."""

MEASURED_RECOVERY: dict[str, tuple[float, float, float]] = {
    "fast": (-4.0, 12.7, 35.0),
    "balanced": (43.8, 57.2, 67.9),
    "best": (72.6, 72.0, 72.5),
}
"""Recovered share (%) of the naive removal's perplexity degradation at k = 3 / 5 / 8 on the quality protocol
(SmolLM2-135M; docs/RESULTS.md#quality-levels: the mean over the calibration seeds measured, a single run where
only one was), quoted by ``--help``. tests/unit/test_docs.py checks every value
against the result files the README quotes, so the help cannot drift from what was measured."""


MEASURED_SECONDS: dict[str, tuple[float, float, float]] = {
    "fast": (28, 42, 61),
    "balanced": (971, 987, 1024),
    "best": (2211, 2412, 3010),
}
"""Seconds a run of each level takes at k = 3 / 5 / 8 on the same protocol and files as
:data:`MEASURED_RECOVERY` (one CPU thread, beside other work: the files record the load), quoted by ``--help``
and checked the same way."""


def measured_recovery() -> str:
    """The measured recovery of every level in one phrase, for ``--help``."""
    return ", ".join(f"{level} {'/'.join(f'{v:.0f}' for v in values)}%" for level, values in
                     MEASURED_RECOVERY.items())


def measured_cost() -> str:
    """The measured seconds of every level in one phrase, for ``--help``."""
    return ", ".join(f"{level} {'/'.join(f'{v:.0f}' for v in values)} s" for level, values in
                     MEASURED_SECONDS.items())


def level_settings(level: str, calibration_windows: int) -> dict[str, Any]:
    """The :class:`~prunecomp.config.PruneConfig` fields ``level`` sets for a run scoring on
    ``calibration_windows`` windows."""
    if level not in LEVELS:
        raise PrunecompError(f"--quality must be one of {', '.join(get_args(Level))}, got {level!r}")
    settings = dict(LEVELS[level])
    if settings["refine"] != "none" or settings["reconstruct"] != "none":
        settings["refine_samples"] = max(FIT_WINDOWS_MIN, int(calibration_windows))
    return settings


def resolve(level: str, given: Mapping[str, Any], calibration_windows: int) -> tuple[dict[str, Any],
                                                                                  dict[str, Any]]:
    """The prune fields of a run: ``level``'s settings under the fields the user ``given`` (flags, or the ``prune``
    section of a config file). Returns them and ``{field: {"level": v, "given": v}}`` for every given field that
    differs from the level: the record of what the user overrode. The one rule shared by ``prune``, ``run``, config
    files, the deployments and the library."""
    settings = level_settings(level, calibration_windows)
    given = flatten_tree(dict(given))  # a config file's prune section may be the tree
    overridden = {name: {"level": value, "given": given[name]} for name, value in settings.items()
                  if name in given and not _same(given[name], value)}
    return {**settings, **given}, overridden


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return float(a) == float(b)
    return bool(a == b)


def apply_level(config: PruneConfig, level: str, calibration_windows: int,
                explicit: Iterable[str] = ()) -> tuple[PruneConfig, dict[str, Any]]:
    """``config`` with ``level``'s settings, except the fields in ``explicit`` (the flags the user gave), which
    keep ``config``'s values; and what was overridden (:func:`resolve`)."""
    given = {name: getattr(config, name) for name in explicit if name in PruneConfig.model_fields}
    fields, overridden = resolve(level, given, calibration_windows)
    return PruneConfig.model_validate(config.model_dump() | fields), overridden


def describe(level: str, overridden: Mapping[str, Any]) -> str:
    """One line for logs and summaries: the level and what the user overrode."""
    if not overridden:
        return f"quality {level}"
    return f"quality {level}, overridden: " + ", ".join(f"{k}={v['given']}" for k, v in sorted(overridden.items()))
