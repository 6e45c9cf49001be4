"""The main job on the embedded default, once: demo data, then `dvc repro` of the real params, in a copy of the repo.

This is the acceptance run of the demo: the data regenerates to the bytes data.dvc records, every stage runs through
DVC, the reward model clears the accuracy bar, PPO beats the SFT model on held-out prompts within the KL budget, and
each stage has a finished MLflow run in sqlite.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "sft", "reward", "ppo")


def _run(command: list[str], cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def demo_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("demo-project")
    for name in _run(["git", "ls-files"], ROOT).splitlines():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, project / name)
    _run(["git", "init", "-q"], project)
    return project


@pytest.mark.slow
def test_demo_pipeline_reproduces_with_dvc(demo_project: Path) -> None:
    _run(["rlhf", "data", "demo", "-o", "data"], demo_project)
    recorded = (demo_project / "data.dvc").read_text()
    _run(["dvc", "add", "data"], demo_project)
    assert (demo_project / "data.dvc").read_text() == recorded  # the generator wrote the bytes data.dvc records

    _run(["dvc", "repro"], demo_project)
    metrics = {stage: json.loads((demo_project / "metrics" / f"{stage}.json").read_text()) for stage in STAGES}
    assert metrics["reward"]["eval_accuracy"] >= 0.85
    assert metrics["sft"]["eval_loss"] < metrics["pretrain"]["eval_loss"]  # SFT fits its task better than the base
    # PPO on the held-out prompts: RM score up by >= 1 SFT std, gold (VADER) up by >= 0.3, within the KL budget,
    # and the answers still end with EOS.
    ppo = metrics["ppo"]
    assert ppo["eval/rm_gain_in_sft_std"] >= 1.0
    assert ppo["eval/gold_gain"] >= 0.3
    assert ppo["objective/kl"] <= 6.0
    assert ppo["eval/policy/eos_rate"] >= 0.9
    assert "up to date" in _run(["dvc", "status"], demo_project)

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{demo_project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhf")
    runs = client.search_runs([experiment.experiment_id])
    by_stage = {run.data.tags["rlhf.stage"]: run for run in runs}
    assert set(by_stage) == set(STAGES)
    for stage, run in by_stage.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["rlhf.data_dvc_md5"].endswith(".dir")
        assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {
            "model/config.json",
            "model/model.safetensors",
        }
        step_metric = "objective/scores" if stage == "ppo" else "loss"
        assert len(client.get_metric_history(run.info.run_id, step_metric)) > 3
