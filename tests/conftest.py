"""Shared fixtures: paths to the real small model and data beside the checkout, tiny random models per family."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.needs_shared import missing

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
DATA = SHARED / "data"


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not (STORIES / "config.json").is_file():
        missing(f"real test model missing: {STORIES}")
    return STORIES


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "README.md").is_file():
        missing(f"shared data missing: {DATA}")
    return DATA


@pytest.fixture(scope="session")
def quality() -> Any:
    """bench/quality.py as a module (bench/ is not a package: imported by path, as bench/results_doc.py imports it;
    its recovered share imports bench/measures.py and its anchors bench/anchors.py when first used)."""
    import sys

    bench = str(Path(__file__).resolve().parents[1] / "bench")
    sys.path.insert(0, bench)
    try:
        import anchors  # noqa: F401
        import measures  # noqa: F401
        import quality
    finally:
        sys.path.remove(bench)
    return quality
