"""`rlhf pipeline compile`: the IR YAML Kubeflow runs. Nothing trains here; each file compiles in about a second.

The compiled files are produced through the CLI (`rlhf.cli.main`) from a params.yaml in a scratch folder: the
project's own params.yaml, alone or with a `kubeflow` section.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from kubeflow_helpers import (
    FULL_KUBEFLOW,
    LAYOUT,
    LOCAL_TRACKING,
    STEP_TASKS,
    Compiled,
    artifact_types,
    is_subset,
    parameter_types,
    read_compiled,
    repo_params,
    write_project,
)

from rlhf import cli
from rlhf.config import KFP_NULL, ConfigError, Params, load_params, to_kfp
from rlhf.steps import SECTIONS, STEPS

KNOBS = {f"{step.name}_{key}": (step.name, step.section, key) for step in STEPS for key in step.knobs}
PIPELINE_INPUTS = {*SECTIONS, "data_source", *KNOBS}


def _compile(folder: Path, *extra: str) -> Compiled:
    """`rlhf pipeline compile -o rlhf_pipeline.yaml` run in `folder`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert cli.main(["pipeline", "compile", "-o", "rlhf_pipeline.yaml", *extra]) == 0
    return read_compiled(folder / "rlhf_pipeline.yaml")


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    """The project's params.yaml as it is: no kubeflow section, so every Kubernetes setting is off."""
    return _compile(write_project(tmp_path_factory.mktemp("plain")))


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    """params.yaml plus a kubeflow section with an image, resources, retries, a secret, a PVC and a node selector."""
    return _compile(write_project(tmp_path_factory.mktemp("full"), FULL_KUBEFLOW))


@pytest.fixture(scope="module")
def unretried(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    """params.yaml with retries and caching turned off."""
    return _compile(write_project(tmp_path_factory.mktemp("off"), {**LOCAL_TRACKING, "retries": 0, "caching": False}))


# --- the file is valid IR ---------------------------------------------------------------------------------------


def test_compiled_file_is_one_strict_pipeline_spec_without_kubernetes_settings(plain: Compiled) -> None:
    """Without Kubernetes settings the file is a single document that parses into PipelineSpec with no unknown
    field, and there is no platform (kubernetes) config at all."""
    assert len(plain.documents) == 1
    spec = json_format.ParseDict(plain.spec, pipeline_spec_pb2.PipelineSpec(), ignore_unknown_fields=False)
    assert spec.pipeline_info.name == "rlhf-pipeline"
    assert spec.schema_version.startswith("2.")
    assert "platforms" not in plain.spec


def test_kubernetes_settings_add_a_strict_platform_spec_as_second_document(full: Compiled) -> None:
    """With Kubernetes settings the file holds two documents: the PipelineSpec, then a PlatformSpec; both parse
    strictly."""
    assert len(full.documents) == 2
    json_format.ParseDict(full.spec, pipeline_spec_pb2.PipelineSpec(), ignore_unknown_fields=False)
    platform = json_format.ParseDict(full.platform, pipeline_spec_pb2.PlatformSpec(), ignore_unknown_fields=False)
    assert set(platform.platforms) == {"kubernetes"}


@pytest.mark.parametrize("variant", ["plain", "full"])
def test_compiled_file_loads_as_a_component(variant: str, request: pytest.FixtureRequest) -> None:
    """kfp loads the compiled file back as a component whose inputs are the pipeline's parameters."""
    from kfp.components import load_component_from_file

    compiled: Compiled = request.getfixturevalue(variant)
    component = load_component_from_file(str(compiled.path))
    assert component.name == "rlhf-pipeline"
    assert set(component.component_spec.inputs) == PIPELINE_INPUTS


# --- the DAG ------------------------------------------------------------------------------------------------------


def test_every_step_sits_at_its_nesting_level(plain: Compiled) -> None:
    """The root holds the exit handler and the exit task; the exit handler holds data..gate-reward and the first
    condition; that condition holds ppo..gate-evaluation and the second, which holds register."""
    for owner, tasks in LAYOUT.items():
        assert set(plain.dag(owner)) == tasks, owner
    assert plain.task("exit-handler-1")["componentRef"]["name"] == "comp-exit-handler-1"
    assert plain.task("condition-2")["componentRef"]["name"] == "comp-condition-2"
    assert plain.task("condition-3")["componentRef"]["name"] == "comp-condition-3"
    for task in STEP_TASKS:
        assert plain.task(task)["componentRef"]["name"] == f"comp-{task}"
        assert "executorLabel" in plain.component(task)


@pytest.mark.parametrize(
    ("task", "name", "producer"),
    [
        ("pretrain", "dataset", ("data", "dataset")),
        ("sft", "dataset", ("data", "dataset")),
        ("sft", "base_model", ("pretrain", "model")),
        ("reward", "dataset", ("data", "dataset")),
        ("reward", "base_model", ("sft", "model")),  # params.yaml's reward.base_model: models/sft
        ("gate-reward", "reward_metrics", ("reward", "metrics")),
        ("gate-reward", "reward_model", ("reward", "model")),
        ("ppo", "dataset", ("data", "dataset")),
        ("ppo", "sft_model", ("sft", "model")),
        ("ppo", "reward_model", ("reward", "model")),
        ("evaluate", "dataset", ("data", "dataset")),
        ("evaluate", "policy_model", ("ppo", "model")),
        ("evaluate", "sft_model", ("sft", "model")),
        ("evaluate", "reward_model", ("reward", "model")),
        ("gate-evaluation", "evaluation_metrics", ("evaluate", "metrics")),
        ("gate-evaluation", "report", ("evaluate", "report")),
        ("register", "sft_model", ("sft", "model")),
        ("register", "reward_model", ("reward", "model")),
        ("register", "policy_model", ("ppo", "model")),
        ("register", "evaluation_metrics", ("evaluate", "metrics")),
        ("register", "reward_verdict", ("gate-reward", "verdict")),
        ("register", "evaluation_verdict", ("gate-evaluation", "verdict")),
    ],
)
def test_artifacts_flow_along_the_dag(plain: Compiled, task: str, name: str, producer: tuple[str, str]) -> None:
    """Each artifact input comes from the step that produces it (followed through the condition sub-DAGs): e.g.
    ppo trains against the SFT and reward models, register files both gate verdicts."""
    assert plain.source(task, name) == producer


@pytest.mark.parametrize(
    ("task", "inputs"),
    [
        ("data", {"demo": "demo", "source": "data_source"}),
        ("pretrain", {"params": "pretrain"}),
        ("sft", {"params": "sft"}),
        ("reward", {"params": "reward"}),
        ("gate-reward", {"params": "gates"}),
        ("ppo", {"params": "ppo"}),
        ("evaluate", {"params": "evaluate"}),
        ("gate-evaluation", {"params": "gates"}),
        ("register", {"params": "registry"}),
    ],
)
def test_each_step_gets_its_params_section_and_the_run_id(plain: Compiled, task: str, inputs: dict) -> None:
    """Every step's parameters are its params.yaml section (a pipeline input) and the KFP run id."""
    for name, pipeline_input in inputs.items():
        assert plain.source(task, name, "parameters") == ("pipeline", pipeline_input)
    assert plain.source(task, "kfp_run_id", "parameters") == ("constant", "{{$.pipeline_job_uuid}}")


@pytest.mark.parametrize(
    ("condition", "gate", "name", "upstream"),
    [
        ("condition-2", "gate-reward", "reward-model-passed", "comp-exit-handler-1"),
        ("condition-3", "gate-evaluation", "policy-passed", "comp-condition-2"),
    ],
)
def test_conditions_run_the_rest_only_when_the_gate_passed(
    plain: Compiled, condition: str, gate: str, name: str, upstream: str
) -> None:
    """Each condition compares its gate's `Output` to 'passed' and waits for that gate."""
    task = plain.task(condition)
    channel = f"pipelinechannel--{gate}-Output"
    assert plain.where(condition) == upstream
    assert task["taskInfo"]["name"] == name
    assert task["triggerPolicy"]["condition"] == f"inputs.parameter_values['{channel}'] == 'passed'"
    assert plain.source(condition, channel, "parameters") == (gate, "Output")
    assert gate in task["dependentTasks"]
    assert parameter_types(plain.component(gate)["outputDefinitions"]) == {"Output": "STRING"}


def test_exit_handler_wraps_the_whole_dag(plain: Compiled) -> None:
    """close-pipeline-run runs after the exit handler whatever its outcome, gets its final status, and is never
    served from the cache."""
    close = plain.task("close-pipeline-run")
    assert close["dependentTasks"] == ["exit-handler-1"]
    assert close["triggerPolicy"] == {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}
    assert close["inputs"]["parameters"]["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert plain.source("close-pipeline-run", "kfp_run_id", "parameters") == ("constant", "{{$.pipeline_job_uuid}}")
    assert not close.get("cachingOptions", {}).get("enableCache")
    assert plain.task("exit-handler-1")["taskInfo"]["name"] == "rlhf"
    assert parameter_types(plain.component("close-pipeline-run")["inputDefinitions"]) == {
        "kfp_run_id": "STRING",
        "status": "TASK_FINAL_STATUS",
    }


MODEL, DATASET, METRICS, ARTIFACT = "system.Model", "system.Dataset", "system.Metrics", "system.Artifact"


@pytest.mark.parametrize(
    ("task", "inputs", "outputs"),
    [
        ("data", {}, {"dataset": DATASET}),
        ("pretrain", {"dataset": DATASET}, {"model": MODEL, "metrics": METRICS}),
        ("sft", {"dataset": DATASET, "base_model": MODEL}, {"model": MODEL, "metrics": METRICS}),
        ("reward", {"dataset": DATASET, "base_model": MODEL}, {"model": MODEL, "metrics": METRICS}),
        ("gate-reward", {"reward_metrics": METRICS, "reward_model": MODEL}, {"verdict": ARTIFACT}),
        ("ppo", {"dataset": DATASET, "sft_model": MODEL, "reward_model": MODEL}, {"model": MODEL, "metrics": METRICS}),
        (
            "evaluate",
            {"dataset": DATASET, "policy_model": MODEL, "sft_model": MODEL, "reward_model": MODEL},
            {
                "report": ARTIFACT,
                "metrics": METRICS,
                "report_markdown": "system.Markdown",
                "report_html": "system.HTML",
            },
        ),
        ("gate-evaluation", {"evaluation_metrics": METRICS, "report": ARTIFACT}, {"verdict": ARTIFACT}),
        (
            "register",
            {
                "sft_model": MODEL,
                "reward_model": MODEL,
                "policy_model": MODEL,
                "evaluation_metrics": METRICS,
                "reward_verdict": ARTIFACT,
                "evaluation_verdict": ARTIFACT,
            },
            {"registered": ARTIFACT, "decision": ARTIFACT, "decision_html": "system.HTML"},
        ),
        ("close-pipeline-run", {}, {}),
    ],
)
def test_components_have_typed_artifacts(plain: Compiled, task: str, inputs: dict, outputs: dict) -> None:
    """Inputs and outputs carry kfp's artifact types (Dataset, Model, Metrics, Markdown, HTML, Artifact)."""
    component = plain.component(task)
    assert artifact_types(component.get("inputDefinitions")) == inputs
    assert artifact_types(component.get("outputDefinitions")) == outputs


def test_pipeline_inputs_are_the_params_sections_with_params_yaml_as_defaults(plain: Compiled) -> None:
    """The pipeline's inputs are the params.yaml sections (structs) and the data source; their defaults are the
    validated params.yaml, with null written as KFP_NULL."""
    parameters = plain.spec["root"]["inputDefinitions"]["parameters"]
    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    raw = repo_params()
    assert set(parameters) == PIPELINE_INPUTS
    for section in SECTIONS:
        assert parameters[section]["parameterType"] == "STRUCT"
        default = parameters[section]["defaultValue"]
        assert default == to_kfp(getattr(params, section).model_dump(mode="json")), section
        assert is_subset(to_kfp(raw.get(section, {})), default), f"{section} differs from params.yaml"
    assert (
        parameters["data_source"]["defaultValue"] == "demo" and parameters["data_source"]["parameterType"] == "STRING"
    )
    assert parameters["pretrain"]["defaultValue"]["base_model"] == KFP_NULL
    assert parameters["ppo"]["defaultValue"]["target_kl"] == KFP_NULL
    assert parameters["ppo"]["defaultValue"]["learning_rate"] == raw["ppo"]["learning_rate"]


def test_the_knobs_people_tune_are_typed_documented_run_parameters(plain: Compiled) -> None:
    """A Kubeflow user changes a learning rate in a number field, not a JSON blob whose integers read 2.0 and nulls
    '<null>': the knobs are typed parameters (number fields in the run form), with params.yaml's values as defaults
    and a description each; every step gets its own as typed inputs, which win over its section's."""
    parameters = plain.spec["root"]["inputDefinitions"]["parameters"]
    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    expected_types = {"pretrain_base_model": "STRING", "ppo_total_episodes": "NUMBER_INTEGER"}
    assert {"sft_learning_rate", "ppo_kl_coef", "ppo_total_episodes", "pretrain_base_model"} <= set(KNOBS)
    for name, (task, section, key) in KNOBS.items():
        assert parameters[name]["parameterType"] == expected_types.get(name, "NUMBER_DOUBLE"), name
        assert parameters[name]["defaultValue"] == (getattr(getattr(params, section), key) or ""), name
        assert plain.source(task, key, "parameters") == ("pipeline", name)
    assert all(parameters[name].get("description") for name in parameters), "every parameter is documented"


def test_a_knob_wins_over_its_sections_value() -> None:
    from rlhf.components import steps

    section = to_kfp(Params().sft.model_dump(mode="json"))
    assert steps._configure("sft", section, learning_rate=0.25, epochs=3.0).learning_rate == 0.25
    pretrain = to_kfp(Params().pretrain.model_dump(mode="json")) | {"base_model": "gpt2"}
    assert steps._configure("pretrain", pretrain, base_model=None).base_model is None


def test_set_overrides_change_the_compiled_defaults(tmp_path: Path) -> None:
    """`rlhf pipeline compile --set section.key=value` bakes the override into the defaults."""
    compiled = _compile(write_project(tmp_path), "--set", "ppo.learning_rate=0.0002", "--set", "gates.max_kl=null")
    defaults = {
        name: spec.get("defaultValue") for name, spec in compiled.spec["root"]["inputDefinitions"]["parameters"].items()
    }
    assert defaults["ppo"]["learning_rate"] == 0.0002
    assert defaults["gates"]["max_kl"] == KFP_NULL


# --- resources, retries, caching, Kubernetes ------------------------------------------------------------------


def test_steps_get_their_resources_or_the_default(full: Compiled) -> None:
    """kubeflow.resources.ppo gives ppo 8 CPUs, 32G and two GPUs (requests = limits); every other executor gets
    kubeflow.resources.default and no accelerator."""
    assert set(full.executors) == {f"exec-{task}" for task in STEP_TASKS}
    for task in STEP_TASKS:
        resources = full.executor(task)["container"]["resources"]
        expected = FULL_KUBEFLOW["resources"]["ppo" if task == "ppo" else "default"]
        assert resources["resourceCpuRequest"] == resources["resourceCpuLimit"] == expected["cpu"], task
        assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"] == expected["memory"], task
        if task == "ppo":
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert resources["accelerator"]["resourceCount"] == "2"
        else:
            assert "accelerator" not in resources, task


def test_no_resources_are_set_without_a_resources_section(plain: Compiled) -> None:
    """Without kubeflow.resources the cluster's defaults apply: no executor sets resources."""
    for name, executor in plain.executors.items():
        assert "resources" not in executor["container"], name


@pytest.mark.parametrize(("variant", "retries"), [("plain", 2), ("full", 3)])
def test_every_step_retries_with_backoff_and_is_cached(
    variant: str, retries: int, request: pytest.FixtureRequest
) -> None:
    """Each step retries kubeflow.retries times (default 2) with a 30 s backoff doubling each time; every step but
    the exit task may be served from the cache."""
    compiled: Compiled = request.getfixturevalue(variant)
    for task in STEP_TASKS:
        spec = compiled.task(task)
        assert is_subset(
            {"maxRetryCount": retries, "backoffDuration": "30s", "backoffFactor": 2.0}, spec["retryPolicy"]
        ), task
        assert bool(spec.get("cachingOptions", {}).get("enableCache")) is (task != "close-pipeline-run"), task


def test_retries_and_caching_can_be_turned_off(unretried: Compiled) -> None:
    """kubeflow.retries: 0 leaves out the retry policy; kubeflow.caching: false disables the cache everywhere."""
    for task in STEP_TASKS:
        spec = unretried.task(task)
        assert "retryPolicy" not in spec, task
        assert not spec.get("cachingOptions", {}).get("enableCache"), task


def test_kubernetes_settings_apply_to_every_executor(full: Compiled) -> None:
    """The secret is exposed as optional environment variables (one per secret_env key), the model cache PVC is
    mounted at model_cache_path, and the node selector labels apply, on every executor."""
    executors = full.platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(full.executors)
    keys = FULL_KUBEFLOW["secret_env"]
    for name, config in executors.items():
        [secret] = config["secretAsEnv"]
        assert secret["optional"] is True, name
        secret_names = (
            secret.get("secretName"),
            secret.get("secretNameParameter", {}).get("runtimeValue", {}).get("constant"),
        )
        assert FULL_KUBEFLOW["secret"] in secret_names, name
        assert secret["keyToEnv"] == [{"secretKey": key, "envVar": key} for key in keys], name
        [mount] = config["pvcMount"]
        assert mount["mountPath"] == "/home/rlhf/.cache/huggingface", name
        assert FULL_KUBEFLOW["model_cache_pvc"] in (
            mount.get("constant"),
            mount.get("pvcNameParameter", {}).get("runtimeValue", {}).get("constant"),
        )
        assert config["nodeSelector"]["labels"] == FULL_KUBEFLOW["node_selector"], name


def test_environment_and_pipeline_root_reach_every_executor(full: Compiled, plain: Compiled) -> None:
    """kubeflow.env becomes each step's environment (e.g. the checkpoint mirror on S3); kubeflow.pipeline_root is
    where the cluster keeps the artifacts. Without them, neither appears."""
    assert full.spec["defaultPipelineRoot"] == FULL_KUBEFLOW["pipeline_root"]
    for name, executor in full.executors.items():
        env = {item["name"]: item["value"] for item in executor["container"].get("env", [])}
        assert env == FULL_KUBEFLOW["env"], name
    assert "defaultPipelineRoot" not in plain.spec
    assert not any(executor["container"].get("env") for executor in plain.executors.values())


@pytest.mark.parametrize(("variant", "image"), [("plain", "rlhf-pipeline:latest"), ("full", FULL_KUBEFLOW["image"])])
def test_every_executor_runs_the_project_image_without_pip_install(
    variant: str, image: str, request: pytest.FixtureRequest
) -> None:
    """Every executor runs kubeflow.image (a step with an accelerator, kubeflow.cuda_image), and none installs
    packages at start-up (the image already has kfp)."""
    compiled: Compiled = request.getfixturevalue(variant)
    for name, executor in compiled.executors.items():
        container = executor["container"]
        expected = FULL_KUBEFLOW["cuda_image"] if name == "exec-ppo" and variant == "full" else image
        assert container["image"] == expected, name
        script = " ".join(container.get("command", []) + container.get("args", []))
        assert "pip install" not in script and "pip3 install" not in script, name


# --- fit for a cluster --------------------------------------------------------------------------------------------


def _project_with_repo_kubeflow(folder: Path, **changes) -> Path:
    """The project's params.yaml with its own kubeflow section, changed by `changes`."""
    params = repo_params()
    params["kubeflow"] |= changes
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def test_pod_local_tracking_is_refused_unless_allowed(tmp_path: Path, rlhf) -> None:
    """The shipped params name no tracking server: compile refuses with one line (each pod would keep its runs in a
    SQLite file that dies with it) and writes nothing; --allow-local-tracking compiles, with a warning that the
    image is the unpublished default."""
    project = _project_with_repo_kubeflow(tmp_path)
    refused = rlhf("pipeline", "compile", "-o", "out.yaml", cwd=project)
    assert refused.code == 2 and len(refused.err_lines) == 1
    assert refused.err_lines[0].startswith("error: kubeflow: ") and "SQLite file inside its own pod" in refused.err
    assert "--allow-local-tracking" in refused.err
    assert not (project / "out.yaml").exists()

    allowed = rlhf("pipeline", "compile", "-o", "out.yaml", "--allow-local-tracking", cwd=project)
    assert allowed.code == 0
    assert "warning: kubeflow.image is rlhf-pipeline:latest, which no registry has" in allowed.err
    assert (project / "out.yaml").exists()


@pytest.mark.parametrize(
    "changes",
    [
        {"secret": "mlflow-credentials"},  # its keys include MLFLOW_TRACKING_URI by default
        {"env": {"MLFLOW_TRACKING_URI": "http://mlflow.mlflow.svc:5000"}},
        {"mlflow_integration": True},
    ],
)
def test_a_tracking_server_from_secret_env_or_kubeflow_integration_is_accepted(
    tmp_path: Path, rlhf, changes: dict
) -> None:
    project = _project_with_repo_kubeflow(tmp_path, image="registry.example.com/rlhf:1", **changes)
    result = rlhf("pipeline", "compile", "-o", "out.yaml", cwd=project)
    assert result.code == 0, result.err
    assert "warning" not in result.err


def test_a_sqlite_tracking_uri_in_env_is_refused(tmp_path: Path, rlhf) -> None:
    project = _project_with_repo_kubeflow(tmp_path, env={"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    result = rlhf("pipeline", "compile", "-o", "out.yaml", cwd=project)
    assert result.code == 2 and "env.MLFLOW_TRACKING_URI is sqlite:///mlflow.db" in result.err


def test_submit_refuses_pod_local_tracking_before_contacting_the_cluster(tmp_path: Path, rlhf) -> None:
    """The host is closed: the error is the tracking one, so nothing was sent."""
    project = _project_with_repo_kubeflow(tmp_path)
    result = rlhf("pipeline", "submit", "--host", "http://127.0.0.1:9", cwd=project)
    assert result.code == 2 and "SQLite file inside its own pod" in result.err


def test_shipped_params_request_no_gpu_while_the_image_is_the_cpu_build(tmp_path: Path, rlhf) -> None:
    """GPUs are opt-in: the shipped params request none, and a step that asks for one needs kubeflow.cuda_image."""
    project = _project_with_repo_kubeflow(tmp_path, allow_local_tracking=True)
    assert rlhf("pipeline", "compile", "-o", "out.yaml", cwd=project).code == 0
    for name, executor in read_compiled(project / "out.yaml").executors.items():
        assert "accelerator" not in executor["container"].get("resources", {}), name


# --- validation ---------------------------------------------------------------------------------------------------


def test_the_reward_model_starts_from_the_model_reward_base_model_names(tmp_path: Path, rlhf) -> None:
    """reward.base_model: models/pretrained wires the pretrain step's model artifact into the reward step (on a
    cluster it then trains beside SFT); a folder no step writes is a one-line error naming the key, and no file is
    written."""
    write_project(tmp_path)
    compiled = _compile(tmp_path, "--set", "reward.base_model=models/pretrained")
    assert compiled.source("reward", "base_model") == ("pretrain", "model")
    result = rlhf("pipeline", "compile", "-o", "out.yaml", "--set", "reward.base_model=gpt2", cwd=tmp_path)
    assert result.code == 2
    assert len(result.err_lines) == 1 and result.err_lines[0].startswith("error: reward.base_model: ")
    assert "models/pretrained or models/sft" in result.err and "'gpt2'" in result.err
    assert not (tmp_path / "out.yaml").exists()


@pytest.mark.parametrize(
    ("kubeflow", "words"),
    [
        ({"resources": {"trainer": {"cpu": "4"}}}, ["trainer", "unknown step"]),
        ({"resources": {"ppo": {"accelerator_count": 2}}}, ["kubeflow.resources.ppo", "accelerator_type"]),
        (
            {"resources": {"sft": {"accelerator_type": "nvidia.com/gpu", "accelerator_count": 1}}},
            ["resources.sft requests nvidia.com/gpu", "cuda_image"],
        ),
    ],
)
def test_bad_kubeflow_settings_fail_before_compiling(tmp_path: Path, rlhf, kubeflow: dict, words: list[str]) -> None:
    """An unknown resources step, or an accelerator count without a type, is a ConfigError naming it: the CLI
    prints one line, exits 2 and writes no file."""
    with pytest.raises(ConfigError) as error:
        load_params(write_project(tmp_path, kubeflow) / "params.yaml")
    for word in words:
        assert word in str(error.value)
    result = rlhf("pipeline", "compile", "-o", "out.yaml", cwd=tmp_path)
    assert result.code == 2
    assert len(result.err_lines) == 1 and result.err_lines[0].startswith("error: params.yaml: ")
    assert all(word in result.err for word in words)
    assert not (tmp_path / "out.yaml").exists()
