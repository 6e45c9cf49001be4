"""A stage's MLflow params name upstream runs and project-relative paths, not the folders of one machine or of one
Kubeflow run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.tracking import PROVENANCE_FILE, describe_params


def test_params_name_the_upstream_run_and_paths_relative_to_the_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    upstream = tmp_path / "kfp-local" / "run-1" / "sft" / "model"
    upstream.mkdir(parents=True)
    (upstream / PROVENANCE_FILE).write_text(json.dumps({"stage": "sft", "mlflow_run_id": "23cf00"}))
    data = tmp_path / "kfp-local" / "run-1" / "data" / "dataset" / "prompts.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("{}\n")
    described = describe_params(
        {
            "ppo.policy_model": str(upstream),
            "ppo.prompts": str(data),
            "ppo.output_dir": str(tmp_path / "kfp-local" / "run-1" / "ppo" / "model"),  # not written yet
            "ppo.reward_model": "s3://bucket/models/reward",
            "pretrain.base_model": "HuggingFaceTB/SmolLM2-135M",
            "ppo.learning_rate": 0.0003,
            "sft.dataset": "data/sft.jsonl",
            "ppo.elsewhere": "/opt/models/base",
        }
    )
    assert described == {
        "ppo.policy_model": "sft run 23cf00",
        "ppo.prompts": "kfp-local/run-1/data/dataset/prompts.jsonl",
        "ppo.output_dir": "kfp-local/run-1/ppo/model",
        "ppo.reward_model": "s3://bucket/models/reward",
        "pretrain.base_model": "HuggingFaceTB/SmolLM2-135M",
        "ppo.learning_rate": 0.0003,
        "sft.dataset": "data/sft.jsonl",
        "ppo.elsewhere": "/opt/models/base",
    }
