"""What each Kubeflow component does, in plain Python: put the component's artifact paths into the stage's config
and call the same stage function the CLI and DVC call.

Component bodies (rlhf.components.definitions) only import this module and call one function. Every stage run is
nested under one MLflow parent run per pipeline run, found (or created) by its `kfp.run_id` tag.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from rlhf import tracking
from rlhf.config import Params, flatten, from_kfp
from rlhf.console import quiet_progress_bars
from rlhf.stages.dispatch import run_stage
from rlhf.steps import gate_step, step
from rlhf.storage import atomic_dir, fetch, scratch_dir, write_json

KFP_RUN_TAG = "kfp.run_id"


def _parent_run(kfp_run_id: str) -> str:
    """The MLflow run of this pipeline run (tagged with the Kubeflow run id), created by the first step that asks."""
    client = tracking.client()
    name = tracking.experiment_name()
    experiment = client.get_experiment_by_name(name) or client.get_experiment(client.create_experiment(name))
    tracking.mark_experiment(client, experiment)
    experiment_id = experiment.experiment_id
    found = client.search_runs([experiment_id], f"tags.`{KFP_RUN_TAG}` = '{kfp_run_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    tags = {KFP_RUN_TAG: kfp_run_id, "rlhf.stage": "pipeline", **tracking.lineage_tags()}
    return client.create_run(experiment_id, run_name=f"pipeline {kfp_run_id}", tags=tags).info.run_id


def _join_pipeline_run(kfp_run_id: str) -> None:
    """This step's MLflow runs nest under the pipeline's run. Where Kubeflow's MLflow integration made the task's run
    (MLFLOW_RUN_ID), that run is already nested under the pipeline's, and the stage logs into it."""
    quiet_progress_bars()
    if not tracking.injected_run():
        os.environ[tracking.PARENT_RUN_ENV] = _parent_run(kfp_run_id)


def close_pipeline_run(*, kfp_run_id: str, state: str) -> None:
    """The exit handler: the pipeline's MLflow run ends FINISHED if every task succeeded, else FAILED (Kubeflow's
    MLflow integration closes its own runs)."""
    if tracking.injected_run():
        return
    run_id = _parent_run(kfp_run_id)
    tracking.client().set_terminated(run_id, "FINISHED" if state == "SUCCEEDED" else "FAILED")


def _in(data_dir: str, configured: str) -> str:
    """A dataset file inside the data artifact: the configured file's name (data/sft.jsonl -> <artifact>/sft.jsonl)."""
    return str(Path(data_dir) / Path(configured).name)


def _configure(step_name: str, section: dict[str, Any], **values: Any) -> Any:
    """The step's validated params section, with its paths pointed at the component's artifacts and its typed run
    parameters (`Step.knobs`) in place of the section's values."""
    config_class = Params.model_fields[step(step_name).section].annotation
    return config_class.model_validate({**from_kfp(section), **values})


def _report(metrics: dict[str, float], metrics_artifact) -> None:
    """Metrics into the Kubeflow Metrics artifact: shown in the UI, and as a JSON file the gates read."""
    for key, value in metrics.items():
        metrics_artifact.log_metric(key, float(value))
    write_json(metrics_artifact.path, metrics)


def _summarise(params: dict[str, Any], metrics: dict[str, float]) -> None:
    """Each step's params and final metrics also go to the pipeline's MLflow run, so its page shows the whole run.
    (Under Kubeflow's MLflow integration the pipeline's run is Kubeflow's, and the stages' runs carry them.)"""
    parent = os.environ.get(tracking.PARENT_RUN_ENV)
    if not parent or tracking.injected_run():
        return
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    now = int(time.time() * 1000)
    try:
        tracking.client().log_batch(
            parent,
            metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
            params=[Param(key, str(value)) for key, value in tracking.describe_params(params).items()],
        )
    except MlflowException as exc:  # a summary that cannot be written (a param logged before with another value)
        print(f"warning: the pipeline's MLflow run did not take this step's summary: {str(exc).splitlines()[0]}")


def _train(stage: str, cfg, metrics_artifact, kfp_run_id: str) -> None:
    """Runs the stage, as the CLI does, and reports its metrics."""
    _join_pipeline_run(kfp_run_id)
    result = run_stage(stage, cfg)
    _report(result.metrics, metrics_artifact)
    _summarise(flatten(cfg, step(stage).section), {f"{stage}/{key}": value for key, value in result.metrics.items()})


def prepare_data(*, demo: dict[str, Any], source: str, data_dir: str, kfp_run_id: str) -> None:
    """`demo`: generate the demo datasets; otherwise copy a folder (local or s3://) holding the pipeline's dataset
    files."""
    from rlhf.data.demo import generate

    _join_pipeline_run(kfp_run_id)
    if source == "demo":
        generate(_configure("data", demo), data_dir)
    else:
        with atomic_dir(data_dir) as staging:
            shutil.copytree(fetch(source), staging, dirs_exist_ok=True)


def pretrain(
    *, section: dict[str, Any], data_dir: str, model_dir: str, metrics_artifact, kfp_run_id: str, **knobs: Any
) -> None:
    if knobs.get("base_model") == "":  # the typed run parameter's form of null: the tiny model, from scratch
        knobs["base_model"] = None
    cfg = _configure("pretrain", section, corpus=_in(data_dir, section["corpus"]), output_dir=model_dir, **knobs)
    _train("pretrain", cfg, metrics_artifact, kfp_run_id)


def sft(
    *,
    section: dict[str, Any],
    data_dir: str,
    base_dir: str,
    model_dir: str,
    metrics_artifact,
    kfp_run_id: str,
    **knobs: Any,
) -> None:
    cfg = _configure(
        "sft", section, model=base_dir, dataset=_in(data_dir, section["dataset"]), output_dir=model_dir, **knobs
    )
    _train("sft", cfg, metrics_artifact, kfp_run_id)


def reward(
    *,
    section: dict[str, Any],
    data_dir: str,
    base_dir: str,
    model_dir: str,
    metrics_artifact,
    kfp_run_id: str,
    **knobs: Any,
) -> None:
    cfg = _configure(
        "reward", section, base_model=base_dir, dataset=_in(data_dir, section["dataset"]), output_dir=model_dir, **knobs
    )
    _train("reward", cfg, metrics_artifact, kfp_run_id)


def ppo(
    *,
    section: dict[str, Any],
    data_dir: str,
    sft_dir: str,
    reward_dir: str,
    model_dir: str,
    metrics_artifact,
    kfp_run_id: str,
    **knobs: Any,
) -> None:
    cfg = _configure(
        "ppo",
        section,
        policy_model=sft_dir,
        reward_model=reward_dir,
        prompts=_in(data_dir, section["prompts"]),
        eval_prompts=_in(data_dir, section["eval_prompts"]),
        output_dir=model_dir,
        **knobs,
    )
    _train("ppo", cfg, metrics_artifact, kfp_run_id)


def evaluate(
    *,
    section: dict[str, Any],
    data_dir: str,
    policy_dir: str,
    sft_dir: str,
    reward_dir: str,
    report_dir: str,
    metrics_artifact,
    markdown_path: str,
    html_path: str,
    kfp_run_id: str,
) -> None:
    cfg = _configure(
        "evaluate",
        section,
        policy_model=policy_dir,
        sft_model=sft_dir,
        reward_model=reward_dir,
        eval_prompts=_in(data_dir, section["eval_prompts"]),
        preferences=_in(data_dir, section["preferences"]),
        output_dir=report_dir,
    )
    _train("evaluate", cfg, metrics_artifact, kfp_run_id)
    shutil.copyfile(Path(report_dir) / "report.md", markdown_path)
    shutil.copyfile(Path(report_dir) / "report.html", html_path)


def gate(
    *, name: str, section: dict[str, Any], metrics_path: str, judged_dir: str, verdict_path: str, kfp_run_id: str
) -> str:
    """Returns "passed" or "failed" for the pipeline's `dsl.If`; the verdict JSON becomes an artifact."""
    from rlhf.gates import SPECS, evaluate_gate

    spec = SPECS[name]
    _join_pipeline_run(kfp_run_id)
    with scratch_dir() as scratch:
        paths = {spec.metrics: metrics_path, spec.judged: judged_dir}
        cfg = _configure(gate_step(name).name, section, output_dir=str(scratch), **paths)
        verdict = evaluate_gate(name, cfg)
        shutil.copyfile(scratch / f"{name}.json", verdict_path)
    _summarise({}, {f"gate/{name}": float(verdict["passed"])})
    print(f"gate {name}: {'passed' if verdict['passed'] else 'failed ' + ', '.join(verdict['failed_checks'])}")
    return "passed" if verdict["passed"] else "failed"


def register(
    *,
    section: dict[str, Any],
    sft_dir: str,
    reward_dir: str,
    policy_dir: str,
    evaluation_metrics_path: str,
    reward_verdict_path: str,
    evaluation_verdict_path: str,
    registered_path: str,
    decision_dir: str,
    decision_html_path: str,
    kfp_run_id: str,
) -> None:
    from rlhf.registry import register as register_models

    _join_pipeline_run(kfp_run_id)
    with scratch_dir() as gates_dir:
        shutil.copyfile(reward_verdict_path, gates_dir / "reward.json")
        shutil.copyfile(evaluation_verdict_path, gates_dir / "evaluation.json")
        cfg = _configure(
            "register",
            section,
            sft_model=sft_dir,
            reward_model=reward_dir,
            policy_model=policy_dir,
            evaluation_metrics=evaluation_metrics_path,
            gates_dir=str(gates_dir),
            output=registered_path,
            decision_dir=decision_dir,
        )
        register_models(cfg, pipeline_run_id=f"kfp-{kfp_run_id}")  # registered versions carry the Kubeflow run
    shutil.copyfile(Path(decision_dir) / "decision.html", decision_html_path)
