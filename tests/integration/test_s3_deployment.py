"""The deployment's storage on real servers: stages reading and writing `s3://`, the S3 endpoint going down in the
middle of a model upload (a stage's output, and the registry's upload through the MLflow server), and checkpoints
mirrored to S3 so a run on a fresh machine resumes.

The S3 endpoint is moto's server behind a relay that the tests stop at a chosen request (tests/servers.py); the
tracking server is the session's `mlflow server` (SQLite backend store, artifacts proxied to that S3 endpoint).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from _support import PROJECT, base_env, integration_params, run, write_params
from servers import DATA_BUCKET

sys.path.insert(0, str(PROJECT / "tests" / "registry"))

from registry_helpers import ROLES, server_project, versions

pytestmark = pytest.mark.slow


def _prefix() -> str:
    return f"s3://{DATA_BUCKET}/deployment-{uuid.uuid4().hex[:8]}"


def _objects(s3, uri: str) -> dict[str, int]:
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    return {item["Key"][len(prefix) + 1 :]: item["Size"] for page in pages for item in page.get("Contents", [])}


def _manifest(s3, uri: str) -> dict:
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    return json.loads(s3.client().get_object(Bucket=bucket, Key=f"{prefix}/.rlhf-manifest.json")["Body"].read())


@pytest.fixture
def stage_project(tiny_demo_data: Path, tmp_path: Path, s3, mlflow_server):
    """A project folder whose datasets are in S3 (uploaded from the tiny demo data) and whose stages track to the
    session's MLflow server; returns (folder, env, s3 prefix)."""
    from rlhf.storage import atomic_dir

    prefix = _prefix()
    with atomic_dir(f"{prefix}/data") as staging:
        shutil.copytree(tiny_demo_data, staging, dirs_exist_ok=True)
    folder = tmp_path / "project"
    folder.mkdir()
    write_params(folder, integration_params())
    env = base_env(
        MLFLOW_TRACKING_URI=mlflow_server.url,
        MLFLOW_EXPERIMENT_NAME=f"s3-{uuid.uuid4().hex[:8]}",
        RLHF_CACHE_DIR=str(tmp_path / "cache"),
        AWS_MAX_ATTEMPTS="2",
        **s3.env,
    )
    return folder, env, prefix


def test_stages_read_and_write_s3_and_an_upload_cut_short_is_refused_then_redone(stage_project, s3):
    """pretrain reads its corpus from S3 and writes its model there; the endpoint stops while the weights are being
    uploaded: the stage exits 2 with one line naming the endpoint, and its MLflow run is FAILED. The half-uploaded
    folder is refused by the next stage with one line. With the endpoint back, pretrain runs again, and SFT reads the
    model and the data from S3 and writes its own model there."""
    from mlflow import MlflowClient

    from rlhf.tracking import read_provenance

    folder, env, prefix = stage_project
    pretrain = [
        "rlhf",
        "pretrain",
        "--set",
        f"pretrain.corpus={prefix}/data/corpus.jsonl",
        "--set",
        f"pretrain.output_dir={prefix}/models/pretrained",
    ]
    sft = [
        "rlhf",
        "sft",
        "--set",
        f"sft.model={prefix}/models/pretrained",
        "--set",
        f"sft.dataset={prefix}/data/sft.jsonl",
        "--set",
        f"sft.output_dir={prefix}/models/sft",
    ]

    s3.cut_when(rb"PUT /" + f"{prefix}/models/pretrained/model.safetensors".removeprefix("s3://").encode())
    cut = run(pretrain, cwd=folder, env=env, check=False)
    assert s3.cut.is_set()
    assert cut.returncode == 2, cut.stdout[-2000:] + cut.stderr[-3000:]
    assert cut.stderr.strip().splitlines()[-1] == (
        f"error: {prefix}/models/pretrained: cannot reach the S3 endpoint {s3.url} (EndpointConnectionError)"
    )
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(env["MLFLOW_EXPERIMENT_NAME"])
    assert [r.info.status for r in client.search_runs([experiment.experiment_id])] == ["FAILED"]

    s3.start()
    assert _manifest(s3, f"{prefix}/models/pretrained") == {"complete": False}
    refused = run(sft, cwd=folder, env=env, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {prefix}/models/pretrained: its upload never finished (an interrupted stage?); rerun the stage "
        "that writes it"
    )

    run(pretrain, cwd=folder, env=env)
    run(sft, cwd=folder, env=env)
    for stage in ("pretrained", "sft"):
        manifest = _manifest(s3, f"{prefix}/models/{stage}")
        assert manifest["complete"] and {"config.json", "model.safetensors", "rlhf_run.json"} <= set(manifest["files"])
        stored = _objects(s3, f"{prefix}/models/{stage}")
        assert {name: entry["size"] for name, entry in manifest["files"].items()} == {
            name: size for name, size in stored.items() if name != ".rlhf-manifest.json"
        }
    assert not list(folder.glob("models")), "nothing written locally"
    provenance = read_provenance(f"{prefix}/models/sft")  # downloaded from S3 in this process
    sft_run = client.get_run(provenance["mlflow_run_id"])
    assert sft_run.info.status == "FINISHED"
    assert json.loads(sft_run.inputs.dataset_inputs[0].dataset.source)["uri"] == f"{prefix}/data/sft.jsonl"


def test_registry_upload_cut_short_leaves_no_version_and_a_rerun_registers(s3, mlflow_server, tmp_path):
    """`rlhf register` uploads each model through the MLflow server into S3. The endpoint stops while the second
    model's weights are on their way: the command fails with one line, and no registered model has any version
    (every model is uploaded before any version is created). With the endpoint back, the rerun registers all three,
    and the champion loads back from the registry in a fresh process."""
    from mlflow import MlflowClient

    project, names, register = server_project(tmp_path)
    # MLflow's client retries a failed request 7 times with exponential backoff (minutes); two short ones here.
    env = base_env(
        MLFLOW_TRACKING_URI=mlflow_server.url,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
        OMP_NUM_THREADS="1",
    )

    # The server uploads the SFT model's weights, then the reward model's: the endpoint stops at the second.
    s3.cut_when(rb"PUT /mlflow-artifacts/[^ ]*/model\.safetensors", occurrence=2)
    failed = run(register, cwd=project.root, env=env, check=False, timeout=600)
    assert failed.returncode == 2, failed.stdout[-2000:] + failed.stderr[-3000:]
    assert s3.cut.is_set()
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: MLflow at {mlflow_server.url}: /api/2.0/mlflow-artifacts/artifacts/"), last
    assert last.endswith("/model.safetensors failed: too many 500 error responses"), last
    assert "Traceback" not in failed.stderr
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    assert all(versions(client, names[role]) == {} for role in ROLES)

    s3.start()
    run(register, cwd=project.root, env=env, timeout=600)
    for role in ROLES:
        assert list(versions(client, names[role])) == [1], role
        assert client.get_model_version_by_alias(names[role], "champion").version == "1"
    code = (
        "import mlflow, sys; print(mlflow.pyfunc.load_model(f'models:/{sys.argv[1]}@champion')"
        ".predict(['A review.'])[0])"
    )
    answer = run([sys.executable, "-c", code, names["policy"]], cwd=tmp_path, env=env)
    assert answer.stdout.strip()


def test_checkpoints_mirrored_to_s3_resume_a_run_on_a_fresh_machine(stage_project, s3):
    """With RLHF_CHECKPOINT_DIR on S3, SFT mirrors each checkpoint there. The process is killed after a checkpoint
    and its local checkpoints are lost with the machine; the rerun restores the checkpoint from S3, resumes from it,
    finishes with the same held-out metrics as an uninterrupted run, and removes the mirrored checkpoints."""
    folder, env, prefix = stage_project
    tiny = ["--set", "sft.save_steps=3", "--set", "sft.epochs=2"]
    run(["rlhf", "pretrain", "--set", f"pretrain.corpus={prefix}/data/corpus.jsonl"], cwd=folder, env=env)
    sft = ["rlhf", "sft", "--set", f"sft.dataset={prefix}/data/sft.jsonl", *tiny]
    run(
        [*sft, "--set", "sft.output_dir=models/sft-uninterrupted", "--metrics", "metrics/uninterrupted.json"],
        cwd=folder,
        env=env,
    )
    uninterrupted = json.loads((folder / "metrics" / "uninterrupted.json").read_text())

    mirror = f"{prefix}/checkpoints"
    env = dict(env, RLHF_CHECKPOINT_DIR=mirror)
    process = subprocess.Popen(sft, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(
        name.endswith(".rlhf-manifest.json") and _manifest(s3, f"{mirror}/{name.rsplit('/', 1)[0]}").get("complete")
        for name in _objects(s3, mirror)
    ):
        assert process.poll() is None, "sft finished before its first checkpoint reached S3"
        assert time.monotonic() < deadline, "no checkpoint reached S3 in 300 s"
        time.sleep(0.2)
    process.kill()
    process.wait()
    shutil.rmtree(folder / "checkpoints")  # the machine is gone; the new one starts without them

    resumed = run(sft, cwd=folder, env=env)
    output = resumed.stdout + resumed.stderr
    assert f"Restoring checkpoint {mirror}/" in output and "Resuming from checkpoint" in output, output[-3000:]
    metrics = json.loads((folder / "metrics" / "sft.json").read_text())
    # The same model: the held-out metrics match. (The trainer's train_loss averages only the steps this process ran.)
    del metrics["train_loss"], uninterrupted["train_loss"]
    assert metrics == pytest.approx(uninterrupted, rel=1e-5)
    assert _objects(s3, mirror) == {}


def test_the_whole_pipeline_on_kubeflow_runner_with_postgres_tracking_and_s3_data(
    mlflow_server_postgres, s3, tmp_path, tiny_demo_data
):
    """The deployment end to end, on kfp's local runner: `rlhf data demo` writes the datasets to S3, the pipeline
    reads them from there (`kubeflow.data_source`), every stage tracks to an MLflow server whose backend store is
    PostgreSQL and whose artifacts are in S3, both gates pass, the three models are registered, and the champion
    policy loads back from the registry in a fresh process."""
    from mlflow import MlflowClient

    prefix = _prefix()
    folder = tmp_path / "project"
    folder.mkdir()
    params = integration_params()
    params["kubeflow"]["data_source"] = f"{prefix}/data"
    write_params(folder, params)
    experiment = f"postgres-{uuid.uuid4().hex[:8]}"
    env = base_env(
        MLFLOW_TRACKING_URI=mlflow_server_postgres.url,
        MLFLOW_EXPERIMENT_NAME=experiment,
        RLHF_CACHE_DIR=str(tmp_path / "cache"),
        **s3.env,
    )
    run(["rlhf", "data", "demo", "-o", f"{prefix}/data"], cwd=folder, env=env)
    assert set(_objects(s3, f"{prefix}/data")) == {".rlhf-manifest.json", *(p.name for p in tiny_demo_data.iterdir())}

    output = run(["rlhf", "pipeline", "run", "--local"], cwd=folder, env=env, timeout=900).stdout
    assert "gate reward: passed" in output and "gate evaluation: passed" in output, output[-3000:]
    run_folder = Path(output.split("pipeline run: ")[1].splitlines()[0])
    for path in tiny_demo_data.iterdir():  # the same bytes as the demo generated here
        assert (run_folder / "data" / "dataset" / path.name).read_bytes() == path.read_bytes(), path.name

    client = MlflowClient(tracking_uri=mlflow_server_postgres.url, registry_uri=mlflow_server_postgres.url)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert sorted(r.data.tags["rlhf.stage"] for r in runs) == sorted(
        ["pipeline", "pretrain", "sft", "reward", "ppo", "evaluate", "register"]
    )
    assert all(r.info.status == "FINISHED" for r in runs)
    registered = json.loads((run_folder / "register" / "registered").read_text())["versions"]
    for role, entry in registered.items():
        assert client.get_model_version_by_alias(entry["model"], "champion").version == str(entry["version"]), role

    code = (
        "import mlflow, sys; print(mlflow.pyfunc.load_model('models:/rlhf-policy@champion')"
        ".predict(['I watched The Quiet Harbour, a drama. The acting is superb.'])[0])"
    )
    answer = run([sys.executable, "-c", code], cwd=tmp_path, env=env)
    assert answer.stdout.strip()
