"""One Kubeflow Pipelines v2 component per step, typed with kfp's artifact types.

Each body imports the package and makes one call into `rlhf.components.steps`, which runs the same stage function as
the CLI and DVC. A step takes its params section as a dict and, as typed inputs, the keys of it that people tune
(`Step.knobs`), which win over the section's. The functions here are plain; `build_components` turns them into
components for a given image when the pipeline is built, so importing this module does nothing. (No `from __future__
import annotations`: kfp reads the annotations as types.)
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from rlhf.steps import STEPS


def data(demo: dict, source: str, kfp_run_id: str, dataset: Output[Dataset]):
    from rlhf.components import steps

    steps.prepare_data(demo=demo, source=source, data_dir=dataset.path, kfp_run_id=kfp_run_id)


def pretrain(
    params: dict,
    base_model: str,
    kfp_run_id: str,
    dataset: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
):
    from rlhf.components import steps

    steps.pretrain(
        section=params,
        data_dir=dataset.path,
        model_dir=model.path,
        metrics_artifact=metrics,
        kfp_run_id=kfp_run_id,
        base_model=base_model,
    )


def sft(
    params: dict,
    learning_rate: float,
    epochs: float,
    kfp_run_id: str,
    dataset: Input[Dataset],
    base_model: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
):
    from rlhf.components import steps

    steps.sft(
        section=params,
        data_dir=dataset.path,
        base_dir=base_model.path,
        model_dir=model.path,
        metrics_artifact=metrics,
        kfp_run_id=kfp_run_id,
        learning_rate=learning_rate,
        epochs=epochs,
    )


def reward(
    params: dict,
    learning_rate: float,
    epochs: float,
    kfp_run_id: str,
    dataset: Input[Dataset],
    base_model: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
):
    from rlhf.components import steps

    steps.reward(
        section=params,
        data_dir=dataset.path,
        base_dir=base_model.path,
        model_dir=model.path,
        metrics_artifact=metrics,
        kfp_run_id=kfp_run_id,
        learning_rate=learning_rate,
        epochs=epochs,
    )


def gate_reward(
    params: dict, kfp_run_id: str, reward_metrics: Input[Metrics], reward_model: Input[Model], verdict: Output[Artifact]
) -> str:
    from rlhf.components import steps

    return steps.gate(
        name="reward",
        section=params,
        metrics_path=reward_metrics.path,
        judged_dir=reward_model.path,
        verdict_path=verdict.path,
        kfp_run_id=kfp_run_id,
    )


def ppo(
    params: dict,
    learning_rate: float,
    kl_coef: float,
    total_episodes: int,
    kfp_run_id: str,
    dataset: Input[Dataset],
    sft_model: Input[Model],
    reward_model: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
):
    from rlhf.components import steps

    steps.ppo(
        section=params,
        data_dir=dataset.path,
        sft_dir=sft_model.path,
        reward_dir=reward_model.path,
        model_dir=model.path,
        metrics_artifact=metrics,
        kfp_run_id=kfp_run_id,
        learning_rate=learning_rate,
        kl_coef=kl_coef,
        total_episodes=total_episodes,
    )


def evaluate(
    params: dict,
    kfp_run_id: str,
    dataset: Input[Dataset],
    policy_model: Input[Model],
    sft_model: Input[Model],
    reward_model: Input[Model],
    report: Output[Artifact],
    metrics: Output[Metrics],
    report_markdown: Output[Markdown],
    report_html: Output[HTML],
):
    from rlhf.components import steps

    steps.evaluate(
        section=params,
        data_dir=dataset.path,
        policy_dir=policy_model.path,
        sft_dir=sft_model.path,
        reward_dir=reward_model.path,
        report_dir=report.path,
        metrics_artifact=metrics,
        markdown_path=report_markdown.path,
        html_path=report_html.path,
        kfp_run_id=kfp_run_id,
    )


def gate_evaluation(
    params: dict,
    kfp_run_id: str,
    evaluation_metrics: Input[Metrics],
    report: Input[Artifact],
    verdict: Output[Artifact],
) -> str:
    from rlhf.components import steps

    return steps.gate(
        name="evaluation",
        section=params,
        metrics_path=evaluation_metrics.path,
        judged_dir=report.path,
        verdict_path=verdict.path,
        kfp_run_id=kfp_run_id,
    )


def register(
    params: dict,
    kfp_run_id: str,
    sft_model: Input[Model],
    reward_model: Input[Model],
    policy_model: Input[Model],
    evaluation_metrics: Input[Metrics],
    reward_verdict: Input[Artifact],
    evaluation_verdict: Input[Artifact],
    registered: Output[Artifact],
    decision: Output[Artifact],
    decision_html: Output[HTML],
):
    from rlhf.components import steps

    steps.register(
        section=params,
        sft_dir=sft_model.path,
        reward_dir=reward_model.path,
        policy_dir=policy_model.path,
        evaluation_metrics_path=evaluation_metrics.path,
        reward_verdict_path=reward_verdict.path,
        evaluation_verdict_path=evaluation_verdict.path,
        registered_path=registered.path,
        decision_dir=decision.path,
        decision_html_path=decision_html.path,
        kfp_run_id=kfp_run_id,
    )


def close_pipeline_run(kfp_run_id: str, status: dsl.PipelineTaskFinalStatus):
    from rlhf.components import steps

    steps.close_pipeline_run(kfp_run_id=kfp_run_id, state=status.state)


def build_components(image: str) -> dict:
    """The components, by name, on the project's image: one per step of `rlhf.steps.STEPS` (the function of the
    same name above) and the exit handler. kfp is not installed into the image at run time: the image already has
    the pinned kfp (and local runs use this environment, offline)."""
    functions = [globals()[step.name] for step in STEPS] + [close_pipeline_run]
    return {
        function.__name__: dsl.component(function, base_image=image, install_kfp_package=False)
        for function in functions
    }
