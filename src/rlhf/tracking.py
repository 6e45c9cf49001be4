"""MLflow tracking: one run per stage, with params, per-step metrics, dataset inputs, the model, and lineage tags.

The embedded default is `sqlite:///mlflow.db` in the project root; `MLFLOW_TRACKING_URI` overrides it and
`MLFLOW_EXPERIMENT_NAME` picks the experiment (default `rlhf`). Nothing here runs on import.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from rlhf.data.io import fingerprint
from rlhf.storage import fetch, project_root

DEFAULT_EXPERIMENT = "rlhf"
# MLflow 3's UI opens an experiment without this tag as GenAI (traces); ours holds training runs and models.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
PARENT_RUN_ENV = "RLHF_PARENT_RUN_ID"


def is_main_process() -> bool:
    """Under `accelerate launch`, only rank 0 tracks and writes outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


# How long a command waits for an unreachable tracking server before it gives up (seconds).
WAIT_ENV, DEFAULT_WAIT = "RLHF_TRACKING_WAIT", 30.0
_SQLITE_HEADER = b"SQLite format 3\x00"


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be used: a server that does not answer, a database file that is not one."""


def redact(text: str) -> str:
    """`text` with the password of any URI in it replaced (http://alice:***@host): URIs carry credentials."""
    return re.sub(r"(\w+://[^/\s:@]+):[^/\s@]+@", r"\1:***@", text)


def _wait_seconds() -> float:
    value = os.environ.get(WAIT_ENV, "")
    try:
        return float(value) if value else DEFAULT_WAIT
    except ValueError:
        raise TrackingUnavailable(f"{WAIT_ENV}={value!r}: expected a number of seconds") from None


def _wait_for_server(uri: str) -> None:
    """Returns once the server answers (any HTTP status will do); prints a line per retry, and gives up after
    RLHF_TRACKING_WAIT seconds with one line instead of MLflow's own four minutes of silent retries."""
    import requests

    wait = _wait_seconds()
    deadline = time.monotonic() + wait
    started = time.monotonic()
    while True:
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=max(1.0, min(5.0, deadline - time.monotonic())))
            return
        except requests.RequestException as exc:
            reason = _connection_reason(exc)
        waited = time.monotonic() - started
        if time.monotonic() + 1 >= deadline:
            raise TrackingUnavailable(
                f"MLflow at {redact(uri)} cannot be reached ({reason}) after {waited:.0f} s; "
                f"is the server up? ({WAIT_ENV} sets how long to wait)"
            )
        print(f"MLflow at {redact(uri)}: {reason}; retrying ({waited:.0f} of {wait:.0f} s)", flush=True)
        time.sleep(min(3.0, max(0.0, deadline - time.monotonic() - 1)))


def _connection_reason(exc: Exception) -> str:
    text = str(exc)
    for pattern, reason in (
        (r"Connection refused", "connection refused"),
        (r"Name or service not known|nodename nor servname|Temporary failure in name resolution", "unknown host"),
        (r"timed out|Timeout", "no answer"),
        (r"No route to host", "no route to host"),
    ):
        if re.search(pattern, text):
            return reason
    return type(exc).__name__


def sqlite_path(uri: str) -> Path | None:
    # sqlite:///relative.db, sqlite:////absolute.db; in-memory and `file:` URIs have no path to check.
    path = uri.removeprefix("sqlite://").split("?", 1)[0]
    if not path.startswith("/") or path in ("/", "/:memory:") or path.startswith("/file:"):
        return None
    return Path(path[1:])


def _check_sqlite(uri: str) -> None:
    """One line for a database file that cannot hold MLflow's store, before SQLAlchemy's page-long errors."""
    path = sqlite_path(uri)
    if path is None:
        return
    if path.is_dir():
        raise TrackingUnavailable(f"MLflow store {path}: a folder, not an SQLite database file")
    if path.is_file():
        with path.open("rb") as handle:
            header = handle.read(len(_SQLITE_HEADER))
        if header and header != _SQLITE_HEADER:
            raise TrackingUnavailable(f"MLflow store {path}: not an SQLite database")
    elif not path.parent.is_dir():
        raise TrackingUnavailable(f"MLflow store {path}: its folder {path.parent} does not exist")


def _open_store(uri: str) -> None:
    # Opening the store creates MLflow's tables in a database without them: one that cannot be written fails here.
    # A database file not there yet is left to the run that needs it (a command that fails on its input first
    # creates nothing).
    path = sqlite_path(uri)
    if path is not None and not path.exists():
        return
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


_ready: set[str] = set()


def require_store() -> str:
    """The tracking URI, once its store can be used: a server that answers, an SQLite file that is a database.
    Checked once per process."""
    uri = tracking_uri()
    if uri not in _ready:
        if uri.startswith(("http://", "https://")):
            _wait_for_server(uri)
        elif uri.startswith("sqlite:"):
            _check_sqlite(uri)
            _open_store(uri)
        _ready.add(uri)
    return uri


def client():
    """An MLflow client of the tracking store (and its registry), once the store can be used."""
    from mlflow import MlflowClient

    uri = require_store()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def git_commit(root: Path | None = None) -> str | None:
    """The commit of the checkout at `root` (default: the project's); in the image (no git, no checkout) the one it
    was built from (RLHF_GIT_COMMIT)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or project_root(), capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("RLHF_GIT_COMMIT") or None
    return result.stdout.strip()


def injected_run() -> str | None:
    """The run Kubeflow Pipelines' MLflow integration made for this task (MLFLOW_RUN_ID, with MLFLOW_TRACKING_URI
    and MLFLOW_EXPERIMENT_ID, in that experiment and nested under the pipeline run's own MLflow run): the stage logs
    into it."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def data_dvc_md5() -> str | None:
    """The md5 that data.dvc records for data/: which version of the datasets a run used."""
    path = project_root() / "data.dvc"
    if not path.exists():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def mark_experiment(client, experiment) -> None:
    """Tags the experiment as model training, unless its kind is set already (by a user or by MLflow)."""
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def lineage_tags() -> dict[str, str]:
    # rlhf.image_source: the source hash of the image the run ran in (absent outside the image).
    tags = {
        "rlhf.git_commit": git_commit(),
        "rlhf.data_dvc_md5": data_dvc_md5(),
        "rlhf.image_source": os.environ.get("RLHF_IMAGE_SOURCE"),
    }
    return {key: value for key, value in tags.items() if value}


def describe_params(params: dict[str, Any]) -> dict[str, Any]:
    """Params as a run's page should show them: a model folder that a stage of this project wrote names that stage
    and its MLflow run ("sft run 23cf…": the upstream run, where the path in a Kubeflow run is a temporary artifact
    folder); any other path inside the project is relative to it; everything else (s3:// URIs, values) as it is."""
    root = project_root().resolve()
    described = {}
    for key, value in params.items():
        if (
            isinstance(value, str)
            and value
            and "://" not in value
            and (Path(value).exists() or Path(value).is_absolute())
        ):
            path = Path(value).resolve()  # an output folder not yet written is named all the same
            upstream = read_provenance(path) if path.is_dir() else {}
            if upstream.get("mlflow_run_id"):
                value = f"{upstream['stage']} run {upstream['mlflow_run_id']}"
            elif path.is_relative_to(root):
                value = str(path.relative_to(root))
        described[key] = value
    return described


CHECKPOINTS_TAG = "rlhf.checkpoints"


def _supersede_stale_runs(run, checkpoints: str) -> None:
    """Runs of earlier attempts at the same training (same checkpoints: same config, data and input models) that
    are still RUNNING were killed (SIGKILL, a lost node) and never ended: this attempt marks them KILLED."""
    store = client()
    stale = store.search_runs(
        [run.info.experiment_id], f"tags.`{CHECKPOINTS_TAG}` = '{checkpoints}' and attributes.status = 'RUNNING'"
    )
    for earlier in stale:
        if earlier.info.run_id != run.info.run_id:
            store.set_tag(earlier.info.run_id, "rlhf.superseded_by", run.info.run_id)
            store.set_terminated(earlier.info.run_id, "KILLED")


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any], checkpoints: Path | None = None) -> Iterator[Any]:
    """Starts (on the main process) the MLflow run of one stage; it ends FAILED if the block raises.

    Yields the active run, or None on other processes. An active run, or else the run named by RLHF_PARENT_RUN_ID
    (the pipeline's run, under Kubeflow), becomes its parent. With `checkpoints` (the stage's checkpoint folder),
    the run is tagged with it and the runs of killed earlier attempts at the same training are closed.
    """
    if not is_main_process():
        yield None
        return
    import mlflow

    mlflow.set_tracking_uri(require_store())
    tags = {"rlhf.stage": stage, **lineage_tags(), **({CHECKPOINTS_TAG: checkpoints.name} if checkpoints else {})}
    if injected_run() and mlflow.active_run() is None:
        # Kubeflow made this task's run, under its pipeline run, and closes it when the task ends. While it is
        # active the variable is unset: the trainers' MLflow callback would otherwise start the same run again.
        run_id = os.environ.pop("MLFLOW_RUN_ID")
        try:
            with mlflow.start_run(run_id=run_id, tags=tags) as run:
                if checkpoints:
                    _supersede_stale_runs(run, checkpoints.name)
                mlflow.log_params(describe_params(params))
                yield run
        finally:
            os.environ["MLFLOW_RUN_ID"] = run_id
        return
    # By name: MLFLOW_EXPERIMENT_ID is also what mlflow.set_experiment leaves behind for subprocesses, whatever the
    # tracking store; an injected task run carries its experiment itself.
    mark_experiment(client(), mlflow.set_experiment(experiment_name()))
    nested = mlflow.active_run() is not None
    # Under Kubeflow each stage is its own process: the pipeline's parent run comes by id.
    parent = None if nested else os.environ.get(PARENT_RUN_ENV)
    with mlflow.start_run(run_name=stage, nested=nested or bool(parent), parent_run_id=parent, tags=tags) as run:
        if checkpoints:
            _supersede_stale_runs(run, checkpoints.name)
        mlflow.log_params(describe_params(params))
        yield run


def log_dataset(split, name: str, source: str, source_fingerprint: str, context: str) -> None:
    """Records one split of a dataset as a run input, under the split's own content fingerprint.

    The fingerprint of the whole source file is a run param too, so two runs on the same data are easy to match.
    """
    if not is_main_process():
        return
    import mlflow

    split_fingerprint = fingerprint(split.to_list())
    with warnings.catch_warnings():
        # MLflow registers its local-file source under two URI schemes and warns that a path reads both ways.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        logged = mlflow.data.from_pandas(split.to_pandas(), source=source, name=name, digest=split_fingerprint[:16])
    tags = {"fingerprint": split_fingerprint, "source_fingerprint": source_fingerprint}
    mlflow.log_input(logged, context=context, tags=tags)
    mlflow.log_param(f"data.{name}.fingerprint", source_fingerprint)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    if not is_main_process():
        return
    import mlflow

    mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, step=step)


def log_table(columns: dict[str, list], artifact_file: str) -> None:
    """A table (e.g. sampled responses) as a run artifact that the MLflow UI shows as a table."""
    if not is_main_process():
        return
    import mlflow

    mlflow.log_table(columns, artifact_file=artifact_file)


def log_artifacts(path: str | Path, artifact_path: str) -> None:
    """A folder (a saved model, a report) as artifacts of the active run. `rlhf register` logs registrable models."""
    if not is_main_process():
        return
    import mlflow

    mlflow.log_artifacts(str(path), artifact_path=artifact_path)


PROVENANCE_FILE = "rlhf_run.json"
# The PPO stage's per-step metrics, saved beside its model for the evaluation report (not part of the model).
HISTORY_FILE = "training_history.json"


def provenance(stage: str, params_hash: str, datasets: dict[str, str]) -> dict[str, Any]:
    """Where a stage output came from, saved beside it: the gates tag its MLflow run, the registry copies it into
    version tags and `rlhf lineage` reads it back from there."""
    run_id = None
    if is_main_process():
        import mlflow

        active = mlflow.active_run()
        run_id = active.info.run_id if active else None
    return {
        "stage": stage,
        "mlflow_run_id": run_id,
        "params_hash": params_hash,
        "datasets": datasets,
        **{key.removeprefix("rlhf."): value for key, value in lineage_tags().items()},
    }


def read_provenance(folder: str | Path) -> dict[str, Any]:
    """The provenance saved in a stage output folder, local or s3:// ({} for folders from elsewhere, e.g. a hub
    model)."""
    import json

    path = Path(fetch(folder)) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def set_run_tags(run_id: str | None, tags: dict[str, str]) -> None:
    """Tags a finished run (a gate's verdict on the stage it judged)."""
    if not run_id or not is_main_process():
        return
    store = client()
    for key, value in tags.items():
        store.set_tag(run_id, key, value)


def log_dict(payload: dict[str, Any], artifact_file: str) -> None:
    if not is_main_process():
        return
    import mlflow

    mlflow.log_dict(payload, artifact_file)
