"""A real, small filesystem (tmpfs) for full-disk tests: a full disk, not a simulation. Needs root to mount;
where that is not possible the test is skipped with the reason (it is a property of the machine, not of
../shared)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["grow", "small_filesystem"]


@contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (e.g. ``"400k"``) at ``where`` for the block; always unmounted after."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def grow(where: Path, size: str) -> None:
    """Free space: remount the tmpfs at ``where`` with ``size``."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)
