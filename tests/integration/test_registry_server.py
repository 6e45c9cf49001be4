"""The model registry on a real MLflow tracking server: `rlhf register` in a subprocess registers the tiny models
there, and a fresh process loads the champion back from the server with `mlflow.pyfunc` and generates.

The server is shared by the whole session, so the registered model names carry a unique suffix.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from _support import base_env, run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "registry"))

from registry_helpers import ROLES, aliases, concurrent_registrations, server_project, versions

pytestmark = pytest.mark.slow

LOAD_AND_PREDICT = """
import json, sys
import mlflow

policy, reward = sys.argv[1:]
answers = mlflow.pyfunc.load_model(f"models:/{policy}@champion").predict(["A review."])
scores = mlflow.pyfunc.load_model(f"models:/{reward}@champion").predict(["A review."])
print(json.dumps({"answers": answers if isinstance(answers, list) else repr(answers),
                  "scores": [float(score) for score in scores["score"]]}))
"""


def test_register_on_a_tracking_server_then_serve_the_champion_from_it(mlflow_server, tmp_path: Path) -> None:
    """Versions, tags and aliases reach the server; registering again finds the versions there (unchanged); the
    champion policy loads from the server in another process and answers a review with text."""
    from mlflow import MlflowClient

    from rlhf.registry import content_hash

    project, names, register = server_project(tmp_path)
    env = base_env(MLFLOW_TRACKING_URI=mlflow_server.url, OMP_NUM_THREADS="1")

    run(register, cwd=project.root, env=env)

    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    for role in ROLES:
        assert list(versions(client, names[role])) == [1], role
        assert aliases(client, names[role]) == {"candidate": 1, "champion": 1}, role
        tags = versions(client, names[role])[1].tags
        assert tags["rlhf.model_sha256"] == content_hash(project.model_folder(role)), role
    assert versions(client, names["policy"])[1].tags["rlhf.upstream.reward"] == f"{names['reward']}/1"

    again = run(register, cwd=project.root, env=env)
    assert again.stdout.count("already registered; unchanged") == 3, again.stdout
    assert all(list(versions(client, names[role])) == [1] for role in ROLES)

    consumer = tmp_path / "consumer"
    consumer.mkdir()
    served = run([sys.executable, "-c", LOAD_AND_PREDICT, names["policy"], names["reward"]], cwd=consumer, env=env)
    predicted = json.loads(served.stdout.strip().splitlines()[-1])
    assert isinstance(predicted["answers"], list) and len(predicted["answers"]) == 1, predicted
    assert isinstance(predicted["answers"][0], str) and predicted["answers"][0].strip(), predicted
    assert len(predicted["scores"]) == 1


def test_concurrent_registrations_on_a_tracking_server_leave_one_version_per_model(
    mlflow_server, tmp_path: Path
) -> None:
    """On a server (which no file lock reaches), four `rlhf register` at once leave one version
    of each model; the ones that lost the race remove their own and report the existing one."""
    from mlflow import MlflowClient

    project, names, register = server_project(tmp_path)
    env = base_env(MLFLOW_TRACKING_URI=mlflow_server.url, OMP_NUM_THREADS="1")
    results = concurrent_registrations(register, project.root, env)

    assert [result.returncode for result in results] == [0] * 4, [result.stderr[-2000:] for result in results]
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    for role in ROLES:
        assert len(versions(client, names[role])) == 1, (role, list(versions(client, names[role])))
        (only,) = versions(client, names[role])
        assert aliases(client, names[role]) == {"candidate": only, "champion": only}, role
