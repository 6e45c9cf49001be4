"""The Kubeflow DAG: data -> pretrain -> sft and reward (from the model reward.base_model names) -> gate -> ppo ->
evaluate -> gate -> register.

Each gate returns "passed" or "failed"; `dsl.If` runs the rest only on "passed", so a failed gate skips everything
downstream. The whole DAG sits in an exit handler that closes the pipeline's MLflow parent run (FINISHED or FAILED).
The pipeline's parameters are the knobs people tune, typed (`<step>_<key>`: a learning rate is a number field in the
run form, not a key in a JSON blob; they win over the sections' values), then params.yaml's sections whole (validated
before compiling or submitting); resources, retries, caching and Kubernetes settings come from its `kubeflow` section.
"""

# No `from __future__ import annotations`: kfp reads the pipeline function's annotations as types.
import ast
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf.config import UNPUBLISHED_IMAGE, ConfigError, KubeflowConfig, Params, to_kfp
from rlhf.steps import SECTIONS, STEP_NAMES, STEPS


def knob_arguments(params: Params) -> dict[str, Any]:
    """The typed run parameters, `<step>_<key>` for each of a step's knobs, from `params` (a null as "")."""
    return {
        f"{step.name}_{key}": "" if value is None else value
        for step in STEPS
        for key in step.knobs
        for value in [getattr(getattr(params, step.section), key)]
    }


def pipeline_arguments(params: Params) -> dict[str, Any]:
    """The pipeline's run arguments: each params.yaml section as a dict, the data source and the typed knobs."""
    return (
        {section: to_kfp(getattr(params, section).model_dump(mode="json")) for section in SECTIONS}
        | {"data_source": params.kubeflow.data_source}
        | knob_arguments(params)
    )


def reward_base_step(params: Params) -> str:
    """The step whose model the reward model starts from. reward.base_model names a folder as the CLI and DVC see
    it; in a pipeline the models are artifacts, so it must be pretrain's or sft's output_dir."""
    bases = {Path(params.pretrain.output_dir): "pretrain", Path(params.sft.output_dir): "sft"}
    base = bases.get(Path(params.reward.base_model))
    if base is None:
        raise ConfigError(
            f"reward.base_model: a pipeline trains the reward model from the pretrain or the sft "
            f"step's model ({params.pretrain.output_dir} or {params.sft.output_dir}), not "
            f"{params.reward.base_model!r}; to start from a hub model, set pretrain.base_model"
        )
    return base


def _configure(task, step: str, settings: KubeflowConfig, cached: bool = True, local: bool = False):
    """Resources, retries, caching, environment variables and the optional Kubernetes settings of one task. kfp's
    local runner ignores resources and display names, warning for each task: a local run leaves them out."""
    from kfp import kubernetes

    resources = None if local else settings.resources.get(step) or settings.resources.get("default")
    if resources is not None:
        if resources.cpu:
            task.set_cpu_request(resources.cpu).set_cpu_limit(resources.cpu)
        if resources.memory:
            task.set_memory_request(resources.memory).set_memory_limit(resources.memory)
        if resources.accelerator_type:
            task.set_accelerator_type(resources.accelerator_type)
            task.set_accelerator_limit(resources.accelerator_count or 1)
    if settings.retries:
        task.set_retry(num_retries=settings.retries, backoff_duration="30s", backoff_factor=2.0)
    task.set_caching_options(enable_caching=settings.caching and cached)
    for key, value in settings.env.items():
        task.set_env_variable(key, value)
    if settings.secret:
        kubernetes.use_secret_as_env(task, settings.secret, {key: key for key in settings.secret_env}, optional=True)
    if settings.model_cache_pvc:
        kubernetes.mount_pvc(task, settings.model_cache_pvc, mount_path=settings.model_cache_path)
    for key, value in settings.node_selector.items():
        kubernetes.add_node_selector(task, key, value)
    return task if local else task.set_display_name(step)


def build_pipeline(params: Params, local: bool = False) -> Callable:
    """The pipeline function, its parameters defaulting to `params` (what `compile` bakes in as defaults); `local`:
    for kfp's local runner."""
    from kfp import dsl

    from rlhf.components.definitions import build_components

    settings = params.kubeflow
    # Steps that request an accelerator run the CUDA image; the rest the CPU one.
    ops = {image: build_components(image) for image in {settings.image, settings.cuda_image} if image}
    defaults = pipeline_arguments(params)
    reward_base = reward_base_step(params)  # chosen when compiling: the DAG's edges are fixed then

    def step(name: str, cached: bool = True, **inputs):
        task = ops[settings.step_image(name)][name](kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, **inputs)
        return _configure(task, name, settings, cached, local)

    @dsl.pipeline(
        name=settings.pipeline_name,
        pipeline_root=settings.pipeline_root,
        description="RLHF: pretrain, SFT, reward model, PPO, evaluation, gated registration in MLflow",
    )
    # The knobs first: the run form lists them before the whole sections they override.
    def rlhf_pipeline(
        pretrain_base_model: str = defaults["pretrain_base_model"],
        sft_learning_rate: float = defaults["sft_learning_rate"],
        sft_epochs: float = defaults["sft_epochs"],
        reward_learning_rate: float = defaults["reward_learning_rate"],
        reward_epochs: float = defaults["reward_epochs"],
        ppo_learning_rate: float = defaults["ppo_learning_rate"],
        ppo_kl_coef: float = defaults["ppo_kl_coef"],
        ppo_total_episodes: int = defaults["ppo_total_episodes"],
        data_source: str = defaults["data_source"],
        demo: dict = defaults["demo"],
        pretrain: dict = defaults["pretrain"],
        sft: dict = defaults["sft"],
        reward: dict = defaults["reward"],
        ppo: dict = defaults["ppo"],
        evaluate: dict = defaults["evaluate"],
        gates: dict = defaults["gates"],
        registry: dict = defaults["registry"],
    ):
        """RLHF: pretrain, SFT, reward model, PPO, evaluation, gated registration in MLflow.

        Args:
            pretrain_base_model: the Hugging Face model (hub id or folder) to start from; empty: pretrain the tiny
                model from scratch.
            sft_learning_rate: supervised fine-tuning's peak learning rate.
            sft_epochs: passes over the SFT dataset.
            reward_learning_rate: the reward model's peak learning rate.
            reward_epochs: passes over the preference pairs.
            ppo_learning_rate: PPO's learning rate for the policy and its critic.
            ppo_kl_coef: beta, the weight of the KL penalty to the SFT model in PPO's reward.
            ppo_total_episodes: prompts PPO samples answers for, in all.
            data_source: "demo" (the generated demo task) or a folder (local or s3://) of the pipeline's datasets.
            demo: params.yaml's demo section (the demo task's sizes and seed).
            pretrain: params.yaml's pretrain section (pretrain_base_model wins over its base_model).
            sft: params.yaml's sft section (the sft_* parameters win over its keys).
            reward: params.yaml's reward section (the reward_* parameters win over its keys; its base_model, the
                pretrain or sft step's model, is fixed when the pipeline is compiled).
            ppo: params.yaml's ppo section (the ppo_* parameters win over its keys).
            evaluate: params.yaml's evaluate section.
            gates: params.yaml's gates section: the thresholds the reward model and the policy must clear.
            registry: params.yaml's registry section: model names, serving settings.
        """
        close = step("close_pipeline_run", cached=False)
        with dsl.ExitHandler(close, name="rlhf"):
            data = step("data", demo=demo, source=data_source)
            dataset = data.outputs["dataset"]
            pretrained = step("pretrain", params=pretrain, base_model=pretrain_base_model, dataset=dataset)
            tuned = step(
                "sft",
                params=sft,
                learning_rate=sft_learning_rate,
                epochs=sft_epochs,
                dataset=dataset,
                base_model=pretrained.outputs["model"],
            )
            reward_base_model = {"pretrain": pretrained, "sft": tuned}[reward_base].outputs["model"]
            scorer = step(
                "reward",
                params=reward,
                learning_rate=reward_learning_rate,
                epochs=reward_epochs,
                dataset=dataset,
                base_model=reward_base_model,
            )
            reward_gate = step(
                "gate_reward",
                params=gates,
                reward_metrics=scorer.outputs["metrics"],
                reward_model=scorer.outputs["model"],
            )
            with dsl.If(reward_gate.outputs["Output"] == "passed", name="reward-model-passed"):
                policy = step(
                    "ppo",
                    params=ppo,
                    learning_rate=ppo_learning_rate,
                    kl_coef=ppo_kl_coef,
                    total_episodes=ppo_total_episodes,
                    dataset=dataset,
                    sft_model=tuned.outputs["model"],
                    reward_model=scorer.outputs["model"],
                )
                evaluation = step(
                    "evaluate",
                    params=evaluate,
                    dataset=dataset,
                    policy_model=policy.outputs["model"],
                    sft_model=tuned.outputs["model"],
                    reward_model=scorer.outputs["model"],
                )
                evaluation_gate = step(
                    "gate_evaluation",
                    params=gates,
                    evaluation_metrics=evaluation.outputs["metrics"],
                    report=evaluation.outputs["report"],
                )
                with dsl.If(evaluation_gate.outputs["Output"] == "passed", name="policy-passed"):
                    step(
                        "register",
                        params=registry,
                        sft_model=tuned.outputs["model"],
                        reward_model=scorer.outputs["model"],
                        policy_model=policy.outputs["model"],
                        evaluation_metrics=evaluation.outputs["metrics"],
                        reward_verdict=reward_gate.outputs["verdict"],
                        evaluation_verdict=evaluation_gate.outputs["verdict"],
                    )

    return rlhf_pipeline


def check_cluster_settings(settings: KubeflowConfig) -> list[str]:
    """Before a pipeline goes to a cluster: raises ConfigError when its steps would track to pod-local SQLite files;
    returns warnings (the unpublished default image)."""
    problem = settings.tracking_problem()
    if problem:
        raise ConfigError(
            f"kubeflow: {problem}; set kubeflow.secret (with MLFLOW_TRACKING_URI), "
            "kubeflow.env.MLFLOW_TRACKING_URI or kubeflow.mlflow_integration: true, or allow it with "
            "--allow-local-tracking"
        )
    unpublished_name = UNPUBLISHED_IMAGE.split(":")[0]
    return [
        f"kubeflow.{key} is {image}, which no registry has: build and push the image (rlhf image build "
        f"{'--variant cuda ' if key == 'cuda_image' else ''}--tag REGISTRY/rlhf-pipeline:TAG --push) and set "
        f"kubeflow.{key}"
        for key, image in (("image", settings.image), ("cuda_image", settings.cuda_image))
        if image and image.split(":")[0] == unpublished_name
    ]


def compile_pipeline(params: Params, package_path: str | Path) -> list[str]:
    """Writes the pipeline's IR YAML (what Kubeflow runs and `kfp.components.load_component_from_file` loads);
    returns warnings about settings a cluster would not accept."""
    warnings = check_cluster_settings(params.kubeflow)
    _compile(build_pipeline(params), Path(package_path))
    return warnings


def _compile(pipeline_or_component, path: Path) -> None:
    """kfp's compiler, made byte-for-byte repeatable: its header comment prints dict defaults in a different key order
    on every run, so those are rewritten with sorted keys. Written whole or not at all."""
    from kfp import compiler

    from rlhf.storage import atomic_file, scratch_dir

    with scratch_dir() as scratch:
        compiler.Compiler().compile(pipeline_or_component, package_path=str(scratch / path.name))
        compiled = (scratch / path.name).read_text(encoding="utf-8")
    header, first_key, body = compiled.partition("\n" + _FIRST_SPEC_KEY)  # no header: JSON output
    with atomic_file(path) as handle:
        handle.write(_DEFAULT.sub(_sorted_default, header) + first_key + body)


_FIRST_SPEC_KEY = "components:"  # the header comment ends where the spec's first key begins
_DEFAULT = re.compile(r"\[Default: (\{.*\})\]$", re.MULTILINE)


def _sorted_default(match: re.Match) -> str:
    def sort(value: Any) -> Any:
        return {key: sort(value[key]) for key in sorted(value)} if isinstance(value, dict) else value

    return f"[Default: {sort(ast.literal_eval(match.group(1)))}]"


# The compiled YAMLs kept in the repository, for Kubeflow users who upload or load them without the package:
# params.yaml's pipeline, one per recipe, and every component (built from params.yaml's kubeflow settings).
PIPELINES_DIR, COMPONENTS_DIR, RECIPES_DIR = "pipelines", "components", "recipes"


def export(root: Path, output: Path) -> list[Path]:
    """Compiles params.yaml's pipeline (pipelines/rlhf_pipeline.yaml), each recipe's (pipelines/<recipe>.yaml) and
    each component (components/<name>.yaml) from the checkout at `root` into `output`; returns the files written.
    They are references: compile your own with your image and tracking server (`rlhf pipeline compile`)."""
    from rlhf.components.definitions import build_components
    from rlhf.config import load_params

    def local(params: Params) -> Params:
        # The committed files name no tracking server: that is set per deployment.
        return params.model_copy(update={"kubeflow": params.kubeflow.model_copy(update={"allow_local_tracking": True})})

    params = local(load_params(root / "params.yaml"))
    sources = {output / PIPELINES_DIR / "rlhf_pipeline.yaml": params}
    for recipe in sorted((root / RECIPES_DIR).glob("*.yaml")):
        sources[output / PIPELINES_DIR / f"{recipe.stem}.yaml"] = local(load_params(recipe))
    written = []
    for path, pipeline_params in sources.items():
        compile_pipeline(pipeline_params, path)
        written.append(path)
    names = (*STEP_NAMES, "close_pipeline_run")
    images = {name: params.kubeflow.step_image(name) for name in names}
    components = {image: build_components(image) for image in set(images.values())}
    for name in names:
        path = output / COMPONENTS_DIR / f"{name}.yaml"
        _compile(components[images[name]][name], path)
        written.append(path)
    return written
