"""The tracking store before any work: an unreachable server is waited for a bounded time with progress, then one
line; a database file that is not one is named; credentials in a URI never reach the terminal."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from rlhf import tracking


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://alice:supersecret456@127.0.0.1:9", "http://alice:***@127.0.0.1:9"),
        ("error: MLflow at https://u:p%40ss@host/path: refused", "error: MLflow at https://u:***@host/path: refused"),
        (
            "postgresql://mlflow:pw@db:5432/mlflow and s3://bucket/key",
            "postgresql://mlflow:***@db:5432/mlflow and s3://bucket/key",
        ),
        ("http://token@host:5000", "http://token@host:5000"),  # a user name alone is no secret
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ],
)
def test_redact_hides_the_password_of_every_uri(text: str, expected: str) -> None:
    assert tracking.redact(text) == expected


def test_an_unreachable_server_is_waited_for_with_progress_then_named_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unreachable server is named within the wait asked for (MLflow's own retries took about 4 minutes of
    silence, after which the registry commands said the version did not exist)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:hunter2@127.0.0.1:9")
    monkeypatch.setenv(tracking.WAIT_ENV, "5")
    started = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable) as failure:
        tracking.client()
    elapsed = time.monotonic() - started
    assert 3 <= elapsed < 10
    assert str(failure.value).startswith(
        "MLflow at http://bob:***@127.0.0.1:9 cannot be reached (connection refused) after "
    )
    progress = capsys.readouterr().out.splitlines()
    assert progress and all(
        line.startswith("MLflow at http://bob:***@127.0.0.1:9: connection refused; retrying") for line in progress
    )
    assert "hunter2" not in str(failure.value) + "".join(progress)


def test_the_default_wait_is_thirty_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tracking.WAIT_ENV, raising=False)
    assert tracking._wait_seconds() == 30


def test_a_running_server_is_used_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_port}")
        started = time.monotonic()
        assert tracking.require_store() == f"http://127.0.0.1:{server.server_port}"  # a 404 answers too
        assert time.monotonic() - started < 2
    finally:
        server.shutdown()


def test_sqlite_stores_that_cannot_work_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    garbage = tmp_path / "mlflow.db"
    garbage.write_text("not a database\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{garbage}")
    with pytest.raises(tracking.TrackingUnavailable, match=rf"^MLflow store {garbage}: not an SQLite database$"):
        tracking.require_store()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}")
    with pytest.raises(tracking.TrackingUnavailable, match=r"its folder .*nowhere does not exist"):
        tracking.require_store()

    database = tmp_path / "real.db"
    sqlite3.connect(database).close()  # an empty file is a database too
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    assert tracking.require_store() == f"sqlite:///{database}"
