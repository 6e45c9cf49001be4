"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

# The real sample datasets live beside the project (never inside it): <project>/../shared/datasets.
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture
def shared_datasets() -> Path:
    """The shared datasets folder; tests that need it are skipped where it is absent."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATASETS}")
    return SHARED_DATASETS
