"""Helpers shared by the integration tests (imported by their conftest.py and test modules)."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the virtualenv's bin: `rlhf`, `dvc` and `mlflow` live here

# TINY_PARAMS (tests/conftest.py) with room for the demo prompts plus answers. At max_length 64 TRL drops most SFT
# examples (the completion is truncated away entirely) and most preference pairs (RewardTrainer filters pairs longer
# than max_length), which leaves the reward stage a single training step; 128 keeps every example and still trains in
# seconds.
INTEGRATION_OVERRIDES = {"sft": {"max_length": 128}, "reward": {"max_length": 128}}


def _tiny_params() -> dict:
    """TINY_PARAMS from tests/conftest.py, loaded by path (both conftest files are modules named `conftest`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_rlhf_tests_conftest", PROJECT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TINY_PARAMS


def _merge(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        base[key] = _merge(base.get(key) or {}, value) if isinstance(value, dict) else value
    return base


def integration_params() -> dict:
    """The project's params.yaml with TINY_PARAMS and the overrides above on top: DVC wants every param key a stage
    lists (e.g. gates.output_dir) written in the file, not left to its default."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for changes in (_tiny_params(), INTEGRATION_OVERRIDES):
        _merge(params, copy.deepcopy(changes))
    return params


def base_env(**extra: str) -> dict[str, str]:
    """The environment for subprocesses: isolated like tests/conftest.py does it, with the virtualenv on PATH."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "AWS_", "RLHF_")) and key != "RANK"
    }
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "DVC_NO_ANALYTICS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            # git commits in the throw-away repos must not depend on the user's global git configuration.
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_TERMINAL_PROMPT": "0",
        }
    )
    env.update(extra)
    return env


def run(args: list[str], cwd: Path, env: dict[str, str], check: bool = True, timeout: float = 300):
    """Runs a command, returning the CompletedProcess; on an unexpected exit status fails with its output."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {result.returncode} in {cwd}\n"
            f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result


def write_params(folder: Path, params: dict) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def git(folder: Path, *args: str, env: dict[str, str] | None = None) -> str:
    return run(["git", *args], cwd=folder, env=env or base_env()).stdout


def make_project(folder: Path, params: dict | None = None) -> Path:
    """A copy of the project's DVC skeleton in `folder`, as a fresh git repo with one commit.

    Copies dvc.yaml, .dvc/config, .dvcignore, .gitignore, data.dvc (still recording the full-size data; re-`dvc add`
    after generating data) and src/ (the stages list src/rlhf/... files as deps), and writes `params` (default: the
    integration params) as params.yaml. No data, models, dvc.lock or metrics are copied.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", "data.dvc"):
        shutil.copy2(PROJECT / name, folder / name)
    (folder / ".dvc").mkdir(exist_ok=True)
    for name in ("config", ".gitignore"):
        shutil.copy2(PROJECT / ".dvc" / name, folder / ".dvc" / name)
    shutil.copytree(PROJECT / "src", folder / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    write_params(folder, params if params is not None else integration_params())
    git(folder, "init", "-q", "-b", "main")
    git(folder, "config", "user.name", "Integration Test")
    git(folder, "config", "user.email", "integration@example.invalid")
    git(folder, "config", "commit.gpgsign", "false")
    git(folder, "add", "-A")
    git(folder, "commit", "-q", "-m", "project skeleton")
    return folder


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by path relative to it (dotfiles included, .gitignore excluded)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != ".gitignore"
    }
