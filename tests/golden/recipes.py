"""Golden recipes: what each method setting does to every tiny family, recorded before the engine is refactored.

``python -m tests.golden.recipes --write`` records, per (family, setting), the removed layers, each step's folded
scale and a float64 sum of every tensor of the final model and of the recipe; the test compares a fresh run with
the record. Sums, not bytes: a refactor may change the order of operations within float rounding (and the thread
count of a run changes the last bits of a matmul), which the tolerance (``RTOL``) states, while a different
layer, scale or fit moves them far more.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch

from prunecomp.config import PruneConfig
from prunecomp.engine.compress import compress
from tests.tiny_models import FAMILIES, tiny_model, tokens

__all__ = ["RTOL", "SETTINGS", "record", "run"]

RECORD = Path(__file__).with_name("recipes.json")
RTOL = 1e-4
"""Relative tolerance of a tensor sum against its record (same layers, same folds, float rounding only)."""

SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {"compensation": "magnitude"},
    "naive": {"compensation": "none"},
    "lsq": {"compensation": "lsq"},
    "reconstruct": {"reconstruct": "both", "reconstruct_steps": 4, "reconstruct_batch": 2},
    "refit": {"refit": "sequential", "refit_steps": 4},
    "progressive": {"refine": "norms", "refine_at": "each", "refine_steps": 3},
}


def run(family: str, setting: str) -> dict[str, Any]:
    """One tiny run: its removed layers, scales, and per-tensor sums of the model and the recipe."""
    torch.manual_seed(0)
    source, ids = tiny_model(family), tokens(8, 16)
    model = copy.deepcopy(source)
    config = PruneConfig(n_layers=2, **SETTINGS[setting])
    report = compress(model, ids, config, batch_size=4, teacher=source, dense=source)
    recipe = report.recipe({"content_hash": "golden", "architecture": type(model).__name__})
    _, tensors = recipe.to_json()
    return {"removed": list(report.removed), "scales": [s.scale for s in recipe.steps],
            "model": {n: float(t.double().sum()) for n, t in sorted(model.state_dict().items())},
            "recipe": {n: float(tensors[n].double().sum()) for n in sorted(tensors)}}


def record() -> dict[str, Any]:
    return {f"{family}/{setting}": run(family, setting) for family in FAMILIES for setting in SETTINGS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", action="store_true", help=f"record {RECORD.name} from this checkout")
    args = ap.parse_args()
    if args.write:
        RECORD.write_text(json.dumps(record(), indent=1, sort_keys=True) + "\n")
        print(f"wrote {RECORD}")


if __name__ == "__main__":
    main()
