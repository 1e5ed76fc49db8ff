"""What a test does when ``../shared`` (the real small model, the data) is not beside the checkout."""

from __future__ import annotations

import os

import pytest

__all__ = ["missing"]


def missing(what: str) -> None:
    """Skip on a developer's machine; fail in CI (``CI`` set, as ``.ci/run`` runs), so that a CI run can never
    pass with most of the suite skipped."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI needs ../shared beside the checkout)", pytrace=False)
    pytest.skip(what)
