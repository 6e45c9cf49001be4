"""Running the DAG: on this machine with kfp's local runner, or on a Kubeflow Pipelines cluster.

The local run is the project's main job on the embedded default: each step runs as a subprocess of this Python
(`SubprocessRunner(use_venv=False)`, components built with `install_kfp_package=False`, so it works offline), its
artifacts under `kfp-local/`, tracking to the same MLflow store as the CLI.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from rlhf import tracking
from rlhf.config import Params
from rlhf.console import PROGRESS_ENV, PipelineConsole
from rlhf.pipelines.rlhf_pipeline import build_pipeline, compile_pipeline, pipeline_arguments
from rlhf.steps import GATES, STEPS, gate_step
from rlhf.storage import atomic_dir, project_root, scratch_dir


class PipelineError(RuntimeError):
    """A pipeline that could not run or be submitted; the message is one line."""


def _task_output(run_folder: Path, task: str, output: str) -> Path | None:
    path = run_folder / task / output
    return path if path.exists() else None


# What a step's container inherits from this process: the tracking store and its credentials, S3, the project's
# own settings, the Hub's, and the thread counts (with the same threads a container computes what the subprocess
# runner computes, to the last bit). Paths to files on this machine (CA bundles, credential files) are left out.
FORWARDED_PREFIXES = ("MLFLOW_", "AWS_", "RLHF_", "HF_", "TOKENIZERS_", "DVC_")
FORWARDED = {"OMP_NUM_THREADS", "MKL_NUM_THREADS"}
NOT_FORWARDED = {"AWS_CA_BUNDLE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "RLHF_IMAGE_SOURCE"}


def _container_environment() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if (key.startswith(FORWARDED_PREFIXES) or key in FORWARDED) and key not in NOT_FORWARDED
    }
    # HOME: the step runs as this machine's user, who may have no home in the image.
    return env | {"HOME": "/tmp", "RLHF_GIT_COMMIT": tracking.git_commit() or ""}


def _docker_runner():
    """kfp's DockerRunner for steps in the project's image: host network (the tracking server and S3 endpoint
    answer on this machine's addresses), the project folder at the same path (the sqlite store, data and models that
    params name), the working directory kept, and this user's uid so that what the steps write stays ours."""
    import docker
    from kfp import local

    folders = {str(project_root()), str(Path.cwd().resolve())}
    outermost = [folder for folder in folders if not any(folder.startswith(other + "/") for other in folders)]
    mounts = [docker.types.Mount(target=folder, source=folder, type="bind") for folder in sorted(outermost)]
    return local.DockerRunner(
        network_mode="host", mounts=mounts, working_dir=str(Path.cwd().resolve()), user=f"{os.getuid()}:{os.getgid()}"
    )


def _unfinished_steps(run_folder: Path, verdicts: dict[str, Any]) -> list[str]:
    """Steps that should have run but did not finish. kfp writes a task's executor_output.json when its function
    returns; DockerRunner reports success for a container that exited before it could read the status, so the
    outputs, not the runner, say whether a step ran."""
    expected = []
    for step in STEPS:  # in DAG order, up to the first gate that did not pass
        expected.append(_task_name(step.name))
        if step.gate and not (verdicts.get(step.gate) or {}).get("passed"):
            break
    return [task for task in expected if not (run_folder / task / "executor_output.json").exists()]


def _task_name(step: str) -> str:
    """kfp names a task after its component, with dashes."""
    return step.replace("_", "-")


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ while the local runner's step processes (which inherit it) run, restored after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_local(
    params: Params, pipeline_root: str | Path = "kfp-local", image: str | None = None, verbose: bool = False
) -> dict[str, Any]:
    """Runs the whole DAG here, each step a subprocess of this Python or, with `image`, a container of that image
    (podman or docker); returns the run folder, the gate verdicts, what was registered, the pipeline's MLflow run
    and the evaluation report's copy under reports/. The console shows one line per step and the progress of the
    long loops (rlhf.console); `verbose`: everything kfp prints."""
    from kfp import local

    from rlhf.image import docker_api

    # Every step gets this process's tracking store (the sqlite default resolved to an absolute path here) and
    # experiment: subprocesses inherit it; containers get it as task environment.
    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = set(root.iterdir())
    # The steps (subprocesses, or containers through the forwarded environment) print progress records, not bars.
    progress = {} if verbose else {PROGRESS_ENV: "lines"}
    if image:
        # Locally every step runs the one image, GPU steps included.
        kubeflow = params.kubeflow.model_copy(
            update={
                "image": image,
                "cuda_image": image,
                "env": params.kubeflow.env | _container_environment() | progress,
            }
        )
        params = params.model_copy(update={"kubeflow": kubeflow})
    started = time.time()
    console = None if verbose else PipelineConsole(sys.stdout)
    with contextlib.ExitStack() as stack:
        if image:
            stack.enter_context(docker_api())
        if console:
            stack.enter_context(contextlib.redirect_stdout(console))
            stack.callback(console.close_bar)
        runner = _docker_runner() if image else local.SubprocessRunner(use_venv=False)
        local.init(runner=runner, pipeline_root=str(root), raise_on_error=True)
        stack.enter_context(_environment(progress))
        pipeline = build_pipeline(params, local=True)
        failure = None
        with warnings.catch_warnings():
            # The local runner warns about any image without "python" in its name.
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            try:
                pipeline(**pipeline_arguments(params))
            except (RuntimeError, ValueError) as exc:
                # kfp raises RuntimeError for a failed task, ValueError when a later task asks for its outputs.
                failure = f"local pipeline run failed: {exc}".splitlines()[0]
    new_folders = set(root.iterdir()) - before
    if not new_folders:
        raise PipelineError(failure or f"the local runner wrote no run folder under {root}")
    run_folder = max(new_folders, key=lambda folder: folder.stat().st_mtime)
    verdicts = {}
    for gate in GATES:
        verdict = _task_output(run_folder, _task_name(gate_step(gate).name), "verdict")
        verdicts[gate] = json.loads(verdict.read_text()) if verdict else None
    unfinished = _unfinished_steps(run_folder, verdicts)
    if unfinished:
        where = f" in {image}" if image else ""
        raise PipelineError(f"step {unfinished[0]} did not finish{where} (see its log above): {run_folder}")
    if failure:
        raise PipelineError(failure)
    registered = _task_output(run_folder, "register", "registered")
    return {
        "run_folder": str(run_folder),
        "verdicts": verdicts,
        "registered": json.loads(registered.read_text()) if registered else None,
        "mlflow_run": _pipeline_mlflow_run(started),
        "report": _copy_report(run_folder, _task_name("evaluate"), "report", "report.html"),
        "decision": _copy_report(run_folder, "register", "decision", "decision.html"),
    }


def _pipeline_mlflow_run(started: float) -> dict[str, str] | None:
    """The MLflow run this pipeline run made (the newest pipeline run since `started`): its id and experiment. None
    when the tracking store cannot say: the summary then goes without the link, the run having succeeded."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking.tracking_uri())
    try:
        experiment = client.get_experiment_by_name(tracking.experiment_name())
        found = experiment and client.search_runs(
            [experiment.experiment_id],
            f"tags.`rlhf.stage` = 'pipeline' and attributes.start_time >= {int(started * 1000)}",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    except MlflowException:
        return None
    return {"run_id": found[0].info.run_id, "experiment_id": experiment.experiment_id} if found else None


def _copy_report(run_folder: Path, task: str, output: str, page: str) -> str | None:
    """A step's report folder (the evaluation report, the decision page), copied from its artifacts into
    reports/<run folder>/, where people look for it; returns the path of its page."""
    report = _task_output(run_folder, task, output)
    if report is None:
        return None
    target = project_root() / "reports" / run_folder.name
    with atomic_dir(str(target)) as staging:
        if target.is_dir():  # the other step's pages, copied first
            shutil.copytree(target, staging, dirs_exist_ok=True)
        shutil.copytree(report, staging, dirs_exist_ok=True)
    return str(target / page)


def _describe_server_error(exc: Exception, host: str) -> str:
    """One line for what the Kubeflow Pipelines API answered, or why it could not be reached."""
    status = getattr(exc, "status", None)
    if status in (401, 403):
        return (
            f"{host}: {status} {getattr(exc, 'reason', '')}: not authorised "
            "(a token or cookie for this Kubeflow cluster is needed)"
        ).strip()
    if status:
        body = " ".join(str(getattr(exc, "body", "") or "").split())[:300]
        return f"{host}: the Kubeflow Pipelines API answered {status} {getattr(exc, 'reason', '')}: {body}".strip()
    message = " ".join(str(exc).split())
    if any(
        word in message
        for word in (
            "Connection refused",
            "Max retries",
            "Failed to establish",
            "timed out",
            "Name or service not known",
        )
    ):
        return f"{host}: cannot reach the Kubeflow Pipelines API (…{message[-160:]})"
    return f"{host}: {type(exc).__name__}: {message[:300]}"


def _client(host: str, namespace: str | None):
    import kfp

    class OneHealthCheckClient(kfp.Client):
        """kfp.Client asks /healthz up to five times, 5 s apart, logging a traceback each time, even for a 401;
        one answer is enough to report."""

        def get_kfp_healthz(self, sleep_duration: int = 5):
            return self._healthz_api.healthz_service_get_healthz()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This client only works", category=FutureWarning)
        return OneHealthCheckClient(host=host, namespace=namespace)


def submit(
    params: Params, host: str, experiment: str | None = None, namespace: str | None = None, run_name: str | None = None
) -> str:
    """Compiles the pipeline, files a run on the cluster at `host`, and returns the run's URL."""
    run_name = run_name or f"{params.kubeflow.pipeline_name} {datetime.now():%Y-%m-%d %H-%M-%S}"
    with scratch_dir() as folder:
        package = folder / "rlhf_pipeline.yaml"
        compile_pipeline(params, str(package))
        # kfp prints "Experiment details"/"Run details" links; the caller prints the run's URL, once.
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                client = _client(host, namespace)
                result = client.create_run_from_pipeline_package(
                    str(package),
                    arguments=pipeline_arguments(params),
                    run_name=run_name,
                    experiment_name=experiment or params.kubeflow.experiment,
                    namespace=namespace,
                )
            except Exception as exc:
                raise PipelineError(_describe_server_error(exc, host)) from None
    return f"{host.rstrip('/')}/#/runs/details/{result.run_id}"
