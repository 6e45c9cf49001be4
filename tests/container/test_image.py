"""The project's image, built for real with podman on a Debian base made here (no registry is reachable), and the
demo DAG run in it through kfp's DockerRunner (`rlhf pipeline run --local --runner docker`).

The DAG runs twice on the tiny config, once per runner, in two project folders; the container run must give the
subprocess run's metrics (1e-4), tag every MLflow run with the image's source hash (proof that each step ran in the
image), pass both gates and register a champion that loads in a fresh process. CI installs podman (.ci/run); where
it is missing outside CI these tests are skipped.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).with_name("rlhf")
RLHF = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "rlhf.cli"]
STEPS_WITH_METRICS = ("pretrain", "sft", "reward", "ppo", "evaluate")


def run(command: list[str], cwd: Path, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "RLHF_"))}
    return subprocess.run(
        command, cwd=cwd, env=environment | env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _tail(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stdout + result.stderr)[-3000:]


@pytest.fixture(scope="module")
def podman() -> str:
    if not shutil.which("podman"):
        if os.environ.get("CI"):
            pytest.fail("podman is not installed (.ci/run installs podman, runc and debootstrap)")
        pytest.skip("podman is not installed")
    return "podman"


@pytest.fixture(scope="module")
def image(podman: str) -> str:
    """`rlhf image build --debian-base --host-pip`: the CPU variant on a debootstrapped Debian, pip resolving from
    this machine's configuration."""
    result = run([*RLHF, "image", "build", "--debian-base", "--host-pip"], ROOT, timeout=2400)
    assert result.returncode == 0, _tail(result)
    built = re.search(r"^built (\S+): ([\d.]+) GB, in (\d+) s$", result.stdout, re.MULTILINE)
    assert built, result.stdout[-2000:]
    print(f"image {built.group(1)}: {built.group(2)} GB, built in {built.group(3)} s")
    return built.group(1)


def _inspect(image: str, field: str) -> object:
    result = subprocess.run(
        ["podman", "image", "inspect", "--format", f"{{{{json {field}}}}}", image],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def test_image_takes_kfp_commands_and_runs_as_non_root(image: str) -> None:
    """No entrypoint (KFP's `sh -c …` must be the command, not arguments to `rlhf`), a non-root user, and the
    pinned torch and the project inside."""
    assert not _inspect(image, ".Config.Entrypoint")
    assert _inspect(image, ".Config.User") == "rlhf"
    result = subprocess.run(
        [
            "podman",
            "run",
            "--rm",
            image,
            "sh",
            "-c",
            "id -u && python -c 'import torch, rlhf.cli; print(torch.__version__)'",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    uid, torch_version = result.stdout.split()
    assert uid == "1000"
    assert torch_version.startswith("2.13.0")


def test_a_changed_source_is_refused_and_lands_in_a_new_image(image: str, tmp_path: Path) -> None:
    """The image is named and labelled by the hash of what it is built from: an edited checkout no longer matches
    it, `--runner docker` refuses it, and building again puts the edit into a new image."""
    from rlhf.image import ImageError, build, current, default_tag

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("Dockerfile", "constraints.txt", "pyproject.toml", "README.md", ".dockerignore"):
        shutil.copyfile(ROOT / name, checkout / name)
    shutil.copytree(ROOT / "src", checkout / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    assert current(checkout, image) == image  # an identical copy is the same source

    marker = "# edited after the image was built"
    init = checkout / "src" / "rlhf" / "__init__.py"
    init.write_text(init.read_text() + f"\n{marker}\n")
    with pytest.raises(ImageError, match="built from other sources"):
        current(checkout, image)
    assert default_tag(checkout) != image

    rebuilt = build(checkout, use_host_pip=True, debian=True)
    try:
        assert rebuilt.image == default_tag(checkout) and current(checkout, rebuilt.image) == rebuilt.image
        shown = subprocess.run(
            ["podman", "run", "--rm", rebuilt.image, "python", "-c", "import rlhf; print(open(rlhf.__file__).read())"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert marker in shown.stdout
    finally:
        subprocess.run(["podman", "rmi", rebuilt.image], capture_output=True)


def _project(folder: Path, tiny_params: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(tiny_params, sort_keys=False))
    return folder


def _metrics(run_folder: Path) -> dict[str, dict[str, float]]:
    return {step: json.loads((run_folder / step / "metrics").read_text()) for step in STEPS_WITH_METRICS}


def _run_folder(output: str) -> Path:
    return Path(re.search(r"^pipeline run: (\S+)$", output, re.MULTILINE).group(1))


@pytest.fixture(scope="module")
def both_runs(image: str, tiny_params: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny demo DAG through the subprocess runner and through the Docker runner, each in its own project."""
    runs = {}
    for runner in ("subprocess", "docker"):
        folder = _project(tmp_path_factory.mktemp(runner) / "project", tiny_params)
        extra = ["--runner", "docker"] if runner == "docker" else []
        result = run([*RLHF, "pipeline", "run", "--local", *extra], folder, timeout=1800)
        assert result.returncode == 0, _tail(result)
        runs[runner] = {"folder": folder, "output": result.stdout, "run_folder": _run_folder(result.stdout)}
    return runs


def test_docker_runner_gives_the_subprocess_runners_metrics(both_runs: dict) -> None:
    local, container = (_metrics(both_runs[runner]["run_folder"]) for runner in ("subprocess", "docker"))
    for step, values in local.items():
        assert container[step].keys() == values.keys(), step
        for key, value in values.items():
            assert math.isclose(container[step][key], value, rel_tol=1e-4, abs_tol=1e-4), (step, key)


def test_every_step_ran_in_the_image_and_the_champion_loads_in_a_fresh_process(both_runs: dict, image: str) -> None:
    from mlflow import MlflowClient

    from rlhf.image import image_label

    docker = both_runs["docker"]
    assert "gate reward: passed" in docker["output"] and "gate evaluation: passed" in docker["output"]
    champion = re.search(r"^rlhf-policy v1: new version; champion", docker["output"], re.MULTILINE)
    assert champion, docker["output"][-2000:]

    source = image_label("podman", image)
    uri = f"sqlite:///{docker['folder'] / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("rlhf").experiment_id])
    stages = {run.data.tags["rlhf.stage"]: run.data.tags.get("rlhf.image_source") for run in runs}
    assert {"pipeline", "pretrain", "sft", "reward", "ppo", "evaluate", "register"} <= stages.keys()
    assert set(stages.values()) == {source}, stages
    # The steps wrote into the project as this user, not as the image's user.
    assert (docker["folder"] / "mlflow.db").stat().st_uid == os.getuid()

    answer = run(
        [
            sys.executable,
            "-c",
            "import json, mlflow; model = mlflow.pyfunc.load_model("
            "'models:/rlhf-policy@champion'); print(json.dumps(model.predict(['The acting was great.'])))",
        ],
        docker["folder"],
        timeout=300,
        MLFLOW_TRACKING_URI=uri,
    )
    assert answer.returncode == 0, _tail(answer)
    assert isinstance(json.loads(answer.stdout.strip().splitlines()[-1])[0], str)


def test_a_failing_container_fails_the_run(image: str, tiny_params: dict, tmp_path: Path) -> None:
    """DockerRunner reports success for a container that is gone before its exit code is read; the run checks each
    step's outputs instead, so a step that fails in the image fails the run with one line naming it."""
    broken = tiny_params | {"sft": tiny_params["sft"] | {"dataset": "data/missing.jsonl"}}
    folder = _project(tmp_path / "project", broken)
    result = run([*RLHF, "pipeline", "run", "--local", "--runner", "docker"], folder, timeout=900)
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "sft" in error, error
    assert "champion" not in result.stdout
