"""Fixtures for the registry tests: tiny model folders built once per session, and a fresh project per test whose
MLflow tracking store and registry are a SQLite file inside it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from registry_helpers import ModelStore, Project


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """Untrained tiny models by (role, seed); each is built the first time a test asks for it (well under 2 s)."""
    return ModelStore(tmp_path_factory.mktemp("registry-models"))


@pytest.fixture(scope="session")
def empty_tracking_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with its schema created and nothing in it.

    Creating the schema runs every MLflow database migration (5-8 s on a busy 2-core machine); each project starts
    from a copy of this file instead.
    """
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("empty-tracking-db") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}", registry_uri=f"sqlite:///{path}").search_registered_models()
    return path


@pytest.fixture
def project(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    model_store: ModelStore,
    empty_tracking_db: Path,
    _isolated_environment: None,
) -> Project:
    """The test runs inside a fresh project (tiny params.yaml) tracking to `<project>/mlflow.db` (an empty store).

    Depends on `_isolated_environment` (tests/conftest.py), which clears MLFLOW_TRACKING_URI: it must run first.
    """
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(empty_tracking_db, folder / "mlflow.db")
    project = Project(folder, model_store)
    project.write_params()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", project.tracking_uri)
    return project
