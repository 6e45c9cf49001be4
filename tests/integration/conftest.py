"""Fixtures for the integration tests: real servers (S3, PostgreSQL, MLflow) and throw-away git + DVC projects.

Nothing here is mocked: the S3 endpoint is moto's server, the tracking servers are `mlflow server` processes (SQLite
or PostgreSQL backend store, artifacts in S3), all on 127.0.0.1 and started here; the stages run through the `rlhf`
command and DVC through the `dvc` command, each in a subprocess. Module- and session-scoped fixtures run before the
autouse environment isolation of tests/conftest.py, so every subprocess gets an explicit environment from
`base_env()`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import BIN, base_env
from servers import ARTIFACT_BUCKET, MlflowServer, PostgresServer, S3Endpoint


def _start_mlflow(root: Path, backend: str, s3_endpoint: S3Endpoint) -> MlflowServer:
    # The server's job runner (GenAI scorers, seven Huey worker processes) is not used here; on a 2-core machine it
    # would slow both the start-up and the training the tests run.
    env = base_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **s3_endpoint.env)
    server = MlflowServer(root, backend, f"s3://{ARTIFACT_BUCKET}/{root.name}", env)
    try:
        server.start(BIN / "mlflow")
    except RuntimeError as exc:
        server.stop()
        pytest.fail(str(exc))
    return server


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint: S3Endpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real `mlflow server` for the session: SQLite backend store, artifacts proxied to the S3 endpoint."""
    root = tmp_path_factory.mktemp("mlflow-server")
    server = _start_mlflow(root, f"sqlite:///{root / 'mlflow.db'}", s3_endpoint)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1 (Debian's package; `.ci/run` installs it)."""
    if PostgresServer.find_binaries() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: .ci/run installs Debian's postgresql package")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_server_postgres(
    postgres: PostgresServer, s3_endpoint: S3Endpoint, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """`mlflow server` with a PostgreSQL backend store, artifacts proxied to the S3 endpoint."""
    server = _start_mlflow(tmp_path_factory.mktemp("mlflow-postgres"), postgres.url, s3_endpoint)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_dvc_project(tmp_path: Path):
    """A factory: `make_dvc_project(name="project", params=None)` copies the project's DVC skeleton into a fresh git
    repo under tmp_path (see `_support.make_project`) and returns its folder."""
    from _support import make_project

    def factory(name: str = "project", params: dict | None = None) -> Path:
        return make_project(tmp_path / name, params)

    return factory
