"""The PPO stage from the command line: it runs after the supervised stages, resumes after a kill, and runs
unchanged under `accelerate launch` with two processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml


def _rlhf(workdir: Path, *args: str, launcher: tuple[str, ...] = ("rlhf",)) -> subprocess.CompletedProcess:
    # Without GPUs, ACCELERATE_USE_CPU makes launched processes form a gloo (MULTI_CPU) group.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run([*launcher, *args], cwd=workdir, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def _supervised_once(tmp_path_factory: pytest.TempPathFactory, tiny_demo_data: Path, tiny_params: dict) -> Path:
    """pretrain -> sft -> reward once for this module, on the tiny demo."""
    project = tmp_path_factory.mktemp("supervised")
    shutil.copytree(tiny_demo_data, project / "data")
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
    }
    for stage in ("pretrain", "sft", "reward"):
        subprocess.run(["rlhf", stage], cwd=project, env=env, check=True, capture_output=True)
    return project


@pytest.fixture
def supervised(_supervised_once: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the trained project, so each test's PPO run starts from the same models."""
    project = tmp_path / "project"
    shutil.copytree(_supervised_once, project)
    monkeypatch.chdir(project)
    return project


@pytest.mark.slow
def test_ppo_stage_writes_policy_metrics_and_curves(supervised: Path) -> None:
    _rlhf(supervised, "ppo", "--set", "ppo.total_episodes=24", "--set", "ppo.eval_steps=2")
    metrics = json.loads((supervised / "metrics" / "ppo.json").read_text())
    for key in ("objective/kl", "objective/scores", "eval/policy/rm_score", "eval/sft/rm_score", "eval/gold_gain"):
        assert key in metrics
    assert (supervised / "models" / "ppo" / "model.safetensors").exists()
    scores = json.loads((supervised / "plots" / "ppo" / "scores.json").read_text())
    assert [row["step"] for row in scores] == [1, 2, 3]
    assert not list((supervised / "checkpoints").glob("ppo-*"))
    # The held-out curve: the SFT model at step 0, every eval_steps (2), and the final policy (3); the
    # first and last are the closing comparison's own numbers.
    history = json.loads((supervised / "models" / "ppo" / "training_history.json").read_text())
    curve = [row for row in history if "heldout/gold_score" in row]
    assert [row["step"] for row in curve] == [0, 2, 3]
    assert curve[0]["heldout/kl"] == metrics["eval/sft/kl"]
    assert curve[0]["heldout/rm_score"] == metrics["eval/sft/rm_score"]
    assert curve[-1]["heldout/gold_score"] == metrics["eval/policy/gold_score"]
    # Every sample_steps (2) a table of (query, response, score) goes to the MLflow run.
    run = _ppo_runs(supervised)[-1]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{supervised / 'mlflow.db'}")
    logged = client.get_metric_history(run.info.run_id, "heldout/gold_score")
    assert sorted((m.step, m.value) for m in logged) == [(row["step"], row["heldout/gold_score"]) for row in curve]
    tables = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert tables == ["samples/step_00002.json"]
    table = json.loads(Path(client.download_artifacts(run.info.run_id, tables[0], str(supervised))).read_text())
    assert table["columns"] == ["query", "response", "score"] and len(table["data"]) == 8


def _ppo_runs(project: Path) -> list:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhf")
    runs = client.search_runs([experiment.experiment_id], "tags.`rlhf.stage` = 'ppo'", order_by=["start_time ASC"])
    return list(runs)


@pytest.mark.slow
def test_sigterm_ends_the_run_as_failed_and_leaves_no_model(supervised: Path) -> None:
    process = subprocess.Popen(["rlhf", "ppo"], cwd=supervised, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(supervised.glob("checkpoints/ppo-*/step-*/COMPLETE")):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # how Kubeflow and DVC stop a step
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert [run.info.status for run in _ppo_runs(supervised)] == ["FAILED"]
    assert not (supervised / "models" / "ppo").exists()
    assert not list((supervised / "models").glob(".ppo.tmp-*"))


@pytest.mark.slow
def test_killed_ppo_resumes_from_its_checkpoint(supervised: Path) -> None:
    env = {**os.environ}
    process = subprocess.Popen(
        ["rlhf", "ppo"], cwd=supervised, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not list(supervised.glob("checkpoints/ppo-*/step-*/COMPLETE")):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (supervised / "models" / "ppo").exists()

    resumed = _rlhf(supervised, "ppo")
    assert "Resuming from checkpoint" in resumed.stdout + resumed.stderr
    # The checkpoint carries the metrics so far: the curves cover the whole run (48 episodes / 8 per step).
    steps = [row["step"] for row in json.loads((supervised / "plots" / "ppo" / "scores.json").read_text())]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (supervised / "models" / "ppo" / "model.safetensors").exists()
    # The killed attempt's MLflow run does not stay RUNNING: the resumed one closes it.
    killed, finished = _ppo_runs(supervised)
    assert (killed.info.status, finished.info.status) == ("KILLED", "FINISHED")
    assert killed.data.tags["rlhf.superseded_by"] == finished.info.run_id

    # Resumed, the metrics file is the one an uninterrupted run writes (DVC sees no change).
    resumed_metrics = (supervised / "metrics" / "ppo.json").read_text()
    _rlhf(supervised, "ppo")
    assert (supervised / "metrics" / "ppo.json").read_text() == resumed_metrics


@pytest.mark.slow
def test_ppo_under_accelerate_launch_with_two_processes(supervised: Path, launch_two: tuple[str, ...]) -> None:
    _rlhf(supervised, "ppo", launcher=(*launch_two, "rlhf.cli"))
    metrics = json.loads((supervised / "metrics" / "ppo.json").read_text())
    # Two processes each sample 8 prompts a step: 48 episodes take 3 steps, counted across processes.
    steps = [row["step"] for row in json.loads((supervised / "plots" / "ppo" / "scores.json").read_text())]
    assert steps == [1, 2, 3]
    assert metrics["episode"] == 48
    assert (supervised / "models" / "ppo" / "model.safetensors").exists()


@pytest.mark.slow
def test_ppo_with_bf16_autocast_and_gradient_checkpointing(supervised: Path) -> None:
    # The GPU settings, exercised on the CPU (autocast to bfloat16 works there too): the run completes and learns.
    _rlhf(
        supervised,
        "ppo",
        "--set",
        "ppo.total_episodes=16",
        "--set",
        "ppo.bf16=true",
        "--set",
        "ppo.gradient_checkpointing=true",
    )
    metrics = json.loads((supervised / "metrics" / "ppo.json").read_text())
    assert metrics["loss/value_avg"] == metrics["loss/value_avg"]  # not NaN
    assert (supervised / "models" / "ppo" / "model.safetensors").exists()
