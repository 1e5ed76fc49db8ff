"""Every method setting on every tiny family does what it did when the record was written
(``python -m tests.golden.recipes --write``): same layers removed, same scales, the same tensors within float
rounding (:data:`tests.golden.recipes.RTOL`). The net under a refactor of the engine."""

from __future__ import annotations

import json
import math

import pytest

from tests.golden.recipes import RECORD, RTOL, SETTINGS, run
from tests.tiny_models import FAMILIES

GOLDEN = json.loads(RECORD.read_text())


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_same_recipe_and_tensors_as_recorded(family: str, setting: str) -> None:
    want, got = GOLDEN[f"{family}/{setting}"], run(family, setting)
    assert got["removed"] == want["removed"]
    assert [s is None for s in got["scales"]] == [s is None for s in want["scales"]]
    for a, b in zip(got["scales"], want["scales"], strict=True):
        assert a is None or math.isclose(a, b, rel_tol=1e-6)
    for part in ("model", "recipe"):
        assert sorted(got[part]) == sorted(want[part]), part
        for name, value in want[part].items():
            assert math.isclose(got[part][name], value, rel_tol=RTOL, abs_tol=RTOL), (part, name)
