"""The one rule that merges a parameter file with the flags given beside it (a flag given wins, then the file,
then the flag's default), as a pure function on documents."""

from __future__ import annotations

import pytest

from prunecomp.cli.parameters import FILE_KEYS, PIPELINE_KEYS, merge, merged_parameters, read_parameter_file
from prunecomp.errors import PrunecompError

FLAGS = {"quality": "fast", "prune": {"n_layers": 5}, "calibration": {"n_samples": 8, "seq_len": 512},
         "evaluation": {"datasets": ("wikitext2",), "seq_len": 512}, "tracking": {"log_and_register": True},
         "quick_eval": {"datasets": ("wikitext2",), "max_windows": 8}}


def test_the_file_beats_defaults_and_a_given_flag_beats_the_file() -> None:
    file = {"quality": "best", "calibration": {"n_samples": 32}, "tracking": {"registered_model": "f"}}
    out = merge(file, FLAGS, given=set())
    assert out["quality"] == "best" and out["calibration"] == {"n_samples": 32, "seq_len": 512}
    assert out["tracking"] == {"log_and_register": True, "registered_model": "f"}
    out = merge(file, {**FLAGS, "quality": "balanced"}, given={("quality",), ("calibration", "n_samples")})
    assert out["quality"] == "balanced" and out["calibration"] == {"n_samples": 8, "seq_len": 512}
    assert FLAGS["calibration"] == {"n_samples": 8, "seq_len": 512}  # the inputs are not changed


def test_a_whole_section_given_replaces_the_files_and_a_flag_without_value_removes_the_entry() -> None:
    file = {"quick_eval": {"datasets": ("c4",), "max_windows": 2}, "tracking": {"store": "s3://b/p"}}
    out = merge(file, FLAGS, given={("quick_eval",), ("tracking", "store")})
    assert out["quick_eval"] == FLAGS["quick_eval"] and "store" not in out["tracking"]


def test_a_section_the_file_nulls_stays_null_unless_a_flag_inside_it_is_given() -> None:
    assert merge({"evaluation": None}, FLAGS, given=set())["evaluation"] is None
    out = merge({"evaluation": None}, FLAGS, given={("evaluation", "seq_len")})
    assert out["evaluation"] == FLAGS["evaluation"]


def _file(tmp_path, text: str) -> dict:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return {"config": str(path)}


def test_how_many_layers_is_one_choice(tmp_path) -> None:
    paths = {"n_layers": (("prune", "n_layers"),), "fraction": (("prune", "fraction"),)}
    kw = _file(tmp_path, "prune: {fraction: 0.2}\n")
    assert merged_parameters(kw, set(), FLAGS, paths, FILE_KEYS)["prune"] == {"fraction": 0.2}
    flags = {**FLAGS, "prune": {"n_layers": 3}}
    assert merged_parameters(kw, {"n_layers"}, flags, paths, FILE_KEYS)["prune"] == {"n_layers": 3}
    kw = _file(tmp_path, "prune: {n_layers: 4}\n")
    flags = {**FLAGS, "prune": {"fraction": 0.1}}
    assert merged_parameters(kw, {"fraction"}, flags, paths, FILE_KEYS)["prune"] == {"fraction": 0.1}


def test_the_file_reader_takes_the_tree_and_refuses_unknown_keys(tmp_path) -> None:
    data = read_parameter_file(_file(tmp_path, "prune: {removal: {n_layers: 4}, reconstruct: {lr: 0.003}}\n")
                               ["config"])
    assert data["prune"] == {"n_layers": 4, "reconstruct_lr": 0.003}
    with pytest.raises(PrunecompError, match="unknown key"):
        read_parameter_file(_file(tmp_path, "prnue: {}\n")["config"])
    kw = _file(tmp_path, "quick_eval: null\nmax_ppl_ratio: 4.0\n")  # pipeline keys: kept only where asked
    assert "max_ppl_ratio" not in merged_parameters(kw, set(), FLAGS, {}, FILE_KEYS)
    assert merged_parameters(kw, set(), {**FLAGS, "max_ppl_ratio": None}, {}, FILE_KEYS + PIPELINE_KEYS)[
        "max_ppl_ratio"] == 4.0
