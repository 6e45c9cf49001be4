"""The stages against a real MLflow tracking server: runs, params, per-step metrics, dataset inputs, model artifacts.

The pipeline (pretrain -> sft -> reward, tiny params) runs once per module through the `rlhf` command with
MLFLOW_TRACKING_URI pointing at the session's `mlflow server`; every test then reads what reached the server back
through `MlflowClient`, the way a user of the tracking UI would see it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from _support import base_env, integration_params, run, write_params

pytestmark = pytest.mark.slow

STAGES = ("pretrain", "sft", "reward")
# The dataset each stage logs as its input: (name in MLflow, file, kind for rlhf.data.formats.load_dataset).
DATASETS = {
    "pretrain": ("corpus", "data/corpus.jsonl", "text"),
    "sft": ("sft", "data/sft.jsonl", "sft"),
    "reward": ("preferences", "data/preferences.jsonl", "preference"),
}
OUTPUT_DIRS = {"pretrain": "models/pretrained", "sft": "models/sft", "reward": "models/reward"}


@dataclass
class TrackedPipeline:
    folder: Path
    params: dict
    client: object  # mlflow.tracking.MlflowClient
    runs: dict  # stage -> mlflow.entities.Run
    server: object  # conftest.MlflowServer


def _experiment_runs(client, name: str) -> list:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id])


@pytest.fixture(scope="module")
def tracked(mlflow_server, tiny_demo_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """Runs the three stages once, tracked to the server, in a project folder with the tiny demo data."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("tracked")
    shutil.copytree(tiny_demo_data, folder / "data")
    params = integration_params()
    write_params(folder, params)
    experiment = f"integration-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
        env = base_env(MLFLOW_TRACKING_URI=mlflow_server.url, MLFLOW_EXPERIMENT_NAME=experiment)
        for stage in STAGES:
            run(["rlhf", stage], cwd=folder, env=env)
        client = MlflowClient(mlflow_server.url)
        runs = _experiment_runs(client, experiment)
        by_stage: dict = {}
        for tracked_run in runs:
            by_stage.setdefault(tracked_run.data.tags.get("rlhf.stage"), []).append(tracked_run)
        assert sorted(by_stage) == sorted(STAGES), f"runs by rlhf.stage tag: {by_stage}"
        assert all(len(stage_runs) == 1 for stage_runs in by_stage.values()), "one run per stage"
        yield TrackedPipeline(folder, params, client, {s: by_stage[s][0] for s in STAGES}, mlflow_server)


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_has_one_finished_run_named_and_tagged_by_stage(tracked, stage):
    stage_run = tracked.runs[stage]
    assert stage_run.info.status == "FINISHED"
    assert stage_run.info.run_name == stage
    assert stage_run.data.tags["rlhf.stage"] == stage
    assert stage_run.info.end_time and stage_run.info.end_time >= stage_run.info.start_time


@pytest.mark.parametrize("stage", STAGES)
def test_params_record_the_stage_config(tracked, stage):
    logged = tracked.runs[stage].data.params
    configured = tracked.params[stage]
    assert float(logged[f"{stage}.learning_rate"]) == pytest.approx(configured["learning_rate"])
    for key in ("batch_size", "max_length", "logging_steps", "save_steps"):
        assert int(logged[f"{stage}.{key}"]) == configured[key], key
    assert float(logged[f"{stage}.epochs"]) == configured["epochs"]
    # Keys left at their defaults are logged too: the run records the whole validated config, not only params.yaml.
    assert f"{stage}.seed" in logged and f"{stage}.warmup_ratio" in logged
    if stage == "pretrain":
        assert int(logged["pretrain.architecture.n_embd"]) == configured["architecture"]["n_embd"]
        assert int(logged["pretrain.tokenizer.vocab_size"]) == configured["tokenizer"]["vocab_size"]
    if stage == "sft":
        assert logged["sft.dataset"] == "data/sft.jsonl" and logged["sft.lora.enabled"] == "False"
    if stage == "reward":  # the model it starts from, by the run that trained it
        assert logged["reward.base_model"] == f"sft run {tracked.runs['sft'].info.run_id}"


@pytest.mark.parametrize("stage", STAGES)
def test_per_step_training_metrics_reach_the_server(tracked, stage):
    run_id = tracked.runs[stage].info.run_id
    history = sorted(tracked.client.get_metric_history(run_id, "loss"), key=lambda metric: metric.step)
    steps = [metric.step for metric in history]
    assert len(history) >= 3, f"{stage}: train loss logged at steps {steps} only"
    assert len(set(steps)) == len(steps) and steps[0] >= 1
    assert all(math.isfinite(metric.value) and metric.value > 0 for metric in history)
    # The loss curve DVC plots (plots/<stage>/train.json) and the one MLflow shows are the same points.
    plotted = json.loads((tracked.folder / "plots" / stage / "train.json").read_text())
    assert [row["step"] for row in plotted] == steps
    assert [row["loss"] for row in plotted] == pytest.approx([metric.value for metric in history], abs=1e-5)

    assert tracked.client.get_metric_history(run_id, "eval_loss"), f"{stage}: no eval_loss logged"
    # The headline metrics the CLI writes for DVC are logged on the run as well.
    headline = json.loads((tracked.folder / "metrics" / f"{stage}.json").read_text())
    logged = tracked.runs[stage].data.metrics
    for key, value in headline.items():
        assert logged[key] == pytest.approx(value, rel=1e-6), key


@pytest.mark.parametrize("stage", STAGES)
def test_dataset_inputs_record_training_and_evaluation_splits(tracked, stage):
    from rlhf.config import load_params
    from rlhf.data.formats import load_dataset, split
    from rlhf.data.io import fingerprint

    name, path, kind = DATASETS[stage]
    dataset, source_fingerprint = load_dataset(str(tracked.folder / path), kind)
    config = getattr(load_params(tracked.folder / "params.yaml"), stage)  # with the defaults filled in
    train, held_out = split(dataset, config.eval_fraction, config.seed, path)
    expected = {"training": train, "evaluation": held_out}

    by_context = {}
    for dataset_input in tracked.runs[stage].inputs.dataset_inputs:
        tags = {tag.key: tag.value for tag in dataset_input.tags}
        by_context[tags.get("mlflow.data.context")] = (dataset_input.dataset, tags)
    assert set(by_context) == set(expected), (
        f"{stage}: dataset inputs by context: {sorted(by_context, key=str)} (expected training and evaluation)"
    )
    for context, (logged, tags) in by_context.items():
        split_fingerprint = fingerprint(expected[context].to_list())
        assert logged.name == name, context
        assert tags["fingerprint"] == split_fingerprint, context
        assert logged.digest == split_fingerprint[:16], context
        assert tags["source_fingerprint"] == source_fingerprint, context
        assert json.loads(logged.source)["uri"].endswith(path), context
        assert json.loads(logged.profile)["num_rows"] == len(expected[context]), context
    assert by_context["training"][0].digest != by_context["evaluation"][0].digest
    assert tracked.runs[stage].data.params[f"data.{name}.fingerprint"] == source_fingerprint


@pytest.mark.parametrize("stage", STAGES)
def test_saved_model_folder_is_downloadable_from_the_server(tracked, stage, tmp_path, s3_endpoint):
    run_id = tracked.runs[stage].info.run_id
    listed = {artifact.path for artifact in tracked.client.list_artifacts(run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json"} <= listed
    local = tracked.folder / OUTPUT_DIRS[stage]
    assert listed == {f"model/{path.name}" for path in local.iterdir() if path.is_file()}
    for name in ("config.json", "model.safetensors"):
        downloaded = Path(tracked.client.download_artifacts(run_id, f"model/{name}", str(tmp_path)))
        assert hashlib.sha256(downloaded.read_bytes()).digest() == hashlib.sha256((local / name).read_bytes()).digest()
    # Proxied artifact storage: the files went through the server into its --artifacts-destination, an S3 bucket.
    bucket, prefix = tracked.server.artifacts.removeprefix("s3://").split("/", 1)
    pages = s3_endpoint.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    stored = [
        item
        for page in pages
        for item in page.get("Contents", [])
        if run_id in item["Key"].split("/") and item["Key"].endswith("/model/model.safetensors")
    ]
    assert len(stored) == 1
    assert stored[0]["Size"] == (local / "model.safetensors").stat().st_size


def _malformed_preferences(folder: Path) -> str:
    path = folder / "data" / "malformed_preferences.jsonl"
    lines = (folder / "data" / "preferences.jsonl").read_text().splitlines()[:20]
    lines[7] = lines[7][: len(lines[7]) // 2]  # a truncated record: not valid JSON
    path.write_text("\n".join(lines) + "\n")
    return "reward.dataset=data/malformed_preferences.jsonl"


@pytest.mark.parametrize(
    "case",
    [
        "missing dataset",  # rejected before the run starts (exit status 2, one-line error)
        "malformed dataset",  # likewise
        "training fails",  # inside the run: every pair is longer than max_length, so the trainer has no data
    ],
)
def test_a_failing_stage_leaves_no_finished_run_and_no_model(tracked, case):
    folder = tracked.folder
    output_dir = f"models/reward-failed-{uuid.uuid4().hex[:6]}"
    if case == "missing dataset":
        override = "reward.dataset=data/missing.jsonl"
    elif case == "malformed dataset":
        override = _malformed_preferences(folder)
    else:
        override = "reward.max_length=8"
    experiment = f"integration-failed-{uuid.uuid4().hex[:8]}"
    env = base_env(MLFLOW_TRACKING_URI=tracked.server.url, MLFLOW_EXPERIMENT_NAME=experiment)
    result = run(
        ["rlhf", "reward", "--set", override, "--set", f"reward.output_dir={output_dir}",
         "--metrics", "metrics/reward-failed.json", "--plots", "plots/reward-failed"],
        cwd=folder, env=env, check=False,
    )  # fmt: skip
    assert result.returncode != 0, result.stdout[-2000:]
    if case != "training fails":
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1].startswith("error: ")
        assert ("missing.jsonl" if case == "missing dataset" else "malformed_preferences.jsonl:8") in result.stderr

    runs = _experiment_runs(tracked.client, experiment)
    assert not [r for r in runs if r.info.status == "FINISHED"]
    for failed in runs:
        assert failed.info.status == "FAILED"
        assert tracked.client.list_artifacts(failed.info.run_id, "model") == []
    if case == "training fails":
        assert len(runs) == 1, "a failure inside the stage ends its run as FAILED"
    else:
        assert runs == [], "bad input is rejected before any run starts"
    # No model, half-written model, metrics or plots on disk either.
    assert not (folder / output_dir).exists()
    assert not list((folder / "models").glob(f".{Path(output_dir).name}*"))
    assert not (folder / "metrics" / "reward-failed.json").exists()
    assert not (folder / "plots" / "reward-failed").exists()
