"""`rlhf pipeline submit` against a real HTTP server that speaks the KFP v2beta1 REST API (kfp_api_server.py).

The CLI runs in-process (`rlhf.cli.main`) unless a test is about what a user sees on the terminal, where it runs as
a subprocess: there, log records and warnings reach stderr as they would for a user.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from kfp_api_server import KfpApiServer
from kubeflow_helpers import FULL_KUBEFLOW, LAYOUT, SUBMITTABLE, read_compiled, write_project

from rlhf.config import KFP_NULL, load_params
from rlhf.pipelines.rlhf_pipeline import compile_pipeline, pipeline_arguments

OVERRIDE = "ppo.learning_rate=0.0002"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A scratch folder holding the project's params.yaml (no kubeflow section)."""
    return write_project(tmp_path / "project", SUBMITTABLE)


def _submit(rlhf, project: Path, host: str, *extra: str):
    return rlhf("pipeline", "submit", "--host", host, *extra, cwd=project)


def _run_url(host: str, run: dict) -> str:
    return f"{host}/#/runs/details/{run['run_id']}"


def _expected_pipeline_spec(project: Path, overrides: list[str]) -> dict:
    """The PipelineSpec `rlhf pipeline compile` writes for these params, in the JSON form the client sends."""
    path = project / "expected.yaml"
    compile_pipeline(load_params(project / "params.yaml", overrides), str(path))
    spec = json_format.ParseDict(read_compiled(path).spec, pipeline_spec_pb2.PipelineSpec())
    return json_format.MessageToDict(spec)


# --- a run is filed -------------------------------------------------------------------------------------------


def test_submit_files_the_compiled_pipeline_with_the_params_as_arguments(
    rlhf, project: Path, kfp_server: KfpApiServer
) -> None:
    """The run carries the compiled pipeline inline and the params sections (with the --set override) as its
    arguments, is filed in a new experiment of the given name, and its URL is the last line printed."""
    result = _submit(rlhf, project, kfp_server.url, "--experiment", "exp", "--set", OVERRIDE, "--run-name", "r1")

    assert result.code == 0, result.err
    assert not result.tracebacks
    [run] = kfp_server.runs
    assert result.out_lines[-1] == _run_url(kfp_server.url, run)
    assert re.fullmatch(rf"{re.escape(kfp_server.url)}/#/runs/details/[0-9a-f-]{{36}}", result.out_lines[-1])

    [experiment] = kfp_server.experiments
    assert experiment["display_name"] == "exp"
    assert run["experiment_id"] == experiment["experiment_id"]
    assert run["display_name"] == "r1"

    spec = run["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "rlhf-pipeline"
    assert set(spec["root"]["dag"]["tasks"]) == LAYOUT["root"]
    for component, tasks in LAYOUT.items():
        if component != "root":
            assert set(spec["components"][component]["dag"]["tasks"]) == tasks
    assert spec == _expected_pipeline_spec(project, [OVERRIDE])

    arguments = run["runtime_config"]["parameters"]
    params = load_params(project / "params.yaml", [OVERRIDE])
    assert arguments == json.loads(json.dumps(pipeline_arguments(params)))
    assert arguments["ppo"]["learning_rate"] == 0.0002
    assert arguments["pretrain"]["base_model"] == KFP_NULL
    assert arguments["data_source"] == "demo"
    assert all(request.status == 200 for request in kfp_server.requests), kfp_server.requests


def test_submit_reuses_an_experiment_that_already_exists(rlhf, project: Path, kfp_server: KfpApiServer) -> None:
    """An experiment found by name is reused, not created again; a trailing slash on --host is harmless."""
    existing = kfp_server.add_experiment("exp")
    result = _submit(rlhf, project, kfp_server.url + "/", "--experiment", "exp")

    assert result.code == 0, result.err
    assert not kfp_server.requests_to("POST", "/experiments")
    [lookup, *_] = kfp_server.requests_to("GET", "/experiments")
    assert json.loads(lookup.query["filter"][0])["predicates"][0]["stringValue"] == "exp"
    [run] = kfp_server.runs
    assert run["experiment_id"] == existing["experiment_id"]
    assert result.out_lines[-1] == _run_url(kfp_server.url, run)


def test_submit_defaults_to_the_configured_experiment_in_the_given_namespace(
    rlhf, project: Path, kfp_server: KfpApiServer
) -> None:
    """Without --experiment the run goes to kubeflow.experiment; --namespace scopes the lookup and the new
    experiment to that profile."""
    result = _submit(rlhf, project, kfp_server.url, "--namespace", "team-a", "--set", "kubeflow.experiment=nightly")

    assert result.code == 0, result.err
    lookups = kfp_server.requests_to("GET", "/experiments")
    assert lookups and all(request.query.get("namespace") == ["team-a"] for request in lookups)
    [experiment] = kfp_server.experiments
    assert (experiment["display_name"], experiment["namespace"]) == ("nightly", "team-a")
    assert kfp_server.runs[0]["experiment_id"] == experiment["experiment_id"]


def test_submit_sends_the_kubernetes_platform_spec(rlhf, tmp_path: Path, kfp_server: KfpApiServer) -> None:
    """With Kubernetes settings the run carries the platform spec too (secret, PVC, node selector), and the
    executors' resources."""
    project = write_project(tmp_path / "project", FULL_KUBEFLOW)
    result = _submit(rlhf, project, kfp_server.url, "--run-name", "with-k8s")

    assert result.code == 0, result.err
    [run] = kfp_server.runs
    assert set(run["pipeline_spec"]) == {"pipeline_spec", "platform_spec"}
    ppo = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-ppo"]
    assert ppo["secretAsEnv"][0]["secretName"] == FULL_KUBEFLOW["secret"]
    assert ppo["pvcMount"][0]["mountPath"] == "/home/rlhf/.cache/huggingface"
    assert ppo["nodeSelector"]["labels"] == FULL_KUBEFLOW["node_selector"]
    resources = run["pipeline_spec"]["pipeline_spec"]["deploymentSpec"]["executors"]["exec-ppo"]["container"][
        "resources"
    ]
    assert resources["accelerator"]["resourceCount"] == "2"


def test_default_run_name_starts_with_the_pipeline_name(rlhf, project: Path, kfp_server: KfpApiServer) -> None:
    """`--run-name` defaults to "the pipeline's name and a timestamp" (the CLI's help), i.e. kubeflow.pipeline_name.

    Fails while src/rlhf/pipelines/run.py leaves the default to kfp, which names the run after the temporary
    package file ("rlhf_pipeline.yaml 2025-01-01 12-00-00") whatever kubeflow.pipeline_name is.
    """
    result = _submit(rlhf, project, kfp_server.url, "--set", "kubeflow.pipeline_name=nightly-rlhf")

    assert result.code == 0, result.err
    [run] = kfp_server.runs
    assert run["pipeline_spec"]["pipelineInfo"]["name"] == "nightly-rlhf"
    assert run["display_name"].startswith("nightly-rlhf"), run["display_name"]


# --- failures: one line on stderr, exit 2 -----------------------------------------------------------------------


def test_bad_set_fails_before_any_request(rlhf, project: Path, kfp_server: KfpApiServer) -> None:
    """An unknown key or an out-of-range value in --set is reported (naming the key) before the cluster is
    contacted."""
    for override, key in (("ppo.no_such_key=1", "ppo.no_such_key"), ("ppo.learning_rate=2", "ppo.learning_rate")):
        result = _submit(rlhf, project, kfp_server.url, "--set", override)
        assert result.code == 2
        assert len(result.err_lines) == 1 and result.err_lines[0].startswith("error: ")
        assert key in result.err
    assert kfp_server.requests == []


AUTH_FAILURES = [
    pytest.param("GET", "/healthz", 401, "Unauthorized", id="401-on-healthz"),
    pytest.param("GET", "/healthz", 403, "RBAC: access denied", id="403-on-healthz"),
    pytest.param(
        "GET",
        "/experiments",
        403,
        {
            "error": "Failed to authorize with API: PermissionDenied",
            "code": 7,
            "message": "Failed to authorize with API",
            "details": [],
        },
        id="403-on-experiments",
    ),
    pytest.param(
        "POST",
        "/runs",
        401,
        {"error": "Unauthenticated: no user identity header", "code": 16, "message": "Unauthenticated", "details": []},
        id="401-on-run",
    ),
    pytest.param("POST", "/runs", 403, "RBAC: access denied", id="403-on-run"),
]


@pytest.mark.parametrize(("method", "path", "status", "body"), AUTH_FAILURES)
def test_refused_credentials_give_one_line_saying_not_authorised(
    rlhf, project: Path, kfp_server: KfpApiServer, kfp_sleeps: list[float], method: str, path: str, status: int, body
) -> None:
    """A 401 or 403 from the API (or the auth proxy in front of it), on any call, is one line naming the host, the
    status and that the user is not authorised; no traceback is logged, no run is filed, and a refusal is not
    retried (kfp's healthz check would otherwise wait 5 x 5 s and then report a TimeoutError)."""
    kfp_server.fail(method, path, status, body)
    result = _submit(rlhf, project, kfp_server.url, "--experiment", "exp")

    assert result.code == 2
    assert len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    assert line.startswith(f"error: {kfp_server.url}: {status}"), line
    assert "not authorised" in line
    assert not result.tracebacks, result.tracebacks
    assert not kfp_sleeps, f"retried a {status} with sleeps {kfp_sleeps}"
    assert not kfp_server.runs


SERVER_ERROR = {
    "error": "Internal error: failed to create a new run: database is locked",
    "code": 13,
    "message": "failed to create a new run",
    "details": [],
}


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/runs"), ("GET", "/experiments"), ("GET", "/healthz")],
    ids=["on-run", "on-experiments", "on-healthz"],
)
def test_server_error_gives_one_line_with_status_and_body(
    rlhf, project: Path, kfp_server: KfpApiServer, kfp_sleeps: list[float], method: str, path: str
) -> None:
    """A 500 with a body is one line with the host, the status and (the start of) the body, and no traceback."""
    kfp_server.fail(method, path, 500, SERVER_ERROR)
    result = _submit(rlhf, project, kfp_server.url, "--experiment", "exp")

    assert result.code == 2
    assert len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    assert line.startswith(f"error: {kfp_server.url}: "), line
    assert "500" in line and "database is locked" in line, line
    assert not result.tracebacks, result.tracebacks
    assert not kfp_server.runs


# --- what a user sees when the host is unreachable (a real `rlhf` process) -------------------------------------


@pytest.fixture(scope="module")
def unreachable(tmp_path_factory: pytest.TempPathFactory):
    """`rlhf pipeline submit` run as a process against a port nothing listens on (bound, never listening, so no
    other process can take it meanwhile): its exit code, stderr, time taken and host."""
    project = write_project(tmp_path_factory.mktemp("unreachable"), SUBMITTABLE)
    home = tmp_path_factory.mktemp("home")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        host = f"http://127.0.0.1:{sock.getsockname()[1]}"
        env = {key: value for key, value in os.environ.items() if not key.startswith("KF_PIPELINES")}
        env |= {"HOME": str(home), "PYTHONWARNINGS": "", "MLFLOW_DISABLE_TELEMETRY": "true"}
        started = time.monotonic()
        process = subprocess.run(
            [sys.executable, "-m", "rlhf.cli", "pipeline", "submit", "--host", host],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        elapsed = time.monotonic() - started
    return process, elapsed, host


def test_unreachable_host_fails_fast_with_an_error_line_and_no_traceback(unreachable) -> None:
    """Against a closed port the command exits 2 within 30 s, ending with `error: HOST: cannot reach ...` and
    without a traceback."""
    process, elapsed, host = unreachable
    assert process.returncode == 2, process.stderr
    assert elapsed < 30
    assert "Traceback" not in process.stderr, process.stderr
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"error: {host}: cannot reach "), process.stderr
    assert process.stdout == ""


def test_unreachable_host_error_is_the_only_stderr_line(unreachable) -> None:
    """stderr holds nothing but the error line.

    Fails while kfp.Client's FutureWarning ("This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later
    versions.", plus its source line) reaches the user's terminal on every submit.
    """
    process, _, host = unreachable
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, process.stderr
    assert lines[0].startswith(f"error: {host}: cannot reach ")
