"""Helpers for the Kubeflow tests: project folders with a params.yaml, reading compiled pipeline files, and walking
the compiled DAG (task inputs reach their producers through the condition and exit-handler sub-DAGs)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"

# Where each task sits: the root DAG holds the exit handler and the exit task; the exit handler's DAG holds the
# steps up to the reward gate and the first condition; each condition holds what it guards.
LAYOUT = {
    "root": {"exit-handler-1", "close-pipeline-run"},
    "comp-exit-handler-1": {"data", "pretrain", "sft", "reward", "gate-reward", "condition-2"},
    "comp-condition-2": {"ppo", "evaluate", "gate-evaluation", "condition-3"},
    "comp-condition-3": {"register"},
}
STEP_TASKS = (
    "data",
    "pretrain",
    "sft",
    "reward",
    "gate-reward",
    "ppo",
    "evaluate",
    "gate-evaluation",
    "register",
    "close-pipeline-run",
)

# A kubeflow section that turns on every setting the pipeline knows.
FULL_KUBEFLOW = {
    "image": "registry.example.com/ml/rlhf:1.4.2",
    "cuda_image": "registry.example.com/ml/rlhf:1.4.2-cuda",
    "retries": 3,
    "caching": True,
    "secret": "rlhf-mlflow",
    "secret_env": ["MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "HF_TOKEN"],
    "model_cache_pvc": "hf-model-cache",
    "env": {"RLHF_CHECKPOINT_DIR": "s3://rlhf-team/checkpoints", "AWS_DEFAULT_REGION": "eu-west-1"},
    "pipeline_root": "s3://rlhf-team/pipeline-root",
    "node_selector": {"cloud.google.com/gke-nodepool": "trainers", "disktype": "ssd"},
    "resources": {
        "default": {"cpu": "2", "memory": "6G"},
        "ppo": {"cpu": "8", "memory": "32G", "accelerator_type": "nvidia.com/gpu", "accelerator_count": 2},
    },
}


def repo_params() -> dict:
    """The project's own params.yaml, parsed."""
    return yaml.safe_load(REPO_PARAMS.read_text(encoding="utf-8"))


# The defaults, except that the steps may track to a file in their pods: these tests look at the compiled spec, and
# the refusal of pod-local tracking has its own tests.
LOCAL_TRACKING = {"allow_local_tracking": True}
# ... and a published image, so that submission prints no warning.
SUBMITTABLE = {**LOCAL_TRACKING, "image": "registry.example.com/ml/rlhf:1.4.2"}


def write_project(folder: Path, kubeflow: dict | None = None) -> Path:
    """`folder` with the project's params.yaml, its kubeflow section replaced by `kubeflow` (none: the defaults with
    local tracking allowed); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load(REPO_PARAMS.read_text(encoding="utf-8"))
    params["kubeflow"] = copy.deepcopy(LOCAL_TRACKING if kubeflow is None else kubeflow)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return folder


@dataclass
class Compiled:
    """A compiled pipeline file: the PipelineSpec document and, when Kubernetes settings exist, the PlatformSpec."""

    path: Path
    documents: list[dict]

    @property
    def spec(self) -> dict:
        return self.documents[0]

    @property
    def platform(self) -> dict | None:
        return self.documents[1] if len(self.documents) > 1 else None

    @property
    def executors(self) -> dict[str, dict]:
        return self.spec["deploymentSpec"]["executors"]

    def component(self, task: str) -> dict:
        """The component spec a step task runs (e.g. "gate-reward" -> comp-gate-reward)."""
        return self.spec["components"][f"comp-{task}"]

    def executor(self, task: str) -> dict:
        return self.executors[self.component(task)["executorLabel"]]

    def dag(self, component: str) -> dict[str, dict]:
        """The tasks of the root DAG ("root") or of a DAG component (e.g. "comp-condition-2")."""
        owner = self.spec["root"] if component == "root" else self.spec["components"][component]
        return owner["dag"]["tasks"]

    def where(self, task: str) -> str:
        """The DAG ("root" or a component name) that holds `task`."""
        owners = [name for name in self._dags() if task in self.dag(name)]
        assert len(owners) == 1, f"task {task!r} is in {owners or 'no DAG'}"
        return owners[0]

    def task(self, task: str) -> dict:
        return self.dag(self.where(task))[task]

    def all_tasks(self) -> dict[str, dict]:
        return {name: spec for owner in self._dags() for name, spec in self.dag(owner).items()}

    def source(self, task: str, name: str, kind: str = "artifacts") -> tuple[str, str]:
        """Where input `name` of `task` comes from, followed up through the enclosing sub-DAGs:
        (producer task, its output), ("pipeline", pipeline input) or ("constant", value)."""
        owner = self.where(task)
        entry = self.task(task)["inputs"][kind][name]
        while True:
            if "taskOutputArtifact" in entry:
                return entry["taskOutputArtifact"]["producerTask"], entry["taskOutputArtifact"]["outputArtifactKey"]
            if "taskOutputParameter" in entry:
                return entry["taskOutputParameter"]["producerTask"], entry["taskOutputParameter"]["outputParameterKey"]
            if "runtimeValue" in entry:
                return "constant", entry["runtimeValue"]["constant"]
            channel = entry.get("componentInputArtifact") or entry.get("componentInputParameter")
            assert channel, f"{task}.{name}: unexpected input {entry}"
            if owner == "root":
                return "pipeline", channel
            parent_task = next(name for name, spec in self.all_tasks().items() if spec["componentRef"]["name"] == owner)
            owner = self.where(parent_task)
            entry = self.task(parent_task)["inputs"][kind][channel]

    def _dags(self) -> list[str]:
        return ["root", *(name for name, spec in self.spec["components"].items() if "dag" in spec)]


def read_compiled(path: Path) -> Compiled:
    with open(path, encoding="utf-8") as handle:
        documents = [doc for doc in yaml.safe_load_all(handle) if doc is not None]
    return Compiled(Path(path), documents)


def artifact_types(definitions: dict | None) -> dict[str, str]:
    """{name: schemaTitle} of an inputDefinitions/outputDefinitions block's artifacts."""
    return {
        name: spec["artifactType"]["schemaTitle"] for name, spec in ((definitions or {}).get("artifacts") or {}).items()
    }


def parameter_types(definitions: dict | None) -> dict[str, str]:
    return {name: spec["parameterType"] for name, spec in ((definitions or {}).get("parameters") or {}).items()}


def is_subset(expected: Any, actual: Any) -> bool:
    """Every key of `expected` is in `actual` with an equal value (numbers compare by value: kfp stores 42 as
    42.0)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            key in actual and is_subset(value, actual[key]) for key, value in expected.items()
        )
    return expected == actual
