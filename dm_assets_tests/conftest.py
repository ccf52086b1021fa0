"""Fixtures shared by every test module (helpers live in :mod:`dm_assets_tests.helpers`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from dm_assets_tests.slurm_cluster import slurm_cluster

__all__ = ["slurm_cluster", "write_spec"]


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[[dict], Path]:
    """Write a spec dict to a JSON file in tmp_path and return its path."""
    counter = iter(range(1_000_000))

    def write(spec: dict) -> Path:
        path = tmp_path / f"spec{next(counter)}.json"
        path.write_text(json.dumps(spec))
        return path

    return write
