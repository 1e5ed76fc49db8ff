"""Save a (pruned) model as a plain HF folder: safetensors weights, config, tokenizer, and the prunecomp report."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from prunecomp.models.storage import REPORT_FILE, write_dir
from prunecomp.recipes.recipe import Recipe, write_recipe_files

__all__ = ["REPORT_FILE", "save_pruned"]


def save_pruned(
    model: nn.Module,
    tokenizer: Any,
    uri: str,
    *,
    report: dict[str, Any] | None = None,
    recipe: Recipe | None = None,
    overwrite: bool = False,
    owned: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> str:
    """Write ``model`` + ``tokenizer`` (+ ``report``, + ``recipe``) to ``uri`` (local path or fsspec URL),
    atomically. ``extra(folder)`` adds more files to the same atomic folder (the pipeline's MLflow Model files).
    ``overwrite`` replaces an earlier prunecomp result; ``owned`` is for the pipeline store's own keyed folders
    (:func:`prunecomp.models.storage.write_dir`)."""

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
        if recipe is not None:
            write_recipe_files(recipe, tmp)
        if extra is not None:
            extra(tmp)

    return write_dir(uri, fill, overwrite=overwrite, owned=owned)
