"""Fixtures for the integration tests: a real MLflow tracking server and throw-away git + DVC projects.

Nothing here is mocked: the server is `mlflow server` on 127.0.0.1, the stages run through the `rlhf` command and
DVC through the `dvc` command, each in a subprocess. Module- and session-scoped fixtures run before the autouse
environment isolation of tests/conftest.py, so every subprocess gets an explicit environment from `base_env()`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import BIN, base_env  # noqa: E402


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stops the server and the workers it spawned (its own process group, started by this fixture).

    The group is signalled even when the `mlflow server` process itself has already exited: its uvicorn child may not.
    """

    def group_alive() -> bool:
        process.poll()  # reaps the leader once it has exited
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while group_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not group_alive():
            return


class MlflowServer:
    def __init__(self, url: str, root: Path):
        self.url = url
        self.root = root
        self.artifacts = root / "artifacts"
        self.log = root / "server.log"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real `mlflow server` (SQLite backend, proxied artifacts in a tmp folder) for the whole session."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(BIN / "mlflow"), "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    server = MlflowServer(url, root)
    with open(server.log, "wb") as log:
        # The server's job runner (GenAI scorers, seven Huey worker processes) is not used here; on a 2-core machine
        # it would slow both the start-up and the training the tests run.
        env = base_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited {process.returncode}:\n{server.log.read_text()[-6000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200 and response.read().strip() == b"OK":
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health within 180 s:\n{server.log.read_text()[-6000:]}")
            time.sleep(0.5)
        yield server
    finally:
        _stop(process)




@pytest.fixture
def make_dvc_project(tmp_path: Path):
    """A factory: `make_dvc_project(name="project", params=None)` copies the project's DVC skeleton into a fresh git
    repo under tmp_path (see `_support.make_project`) and returns its folder."""
    from _support import make_project

    def factory(name: str = "project", params: dict | None = None) -> Path:
        return make_project(tmp_path / name, params)

    return factory
