"""Kubeflow Pipelines 2.17's MLflow integration: the backend creates an MLflow run per task, nested under the
pipeline run's own, and injects MLFLOW_RUN_ID, MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID into the task's
container (kubeflow/pipelines backend/src/v2/common/plugins/mlflow). A step must log into that run, not open an
unrelated one, and leave the runs' lifecycle to the backend.

Here the backend's part is played by MlflowClient on a real tracking store (the same calls: create the pipeline run,
then the task run tagged mlflow.parentRunId), and the step is the component's own function on the tiny config.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config import load_params, to_kfp


class MetricsArtifact:
    """What the component passes for its Metrics output: a path and log_metric."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.logged: dict[str, float] = {}

    def log_metric(self, key: str, value: float) -> None:
        self.logged[key] = value


@pytest.fixture
def injected(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    """An experiment with a pipeline run and a task run nested under it, and the task's environment as the backend
    sets it."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir / 'cluster-mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("team-rlhf")
    pipeline_run = client.create_run(experiment, run_name="rlhf-pipeline-abc12").info.run_id
    task_run = client.create_run(experiment, run_name="pretrain", tags={"mlflow.parentRunId": pipeline_run}).info.run_id
    for key, value in {
        "MLFLOW_RUN_ID": task_run,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_EXPERIMENT_ID": experiment,
    }.items():
        monkeypatch.setenv(key, value)
    return client, experiment, pipeline_run, task_run


def test_a_step_logs_into_the_task_run_kubeflow_made(workdir: Path, injected) -> None:
    from rlhf.components import steps

    client, experiment, pipeline_run, task_run = injected
    section = to_kfp(load_params(workdir / "params.yaml").pretrain.model_dump(mode="json"))
    metrics = MetricsArtifact(workdir / "metrics.json")
    steps.pretrain(
        section=section,
        data_dir=str(workdir / "data"),
        model_dir=str(workdir / "model"),
        metrics_artifact=metrics,
        kfp_run_id="abc12",
    )
    steps.close_pipeline_run(kfp_run_id="abc12", state="SUCCEEDED")

    runs = client.search_runs([experiment])
    assert {run.info.run_id for run in runs} == {pipeline_run, task_run}  # nothing unrelated was opened
    assert client.get_experiment_by_name("rlhf") is None
    task = client.get_run(task_run)
    assert task.data.tags["rlhf.stage"] == "pretrain"
    assert task.data.tags["mlflow.parentRunId"] == pipeline_run
    assert "learning_rate" in task.data.params
    assert task.data.metrics["eval_loss"] == pytest.approx(metrics.logged["eval_loss"])
    # The backend ends its own runs: the step leaves the pipeline run alone.
    assert client.get_run(pipeline_run).info.status == "RUNNING"
