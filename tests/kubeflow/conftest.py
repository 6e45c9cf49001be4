"""Fixtures for the Kubeflow tests: the fake KFP API server, an isolated kfp client, and the CLI run in-process."""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kfp_api_server import KfpApiServer

# Settings kfp.Client reads from the environment; a developer's shell must not redirect the tests.
KFP_ENVIRONMENT = (
    "KF_PIPELINES_ENDPOINT",
    "KF_PIPELINES_UI_ENDPOINT",
    "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
    "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME",
    "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID",
    "KF_PIPELINES_APP_OAUTH2_CLIENT_ID",
    "KF_PIPELINES_APP_OAUTH2_CLIENT_SECRET",
)


@pytest.fixture(autouse=True)
def _isolated_kfp_client(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """kfp.Client reads ~/.config/kfp/context.json and KF_PIPELINES_* variables: point both at nothing."""
    from kfp.client import client

    for key in KFP_ENVIRONMENT:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path_factory.mktemp("kfp-home") / "context.json"))


@pytest.fixture
def kfp_server() -> Iterator[KfpApiServer]:
    """A fresh fake KFP API on 127.0.0.1 and a free port, stopped after the test."""
    server = KfpApiServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kfp_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The sleeps kfp's client asks for between retries, recorded instead of slept.

    `Client.get_kfp_healthz` retries an error answer 5 times, 5 s apart; recording keeps a test that reaches that
    path fast without changing what the client does or what it raises.
    """
    from kfp.client import client

    sleeps: list[float] = []
    fake_time = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    fake_time.sleep = sleeps.append
    monkeypatch.setattr(client, "time", fake_time)
    return sleeps


@dataclass
class CliResult:
    code: int
    out: str
    err: str
    tracebacks: list[str]  # log records with a traceback: a user without logging set up sees them on stderr

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    @property
    def out_lines(self) -> list[str]:
        return [line for line in self.out.splitlines() if line.strip()]


@pytest.fixture
def rlhf(
    capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., CliResult]:
    """Runs `rlhf ARGS...` in-process (rlhf.cli.main) in folder `cwd`; returns its exit code and output."""
    from rlhf import cli

    def run(*args: str, cwd: Path) -> CliResult:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            code = cli.main(list(args))
        captured = capsys.readouterr()
        tracebacks = [f"{record.name}: {record.getMessage()}" for record in caplog.records if record.exc_info]
        return CliResult(code, captured.out, captured.err, tracebacks)

    return run
