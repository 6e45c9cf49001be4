"""The stages run unchanged under `accelerate launch` with several processes (2 CPU processes over gloo)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest


def _sft(workdir: Path, *launcher: str) -> list[dict]:
    command = [*launcher, "rlhf.cli", "sft"] if launcher else ["rlhf", "sft"]
    # On a machine without GPUs, ACCELERATE_USE_CPU makes the launched processes form a gloo (MULTI_CPU) group.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((workdir / "plots" / "sft" / "train.json").read_text())


@pytest.mark.slow
def test_sft_under_accelerate_launch_with_two_processes(workdir: Path, launch_two: tuple[str, ...]) -> None:
    subprocess.run(["rlhf", "pretrain"], cwd=workdir, check=True, capture_output=True)
    single = _sft(workdir)
    distributed = _sft(workdir, *launch_two)
    # Data parallel: each optimiser step sees one batch per process, so an epoch takes about half the steps.
    assert distributed[-1]["step"] <= single[-1]["step"] // 2 + 1
    assert (workdir / "models" / "sft" / "model.safetensors").exists()
    assert not list((workdir / "models").glob(".sft.tmp-*"))
