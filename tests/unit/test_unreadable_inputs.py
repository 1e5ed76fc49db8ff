"""Damaged inputs read from disk are one clear error (a :class:`PrunecompError`), never a traceback from inside
torch or safetensors: a recipe part of unknown type, refinement gains naming a parameter, a safetensors header
that disagrees with itself."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from prunecomp.errors import PrunecompError
from prunecomp.models.tensorfiles import LazyTensors, read_safetensors_header
from prunecomp.recipes.apply import apply_refine
from prunecomp.recipes.recipe import RefineEdit
from tests.tiny_models import tiny_model


def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_header_offsets_that_do_not_match_the_shape_are_refused(tmp_path) -> None:
    bad = _safetensors(tmp_path / "bad.safetensors",
                       {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}, b"\0" * 64)
    with pytest.raises(PrunecompError, match=r"offsets \[0, 16\] hold 16 bytes.*needs 64"):
        read_safetensors_header(bad)
    with pytest.raises(PrunecompError, match="not a readable safetensors file"):
        LazyTensors(bad)["w"]
    odd = _safetensors(tmp_path / "odd.safetensors", {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}},
                       b"\0\0")
    with pytest.raises(PrunecompError, match="unknown dtype"):
        read_safetensors_header(odd)
    good = _safetensors(tmp_path / "good.safetensors",
                        {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 16)
    assert read_safetensors_header(good)[0]["w"]["shape"] == [2, 2]


def test_gains_naming_a_parameter_are_refused() -> None:
    model = tiny_model("llama")
    name = "model.layers.0.self_attn.o_proj"
    width = model.get_submodule(name).weight.shape[0]
    with pytest.raises(PrunecompError, match="not a module with a weight"):
        apply_refine(model, RefineEdit({f"{name}.weight": ("linear", 0.0, torch.ones(width))}))
    with pytest.raises(PrunecompError, match="kind 'norm' or 'linear'"):
        apply_refine(model, RefineEdit({name: ("scale", 0.0, torch.ones(width))}))
    apply_refine(model, RefineEdit({name: ("linear", 0.0, torch.ones(width))}))  # the right form still folds


def test_recipe_part_of_unknown_type_is_refused(tmp_path) -> None:
    from tasks.working import PART_FILE, read_part

    part = tmp_path / "part"
    part.mkdir()
    (part / PART_FILE).write_text(json.dumps({"part": {"type": "lora"}}))
    with pytest.raises(PrunecompError, match="has type 'lora'; expected one of"):
        read_part(str(part))
