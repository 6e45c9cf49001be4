"""Shared test fixtures."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import ARTIFACT_BUCKET, DATA_BUCKET, S3Endpoint

# The real sample datasets live beside the project (never inside it): <project>/../shared/datasets.
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture
def shared_datasets() -> Path:
    """The shared datasets folder; tests that need it are skipped where it is absent."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATASETS}")
    return SHARED_DATASETS


# A configuration small enough that every stage trains in seconds on one CPU core. Tests write it as params.yaml.
TINY_PARAMS = {
    "demo": {
        "seed": 7,
        "corpus_size": 300,
        "sft_size": 120,
        "preference_size": 120,
        "rl_prompts": 16,
        "eval_prompts": 16,
    },
    "pretrain": {
        "tokenizer": {"vocab_size": 1024},
        "architecture": {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 128},
        "epochs": 1,
        "batch_size": 8,
        "max_length": 64,
        "learning_rate": 0.003,
        "logging_steps": 2,
        "save_steps": 1000,
    },
    "sft": {
        "epochs": 1,
        "batch_size": 8,
        "max_length": 64,
        "learning_rate": 0.003,
        "logging_steps": 2,
        "save_steps": 1000,
        "eval_fraction": 0.1,
    },
    "reward": {
        "epochs": 1,
        "batch_size": 8,
        "max_length": 64,
        "learning_rate": 0.003,
        "logging_steps": 2,
        "save_steps": 1000,
        "eval_fraction": 0.2,
    },
    "ppo": {
        "total_episodes": 48,
        "rollout_batch_size": 8,
        "mini_batch_size": 4,
        "ppo_epochs": 1,
        "max_new_tokens": 8,
        "eval_batch_size": 16,
        "save_steps": 2,
        "sample_steps": 2,
    },
    "evaluate": {"preferences_eval_fraction": 0.2, "max_new_tokens": 8, "batch_size": 16, "sample_rows": 4},
    # Tiny models clear no real bar: the pipeline tests run every gate with its checks off (null); the gate tests
    # set thresholds themselves.
    "gates": {
        "min_rm_accuracy": None,
        "min_win_rate_rm": None,
        "min_win_rate_gold": None,
        "min_rm_gain": None,
        "min_gold_gain": None,
        "max_kl": None,
        "min_eos_rate": None,
        "max_repetition": None,
        "max_gold_drop": None,
    },
    "registry": {"max_new_tokens": 8, "prompt_template": "Review: {prompt}\nSummary:"},
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The full demo's file first: it is the longest (a fresh clone's install and main job, then `dvc repro`), and
    `--dist loadfile` hands files out in this order, so started last it would finish last."""
    items.sort(key=lambda item: item.path.name != "test_demo_pipeline.py")  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One torch thread per process, in this process and in the subprocesses tests start (a thread count the
    caller set stays): two workers share two cores in CI, and torch jobs with a thread per core each slowed each
    other 10-20x there."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        if "OMP_NUM_THREADS" not in os.environ:
            patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test reaches a tracking server, S3 or the network unless it sets that up itself."""
    for key in list(os.environ):
        if key.startswith(("MLFLOW_", "AWS_", "RLHF_")) or key == "RANK":
            monkeypatch.delenv(key)
    # s3:// inputs are cached per test session, not in the user's ~/.cache.
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "rlhf-cache"))
    # Subprocesses find this environment's `rlhf`, `dvc` and `mlflow` even when the venv is not activated.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for key, value in {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def tiny_params() -> dict:
    """TINY_PARAMS, for fixtures wider than a function (which cannot import this conftest by name)."""
    import copy

    return copy.deepcopy(TINY_PARAMS)


@pytest.fixture(scope="session")
def tiny_demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo datasets at TINY_PARAMS sizes, generated once per session (read-only for tests: copy to modify)."""
    from rlhf.config import DemoConfig
    from rlhf.data.demo import generate

    folder = tmp_path_factory.mktemp("demo") / "data"
    generate(DemoConfig(**TINY_PARAMS["demo"]), folder)
    return folder


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_demo_data: Path) -> Path:
    """A project folder with tiny params.yaml and the tiny demo data; the test runs inside it."""
    import shutil

    import yaml

    shutil.copytree(tiny_demo_data, tmp_path / "data")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def launch_two() -> tuple[str, ...]:
    """`accelerate launch` with two processes, as a command prefix for `-m MODULE`. Each launch gets a free port for
    its process group, so launches in parallel test workers do not meet on accelerate's default port."""
    from servers import free_port

    return (
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
    )


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """A real S3 endpoint on 127.0.0.1 for the session (moto's server behind a relay that can take it down), with
    the buckets the tests use: MLflow's artifacts, and DVC remotes and stage inputs and outputs."""
    endpoint = S3Endpoint()
    endpoint.start()
    for bucket in (ARTIFACT_BUCKET, DATA_BUCKET):
        endpoint.client().create_bucket(Bucket=bucket)
    try:
        yield endpoint
    finally:
        endpoint.stop()


@pytest.fixture
def s3(s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Endpoint]:
    """The session's S3 endpoint, set in this process's environment, and brought back up after the test if the test
    took it down."""
    for key, value in s3_endpoint.env.items():
        monkeypatch.setenv(key, value)
    yield s3_endpoint
    s3_endpoint.cut_when(None)
    if not s3_endpoint.running:
        s3_endpoint.start()
