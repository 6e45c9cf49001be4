"""The main job on the embedded default, once: demo data, then `dvc repro` of the real params, in a copy of the repo.

This is the acceptance run of the demo: the data regenerates to the bytes data.dvc records, every stage runs through
DVC, the reward model clears the accuracy bar, PPO beats the SFT model on held-out prompts within the KL budget, both
gates pass, the three models are registered with a champion that loads in a fresh process and writes a summary, and
each stage has a finished MLflow run in sqlite. Then the registry's promises: registering again changes nothing, and
a gate out of reach promotes nothing and names its check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
    assert set(by_stage) == {*STAGES, "evaluate", "register"}
    for stage in STAGES:
        run = by_stage[stage]
        assert run.info.status == "FINISHED"
        assert run.data.tags["rlhf.data_dvc_md5"].endswith(".dir")
        assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {
            "model/config.json",
            "model/model.safetensors",
        }
        step_metric = "objective/scores" if stage == "ppo" else "loss"
        assert len(client.get_metric_history(run.info.run_id, step_metric)) > 3

    evaluation = json.loads((demo_project / "metrics/evaluate.json").read_text())
    assert evaluation["win_rate/gold"] >= 0.7 and evaluation["win_rate/rm"] >= 0.7
    assert evaluation["rm_accuracy"] >= 0.85
    for gate in ("reward", "evaluation"):
        verdict = json.loads((demo_project / "gates" / f"{gate}.json").read_text())
        assert verdict["passed"], verdict
        assert by_stage["evaluate" if gate == "evaluation" else "reward"].data.tags[f"rlhf.gate.{gate}"] == "passed"
    report = (demo_project / "reports/evaluation/report.html").read_text()
    assert report.count("data:image/png;base64,") == 2

    registered = json.loads((demo_project / "registry/registered.json").read_text())
    assert registered["gates_passed"]
    champions = {role: str(client.get_model_version_by_alias(entry["model"], "champion").version)
                 for role, entry in registered["versions"].items()}
    assert champions == {role: str(entry["version"]) for role, entry in registered["versions"].items()}

    # A fresh Python process loads the champion policy from the registry and summarises a new review.
    code = ("import mlflow; model = mlflow.pyfunc.load_model('models:/rlhf-policy@champion'); "
            "print(model.predict(['I watched The Quiet Harbour, a drama. The acting is superb and the ending is "
            "moving.'])[0])")
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{demo_project / 'mlflow.db'}")
    summary = subprocess.run([sys.executable, "-c", code], cwd=demo_project, env=env, capture_output=True, text=True)
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert len(summary.stdout.split()) >= 3, summary.stdout  # e.g. "A great drama with superb acting."


def _registry_state(client, names) -> dict:
    return {name: sorted((v.version, tuple(sorted(v.aliases))) for v in client.search_model_versions(f"name = '{name}'"))
            for name in names}


@pytest.mark.slow
def test_registering_again_changes_nothing_and_an_unreachable_gate_names_its_check(demo_project: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{demo_project / 'mlflow.db'}")
    names = ("rlhf-sft", "rlhf-reward", "rlhf-policy")
    before = _registry_state(client, names)
    assert all(before.values()), "run after the demo pipeline test"

    assert "unchanged" in _run(["rlhf", "register"], demo_project)
    assert _registry_state(client, names) == before

    # The example of a gate set out of reach: the demo's reward model is right on all 300 held-out pairs,
    # but at 95% confidence that only shows an accuracy above 0.987.
    gated = subprocess.run(["rlhf", "gate", "reward", "--set", "gates.min_rm_accuracy=0.99"], cwd=demo_project,
                           capture_output=True, text=True)
    assert gated.returncode == 1
    assert "gate 'reward' failed: min_rm_accuracy" in gated.stderr
    _run(["rlhf", "gate", "reward"], demo_project)  # the real threshold again, for anything that runs after
