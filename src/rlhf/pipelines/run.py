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
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from rlhf import tracking
from rlhf.config import Params
from rlhf.pipelines.rlhf_pipeline import build_pipeline, compile_pipeline, pipeline_arguments
from rlhf.storage import scratch_dir


class PipelineError(RuntimeError):
    """A pipeline that could not run or be submitted; the message is one line."""


def _task_output(run_folder: Path, task: str, output: str) -> Path | None:
    path = run_folder / task / output
    return path if path.exists() else None


def run_local(params: Params, pipeline_root: str | Path = "kfp-local") -> dict[str, Any]:
    """Runs the whole DAG here; returns the run folder, the gate verdicts and what was registered."""
    from kfp import local

    # Every step is a subprocess: give them this process's tracking store (the sqlite default is resolved to an
    # absolute path here) and experiment.
    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = set(root.iterdir())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    pipeline = build_pipeline(params)
    with warnings.catch_warnings():
        # The local runner warns about any image without "python" in its name; here no image is used.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        try:
            pipeline(**pipeline_arguments(params))
        except RuntimeError as exc:
            raise PipelineError(f"local pipeline run failed: {exc}".splitlines()[0]) from None
    run_folder = max(set(root.iterdir()) - before, key=lambda folder: folder.stat().st_mtime)
    verdicts = {}
    for gate in ("reward", "evaluation"):
        verdict = _task_output(run_folder, f"gate-{gate}", "verdict")
        verdicts[gate] = json.loads(verdict.read_text()) if verdict else None
    registered = _task_output(run_folder, "register", "registered")
    return {"run_folder": str(run_folder), "verdicts": verdicts,
            "registered": json.loads(registered.read_text()) if registered else None}


def _describe_server_error(exc: Exception, host: str) -> str:
    """One line for what the Kubeflow Pipelines API answered, or why it could not be reached."""
    status = getattr(exc, "status", None)
    if status in (401, 403):
        return (f"{host}: {status} {getattr(exc, 'reason', '')}: not authorised "
                "(a token or cookie for this Kubeflow cluster is needed)").strip()
    if status:
        body = " ".join(str(getattr(exc, "body", "") or "").split())[:300]
        return f"{host}: the Kubeflow Pipelines API answered {status} {getattr(exc, 'reason', '')}: {body}".strip()
    message = " ".join(str(exc).split())
    if any(word in message for word in ("Connection refused", "Max retries", "Failed to establish", "timed out",
                                        "Name or service not known")):
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


def submit(params: Params, host: str, experiment: str | None = None, namespace: str | None = None,
           run_name: str | None = None) -> str:
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
                    str(package), arguments=pipeline_arguments(params), run_name=run_name,
                    experiment_name=experiment or params.kubeflow.experiment, namespace=namespace)
            except Exception as exc:  # noqa: BLE001 - the client raises many kinds; each becomes one line
                raise PipelineError(_describe_server_error(exc, host)) from None
    return f"{host.rstrip('/')}/#/runs/details/{result.run_id}"
