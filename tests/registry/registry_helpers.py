"""Helpers for the registry tests (a module of its own: `conftest` is not importable by name; the integration test
imports it too).

The models are real but untrained: a byte-level BPE tokenizer on a few hundred synthetic reviews and a one-layer
GPT-2 built from a seed, saved the way the pipeline's stages save theirs (weights, tokenizer, rlhf_run.json). A
`Project` writes what a finished pipeline run leaves behind for `rlhf register`: the three model folders, the
evaluation metrics and the gate verdicts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROLES = ("sft", "reward", "policy")
NAMES = {"sft": "rlhf-sft", "reward": "rlhf-reward", "policy": "rlhf-policy"}
FOLDERS = {"sft": "models/sft", "reward": "models/reward", "policy": "models/ppo"}
STAGES = {"sft": "sft", "reward": "reward", "policy": "ppo"}
DATASETS = {"sft": ("sft",), "reward": ("preferences",), "policy": ("prompts", "eval_prompts")}
GIT_COMMIT = "0123456789abcdef0123456789abcdef01234567"
DATA_DVC_MD5 = "d41d8cd98f00b204e9800998ecf8427e"
TAG = "rlhf."


def _root_conftest() -> Any:
    """tests/conftest.py as a module (its folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "rlhf_tests_root_conftest_registry", Path(__file__).parents[1] / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def project_params() -> dict[str, Any]:
    """TINY_PARAMS: its registry section serves with a prompt template and 8 new tokens."""
    return copy.deepcopy(_root_conftest().TINY_PARAMS)


# ------------------------------------------------------------------------------------------------ tiny models


def review_texts(count: int = 300) -> list[str]:
    openings = [
        "This movie was",
        "The film felt",
        "Honestly the story was",
        "I thought the plot was",
        "The cast made it",
    ]
    verdicts = ["great", "awful", "dull", "charming", "too long", "a delight", "forgettable", "moving"]
    endings = ["and I loved it.", "and I left early.", "but the music saved it.", "so watch it.", "so skip it."]
    return [f"{openings[i % 5]} {verdicts[(i // 5) % 8]} {endings[(i // 40) % 5]}" for i in range(count)]


def fingerprint(role: str, seed: int, dataset: str) -> str:
    """A stand-in for a dataset's sha256 fingerprint, distinct per model and dataset."""
    return hashlib.sha256(f"{role}/{seed}/{dataset}".encode()).hexdigest()


def provenance(role: str, seed: int) -> dict[str, Any]:
    """What the stage that trained this model would have saved beside it as rlhf_run.json."""
    return {
        "stage": STAGES[role],
        "mlflow_run_id": f"run-{role}-{seed}",
        "params_hash": hashlib.sha256(f"params/{role}/{seed}".encode()).hexdigest()[:12],
        "datasets": {dataset: fingerprint(role, seed, dataset) for dataset in DATASETS[role]},
        "git_commit": GIT_COMMIT,
        "data_dvc_md5": DATA_DVC_MD5,
    }


def build_model_folder(folder: Path, role: str, seed: int, tokenizer: Any, sft_folder: Path | None = None) -> Path:
    """Saves an untrained model for `role` in `folder`; `seed` decides its weights (and so its content hash).

    The reward model is the SFT model at `sft_folder` with a fresh one-output head, as the reward stage starts.
    """
    import torch

    from rlhf.config import ArchitectureParams
    from rlhf.modeling import build_causal_lm, load_reward_model

    # The role is part of the seed: SFT seed 1 and policy seed 1 are different models.
    torch.manual_seed(seed * 10 + ROLES.index(role))
    if role == "reward":
        model = load_reward_model(str(sft_folder), tokenizer, new_head=True)
    else:
        model = build_causal_lm(tokenizer, ArchitectureParams(n_layer=1, n_head=2, n_embd=32, n_positions=64))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "rlhf_run.json").write_text(json.dumps(provenance(role, seed), indent=2))
    return folder


class ModelStore:
    """Model folders by (role, seed), built on first use and kept for the session. Read-only: copy them."""

    def __init__(self, root: Path):
        from rlhf.config import TokenizerParams
        from rlhf.modeling import train_tokenizer

        self.root = root
        self.tokenizer = train_tokenizer(review_texts(), TokenizerParams(vocab_size=300))

    def folder(self, role: str, seed: int) -> Path:
        folder = self.root / f"{role}-{seed}"
        if not folder.is_dir():
            sft = self.folder("sft", seed) if role == "reward" else None
            staging = self.root / f".{role}-{seed}.tmp"
            build_model_folder(staging, role, seed, self.tokenizer, sft)
            staging.rename(folder)
        return folder


# ------------------------------------------------------------------------------------------ pipeline outputs


def gold_metrics(policy: float, sft: float = 0.3) -> dict[str, float]:
    """metrics/evaluate.json of a run with a gold annotator (reward-model scores too)."""
    return {
        "policy/gold_score": policy,
        "sft/gold_score": sft,
        "policy/rm_score": 10 * policy,
        "sft/rm_score": 10 * sft,
        "win_rate/gold": 0.7,
    }


def rm_metrics(policy: float, sft: float = 0.3) -> dict[str, float]:
    """metrics/evaluate.json of a run without a gold annotator: reward-model scores only."""
    return {"policy/rm_score": policy, "sft/rm_score": sft, "win_rate/rm": 0.7}


def verdict(gate: str, failed_checks: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    return {"gate": gate, "passed": not failed_checks, "failed_checks": list(failed_checks), "checks": []}


@dataclass
class Project:
    """A project folder (the working directory of the test) holding one pipeline run's outputs at a time."""

    root: Path
    store: ModelStore

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def write_params(self, params: dict[str, Any] | None = None) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(params or project_params(), sort_keys=False))

    def pipeline_run(
        self,
        sft: int = 1,
        reward: int = 1,
        policy: int = 1,
        metrics: dict[str, float] | None = None,
        failed: dict[str, list[str]] | None = None,
        missing_gates: tuple[str, ...] = (),
    ) -> None:
        """Replaces the run outputs: models from the given seeds, metrics (default: gold 0.5), verdicts (default:
        both gates passed; `failed` maps a gate to its failed checks; `missing_gates` have no verdict file)."""
        for role, seed in {"sft": sft, "reward": reward, "policy": policy}.items():
            target = self.root / FOLDERS[role]
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(self.store.folder(role, seed), target)
        (self.root / "metrics").mkdir(exist_ok=True)
        (self.root / "metrics" / "evaluate.json").write_text(json.dumps(metrics or gold_metrics(0.5)))
        gates = self.root / "gates"
        shutil.rmtree(gates, ignore_errors=True)
        gates.mkdir()
        for gate in ("reward", "evaluation"):
            if gate not in missing_gates:
                (gates / f"{gate}.json").write_text(json.dumps(verdict(gate, (failed or {}).get(gate, []))))

    def model_folder(self, role: str) -> Path:
        return self.root / FOLDERS[role]


def server_project(root: Path) -> tuple[Project, dict[str, str], list[str]]:
    """A project with one finished pipeline run, for registering on a shared tracking server: the registered model
    names carry a unique suffix. Returns the project, the names by role and the `rlhf register` command."""
    import uuid

    project = Project(root / "project", ModelStore(root / "models"))
    project.root.mkdir()
    project.write_params()
    project.pipeline_run(metrics=gold_metrics(policy=0.5))
    suffix = uuid.uuid4().hex[:8]
    names = {role: f"{NAMES[role]}-{suffix}" for role in ROLES}
    overrides = [arg for role in ROLES for arg in ("--set", f"registry.{role}_name={names[role]}")]
    return project, names, ["rlhf", "register", *overrides]


# --------------------------------------------------------------------------------------------- registry reads


def versions(client: Any, name: str) -> dict[int, Any]:
    """Every version of a registered model, by number ({} if the model is not registered)."""
    return {
        int(v.version): client.get_model_version(name, v.version)
        for v in client.search_model_versions(f"name = '{name}'")
    }


def aliases(client: Any, name: str) -> dict[str, int]:
    """alias -> version number of a registered model."""
    return {alias: int(number) for alias, number in client.get_registered_model(name).aliases.items()}


def rlhf_tags(version: Any) -> dict[str, str]:
    return {key: value for key, value in version.tags.items() if key.startswith(TAG)}


def registry_state(client: Any, names: tuple[str, ...] = tuple(NAMES.values())) -> set[tuple]:
    """(name, version, tags, aliases) of every version: what a second registration must leave as it was."""
    state = set()
    for name in names:
        for number, version in versions(client, name).items():
            state.add((name, number, frozenset(version.tags.items()), frozenset(version.aliases)))
    return state


def concurrent_registrations(
    command: list[str], cwd: Path, env: dict[str, str], count: int = 4
) -> list[subprocess.CompletedProcess[str]]:
    """`count` copies of `command` started together; each one's result."""
    processes = [
        subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results
