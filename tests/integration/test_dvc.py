"""The DVC side of the project with the real `dvc` command: data versioning, the pipeline, caching, remotes, metrics.

Most tests share one throw-away copy of the project (git repo, the real dvc.yaml and src/, tiny params, the tiny
demo data re-recorded with `dvc add`) in which `dvc repro` has run once; the stages track to the session's MLflow
server. The one test that changes params works on a copy of that project, so no test depends on another's order.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from _support import PROJECT, base_env, git, make_project, run, tree_hashes
from servers import DATA_BUCKET

from rlhf.steps import step

pytestmark = pytest.mark.slow

STAGES = ("pretrain", "sft", "reward", "ppo")  # the training stages, each with a model, metrics and loss curves
PIPELINE = ("pretrain", "sft", "reward", "gate_reward", "ppo", "evaluate", "gate_evaluation", "register")
METRICS = [f"metrics/headline/{stage}.json" for stage in (*STAGES, "evaluate")]  # what `dvc metrics show` lists
OUTPUTS = {"pretrain": "models/pretrained", "sft": "models/sft", "reward": "models/reward", "ppo": "models/ppo"}
LOSS_CURVES = (("train", "loss"), ("eval", "eval_loss"))
# dvc.yaml's plot for each stage, and its series: (file in plots/<stage>/, field).
PLOTS = {stage: (f"{stage} loss", LOSS_CURVES) for stage in ("pretrain", "sft", "reward")} | {
    "ppo": ("ppo reward and KL", (("scores", "objective/scores"), ("kl", "objective/kl")))
}


def dvc(folder: Path, *args: str, env: dict[str, str]) -> str:
    """Runs `dvc ARGS`; returns stdout and stderr together (DVC prints its progress messages on either)."""
    result = run(["dvc", *args], cwd=folder, env=env)
    return result.stdout + result.stderr


def dvc_json(folder: Path, *args: str, env: dict[str, str]):
    """Runs `dvc ARGS --json` and parses its stdout (warnings go to stderr)."""
    return json.loads(run(["dvc", *args, "--json"], cwd=folder, env=env).stdout)


def _data_dvc_out(folder: Path) -> dict:
    return yaml.safe_load((folder / "data.dvc").read_text())["outs"][0]


def test_committed_data_dvc_matches_regenerated_demo_data(tmp_path):
    """The acceptance check: `rlhf data demo` with the real params.yaml regenerates exactly what data.dvc records."""
    env = base_env()
    shutil.copy2(PROJECT / "params.yaml", tmp_path / "params.yaml")
    shutil.copy2(PROJECT / ".dvcignore", tmp_path / ".dvcignore")
    run(["rlhf", "data", "demo", "-o", "data"], cwd=tmp_path, env=env)
    dvc(tmp_path, "init", "--no-scm", "-q", env=env)
    dvc(tmp_path, "add", "data", env=env)
    regenerated, committed = _data_dvc_out(tmp_path), _data_dvc_out(PROJECT)
    for key in ("md5", "size", "nfiles"):
        assert regenerated[key] == committed[key], (
            f"data.dvc records {key}={committed[key]!r} but the regenerated demo data has {regenerated[key]!r}: "
            "rerun `rlhf data demo -o data && dvc add data` and commit data.dvc"
        )


@dataclass
class Pipeline:
    folder: Path
    env: dict[str, str]
    first_repro: str
    commit: str  # HEAD when the pipeline ran
    experiment: str
    server_url: str
    reads: dict[str, set[str]]  # what each command of the first repro opened for reading in the project


def _reads(log_dir: Path) -> dict[str, set[str]]:
    """The read_audit logs, by command (`reward`, `gate reward`, ...)."""
    reads: dict[str, set[str]] = {}
    for log in log_dir.glob("*.log"):
        command, *paths = log.read_text(encoding="utf-8").splitlines()
        reads.setdefault(command, set()).update(paths)
    return reads


@pytest.fixture(scope="module")
def pipeline(mlflow_server, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The tiny project after `rlhf data demo`, `dvc add data`, a commit, and one `dvc repro` (whose `rlhf`
    commands record what they read: tests/integration/read_audit)."""
    folder = make_project(tmp_path_factory.mktemp("dvc") / "project")
    log_dir = tmp_path_factory.mktemp("reads")
    experiment = f"dvc-{uuid.uuid4().hex[:8]}"
    env = base_env(MLFLOW_TRACKING_URI=mlflow_server.url, MLFLOW_EXPERIMENT_NAME=experiment)
    run(["rlhf", "data", "demo", "-o", "data"], cwd=folder, env=env)
    dvc(folder, "add", "data", env=env)  # data.dvc now records the tiny data instead of the full-size demo
    assert _data_dvc_out(folder)["nfiles"] == 5
    git(folder, "add", "data.dvc", ".gitignore")
    git(folder, "commit", "-q", "-m", "tiny demo data")
    commit = git(folder, "rev-parse", "HEAD").strip()
    audit = {"PYTHONPATH": str(Path(__file__).parent / "read_audit"), "READS_LOG_DIR": str(log_dir)}
    first = dvc(folder, "repro", env=env | audit | {"READS_ROOT": str(folder)})
    return Pipeline(folder, env, first, commit, experiment, mlflow_server.url, _reads(log_dir))


# Read by a stage but not a dep of it, by design: its params (DVC's `params:`), the data version it tags runs with,
# the commit, its own checkpoints (resume), the project folder's listing.
_READ_BY_DESIGN = ("params.yaml", "data.dvc", ".git", "checkpoints")


def _tracked(path: str, tracked: list[str]) -> bool:
    # An output is written into a staging sibling (.NAME.tmp-…) and renamed into place: that is the output.
    path = re.sub(r"(^|/)\.([^/]+)\.tmp-[^/]+", r"\1\2", path)
    if path == "." or Path(path).parts[0] in _READ_BY_DESIGN:
        return True
    return any(path == entry or path.startswith(entry.rstrip("/") + "/") for entry in tracked)


def test_each_stage_reads_only_what_dvc_tracks_for_it(pipeline):
    """Under `dvc repro` a stage's result depends only on what DVC hashes for it: every file or folder an `rlhf`
    command opened for reading lies in the stage's deps or outs, or is params.yaml (its `params:`). Besides those:
    its own checkpoints (resume; removed when it finishes), git (the commit it records) and data.dvc (the data
    version it tags runs with). The code it imports is held to its deps by test_dvc_deps; MLflow's store, every
    stage's output, is not a file under the project here (a server)."""
    stages = yaml.safe_load((pipeline.folder / "dvc.yaml").read_text())["stages"]
    commands = {" ".join(stage["cmd"].split()[1:]): name for name, stage in stages.items()}
    assert set(pipeline.reads) <= set(commands), sorted(pipeline.reads)
    assert {"pretrain", "ppo", "evaluate", "gate reward", "register"} <= set(pipeline.reads)
    for command, reads in pipeline.reads.items():
        stage = stages[commands[command]]
        tracked = [next(iter(entry)) if isinstance(entry, dict) else entry for entry in stage["deps"] + stage["outs"]]
        untracked = sorted(path for path in reads if not _tracked(path, tracked))
        assert not untracked, f"{command} read what dvc.yaml does not track for it: {untracked}"


def test_first_repro_runs_every_stage_in_order(pipeline):
    output = pipeline.first_repro
    positions = [output.find(f"Running stage '{stage}'") for stage in PIPELINE]
    assert all(position >= 0 for position in positions), output[-3000:]
    assert positions == sorted(positions), " -> ".join(PIPELINE)
    lock = yaml.safe_load((pipeline.folder / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(PIPELINE)
    for stage in STAGES:
        outs = {out["path"]: out for out in lock[stage]["outs"]}
        assert outs[OUTPUTS[stage]]["md5"].endswith(".dir")
        assert (pipeline.folder / OUTPUTS[stage] / "model.safetensors").is_file()
        assert (pipeline.folder / "metrics" / f"{stage}.json").is_file()
        for name, _ in PLOTS[stage][1]:
            assert (pipeline.folder / "plots" / stage / f"{name}.json").is_file()
    # Each stage's lock entry records the params section it lists, as params.yaml has it.
    params = yaml.safe_load((pipeline.folder / "params.yaml").read_text())
    assert lock["reward"]["params"]["params.yaml"]["reward"] == params["reward"]


def test_second_repro_runs_nothing(pipeline):
    lock_before = (pipeline.folder / "dvc.lock").read_bytes()
    output = dvc(pipeline.folder, "repro", env=pipeline.env)
    assert "Running stage" not in output, output
    for stage in PIPELINE:
        assert f"Stage '{stage}' didn't change, skipping" in output
    assert "Data and pipelines are up to date." in output
    assert dvc_json(pipeline.folder, "status", env=pipeline.env) == {}
    assert (pipeline.folder / "dvc.lock").read_bytes() == lock_before


def test_metrics_show_lists_every_stages_headline_in_a_table_that_fits_a_terminal(pipeline):
    """`dvc metrics show` prints a table that fits a wide terminal (once 1,423 characters, 75 columns): it lists each
    stage's headline metrics; all of them stay in metrics/<stage>.json, which `dvc metrics show FILE` shows."""
    table = run(["dvc", "metrics", "show"], cwd=pipeline.folder, env=pipeline.env).stdout
    assert 0 < max(len(line) for line in table.splitlines()) <= 170, table
    files = dvc_json(pipeline.folder, "metrics", "show", env=pipeline.env)[""]["data"]
    assert set(files) == set(METRICS)
    for stage in (*STAGES, "evaluate"):
        on_disk = json.loads((pipeline.folder / "metrics" / f"{stage}.json").read_text())
        headline = files[f"metrics/headline/{stage}.json"]["data"]
        assert headline and headline == {key: on_disk[key] for key in step(stage).headline}
        assert (
            {"objective/kl", "eval/gold_gain"}
            if stage == "ppo"
            else {"train_loss", "eval_loss"}
            if stage != "evaluate"
            else {"win_rate/rm", "policy/kl"}
        ) <= set(on_disk)
    everything = dvc_json(pipeline.folder, "metrics", "show", "metrics/ppo.json", env=pipeline.env)[""]["data"]
    assert everything["metrics/ppo.json"]["data"] == json.loads((pipeline.folder / "metrics/ppo.json").read_text())
    assert 0.0 <= files["metrics/headline/reward.json"]["data"]["eval_accuracy"] <= 1.0


def test_plots_show_renders_every_loss_curve(pipeline):
    """The loss curves dvc.yaml declares render: DVC needs every row of a plot file to have the same fields."""
    shown = dvc_json(pipeline.folder, "plots", "show", env=pipeline.env)
    assert not shown.get("errors"), shown.get("errors")
    for stage in STAGES:
        title, curves = PLOTS[stage]
        rendered = shown["data"][title]
        assert rendered, f"{title}: nothing rendered"
        series: dict[str, int] = {}
        for point in rendered[0]["content"]["data"]["values"]:
            series[point["filename::field"]] = series.get(point["filename::field"], 0) + 1
        for name, field in curves:
            rows = json.loads((pipeline.folder / "plots" / stage / f"{name}.json").read_text())
            assert rows and series.get(f"{name}.json::{field}") == len(rows), (stage, name, series)


def test_stage_runs_under_dvc_carry_git_and_data_lineage(pipeline):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(pipeline.server_url)
    experiment = client.get_experiment_by_name(pipeline.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["rlhf.stage"] for r in runs) == sorted((*STAGES, "evaluate", "register"))
    data_md5 = _data_dvc_out(pipeline.folder)["md5"]
    for stage_run in runs:
        assert stage_run.info.status == "FINISHED"
        assert stage_run.data.tags["rlhf.git_commit"] == pipeline.commit
        assert stage_run.data.tags["rlhf.data_dvc_md5"] == data_md5


def _pull_into_a_fresh_clone(folder: Path, clone: Path, env: dict[str, str]) -> Path:
    """`git clone` then `dvc pull`: data/, models/ and metrics/ come back byte for byte and DVC sees nothing to do."""
    git(clone.parent, "clone", "-q", str(folder), str(clone))
    assert not (clone / "data").exists() and not (clone / "models").exists()
    dvc(clone, "pull", env=env)
    for name in ("data", "models", "metrics"):
        expected = tree_hashes(folder / name)
        assert expected, name
        assert tree_hashes(clone / name) == expected, f"{name}/ differs after dvc pull"
    assert dvc_json(clone, "status", env=env) == {}
    return clone


def test_push_then_pull_into_a_fresh_clone_restores_data_and_models(pipeline, tmp_path):
    folder, env = pipeline.folder, pipeline.env
    remote = tmp_path / "remote"
    dvc(folder, "remote", "add", "-d", "-f", "local", str(remote), env=env)
    git(folder, "add", "-A")  # dvc.lock, metrics/, plots/, .dvc/config; data/ and models/ stay git-ignored
    git(folder, "commit", "-q", "-m", "pipeline outputs")
    tracked = git(folder, "ls-files").split()
    assert "dvc.lock" in tracked and "metrics/reward.json" in tracked
    assert not [path for path in tracked if path.startswith(("data/", "models/"))]
    dvc(folder, "push", env=env)
    assert any(path.is_file() for path in remote.rglob("*"))

    _pull_into_a_fresh_clone(folder, tmp_path / "clone", env)


def test_push_to_an_s3_remote_then_pull_into_a_fresh_clone_restores_every_file(pipeline, tmp_path, s3_endpoint):
    """The deployment's DVC remote: an S3 bucket (`dvc remote add -d storage s3://…` plus `endpointurl`), credentials
    from the environment. `dvc push` stores data/ and every stage output there; `dvc pull` in a fresh clone restores
    them byte for byte, and the champion the pipeline registered loads back from the tracking server (whose
    artifacts are in the same S3 endpoint)."""
    folder = tmp_path / "project"
    shutil.copytree(pipeline.folder, folder, symlinks=True)
    env = dict(pipeline.env, **s3_endpoint.env)
    remote = f"s3://{DATA_BUCKET}/dvc-{uuid.uuid4().hex[:8]}"
    dvc(folder, "remote", "add", "-d", "-f", "storage", remote, env=env)
    dvc(folder, "remote", "modify", "storage", "endpointurl", s3_endpoint.url, env=env)
    git(folder, "add", "-A")
    git(folder, "commit", "-q", "-m", "pipeline outputs, S3 remote")
    dvc(folder, "push", env=env)
    bucket, prefix = remote.removeprefix("s3://").split("/", 1)
    pages = s3_endpoint.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    pushed = [item for page in pages for item in page.get("Contents", [])]
    assert len(pushed) >= sum(len(tree_hashes(folder / name)) for name in ("data", *OUTPUTS.values()))

    clone = _pull_into_a_fresh_clone(folder, tmp_path / "clone", env)

    policy = json.loads((folder / "registry/registered.json").read_text())["versions"]["policy"]["model"]
    code = "import mlflow, sys; print(mlflow.pyfunc.load_model(sys.argv[1]).predict(['A review.'])[0])"
    answer = run([sys.executable, "-c", code, f"models:/{policy}@champion"], cwd=clone, env=env)
    assert answer.stdout.strip()


def test_changing_a_reward_param_reruns_only_the_reward_stage_and_its_downstream(pipeline, tmp_path):
    folder = tmp_path / "project"
    shutil.copytree(pipeline.folder, folder, symlinks=True)
    env = dict(pipeline.env, MLFLOW_EXPERIMENT_NAME=f"{pipeline.experiment}-changed")
    before = {stage: tree_hashes(folder / OUTPUTS[stage]) for stage in STAGES}

    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["reward"]["learning_rate"] = params["reward"]["learning_rate"] / 3
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(dvc_json(folder, "status", env=env)) == {"reward"}

    output = dvc(folder, "repro", env=env)
    assert "Running stage 'reward'" in output, output[-3000:]
    for stage in PIPELINE[PIPELINE.index("reward") :]:  # everything downstream reads the new reward model
        assert f"Running stage '{stage}'" in output, stage
    for stage in ("pretrain", "sft"):
        assert f"Running stage '{stage}'" not in output
        assert f"Stage '{stage}' didn't change, skipping" in output
        assert tree_hashes(folder / OUTPUTS[stage]) == before[stage]
    assert tree_hashes(folder / OUTPUTS["reward"]) != before["reward"]
    lock = yaml.safe_load((folder / "dvc.lock").read_text())["stages"]
    assert lock["reward"]["params"]["params.yaml"]["reward"]["learning_rate"] == params["reward"]["learning_rate"]
    assert dvc_json(folder, "status", env=env) == {}


def test_an_experiment_registers_nothing_unless_asked(pipeline, tmp_path):
    """`dvc exp run` with another PPO seed retrains PPO and runs everything after it, but adds no registry version
    (an experiment is not a release); with registry.register_experiments it registers the new policy."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path / "project"
    shutil.copytree(pipeline.folder, folder, symlinks=True)
    env = dict(pipeline.env, MLFLOW_EXPERIMENT_NAME=f"{pipeline.experiment}-exp")
    client = MlflowClient(pipeline.server_url)
    policy = yaml.safe_load((folder / "params.yaml").read_text())["registry"]["policy_name"]

    def policy_versions() -> int:
        return len(client.search_model_versions(f"name = '{policy}'"))

    before = policy_versions()
    output = dvc(folder, "exp", "run", "-S", "ppo.seed=7", env=env)
    assert "Running stage 'ppo'" in output and "register: skipped: a DVC experiment" in output, output[-3000:]
    assert policy_versions() == before
    assert "skipped" in json.loads((folder / "registry" / "registered.json").read_text())

    output = dvc(folder, "exp", "run", "-S", "ppo.seed=7", "-S", "registry.register_experiments=true", env=env)
    assert "register: skipped" not in output, output[-3000:]
    assert policy_versions() == before + 1


def test_a_gate_out_of_reach_stops_the_pipeline_and_keeps_the_champion(pipeline, tmp_path):
    """A retrained reward model that fails its gate: DVC stops there, naming the check; PPO, evaluation and
    registration do not run, and the registry's champions and versions are as before."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path / "project"
    shutil.copytree(pipeline.folder, folder, symlinks=True)
    env = dict(pipeline.env, MLFLOW_EXPERIMENT_NAME=f"{pipeline.experiment}-gated")
    client = MlflowClient(pipeline.server_url)
    names = [
        entry["model"] for entry in json.loads((folder / "registry/registered.json").read_text())["versions"].values()
    ]
    before = {
        name: (
            {v.version for v in client.search_model_versions(f"name = '{name}'")},
            client.get_model_version_by_alias(name, "champion").version,
        )
        for name in names
    }
    ppo_before = tree_hashes(folder / OUTPUTS["ppo"])

    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["reward"]["learning_rate"] = params["reward"]["learning_rate"] / 2
    params["gates"]["min_rm_accuracy"] = 0.99
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run(["dvc", "repro"], cwd=folder, env=env, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Running stage 'reward'" in output and "Running stage 'gate_reward'" in output
    assert "gate 'reward' failed: min_rm_accuracy" in output
    for stage in ("ppo", "evaluate", "gate_evaluation", "register"):
        assert f"Running stage '{stage}'" not in output, stage
    verdict = json.loads((folder / "gates/reward.json").read_text())
    assert verdict["passed"] is False and verdict["failed_checks"] == ["min_rm_accuracy"]
    assert tree_hashes(folder / OUTPUTS["ppo"]) == ppo_before
    after = {
        name: (
            {v.version for v in client.search_model_versions(f"name = '{name}'")},
            client.get_model_version_by_alias(name, "champion").version,
        )
        for name in names
    }
    assert after == before


def _kfp_metrics(run_folder: Path, task: str) -> dict:
    return json.loads((run_folder / task / "metrics").read_text())


def test_local_kubeflow_run_matches_dvc_and_registers_a_champion(pipeline, tmp_path):
    """`rlhf pipeline run --local` runs the same DAG with kfp's local runner: each stage gives the metrics the DVC
    run gave (same params, same seeds), the gates pass, and the policy is registered as champion. Every stage's
    MLflow run is nested under one pipeline run tagged with the Kubeflow run id, which ends FINISHED."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path / "project"
    shutil.copytree(pipeline.folder, folder, symlinks=True)
    experiment = f"{pipeline.experiment}-kfp"
    env = dict(pipeline.env, MLFLOW_EXPERIMENT_NAME=experiment)
    output = run(["rlhf", "pipeline", "run", "--local"], cwd=folder, env=env).stdout
    run_folder = folder / output.split("pipeline run: ")[1].splitlines()[0]
    assert run_folder.parent == folder / "kfp-local"
    assert "gate reward: passed" in output and "gate evaluation: passed" in output

    for stage in (*STAGES, "evaluate"):
        by_dvc = json.loads((folder / "metrics" / f"{stage}.json").read_text())
        by_kfp = _kfp_metrics(run_folder, stage)
        assert set(by_kfp) == set(by_dvc), stage
        for key, value in by_dvc.items():
            assert by_kfp[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (stage, key)

    registered = json.loads((run_folder / "register" / "registered").read_text())
    client = MlflowClient(pipeline.server_url)
    policy = registered["versions"]["policy"]
    assert str(client.get_model_version_by_alias(policy["model"], "champion").version) == str(policy["version"])

    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("rlhf.stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["kfp.run_id"]
    children = {
        r.data.tags["rlhf.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    }
    assert children == {*STAGES, "evaluate", "register"}

    # What MLflow's pages show: an experiment of model training (not GenAI), a pipeline run that carries every
    # stage's params and final metrics and the gate verdicts, and a model card on every registered version.
    assert client.get_experiment_by_name(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    summary = parents[0].data
    for stage in (*STAGES, "evaluate"):
        assert f"{stage}.seed" in summary.params, stage
        assert {f"{stage}/{key}" for key in _kfp_metrics(run_folder, stage)} <= set(summary.metrics), stage
    assert summary.metrics["evaluate/win_rate/rm"] == pytest.approx(_kfp_metrics(run_folder, "evaluate")["win_rate/rm"])
    assert summary.metrics["gate/reward"] == summary.metrics["gate/evaluation"] == 1.0
    stage_runs = {
        r.data.tags["rlhf.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    }
    for role, stage in (("sft", "sft"), ("reward", "reward"), ("policy", "ppo")):
        entry = registered["versions"][role]
        version = client.get_model_version(entry["model"], str(entry["version"]))
        assert "trained in MLflow run [" in version.description and "**Gates**" in version.description, role
        # Logged in, and registered from, the run that trained it (this run's, or DVC's when the model is the same
        # bytes and so already registered); that run keeps its status and end time.
        trained = client.get_run(version.run_id)
        assert trained.data.tags["rlhf.stage"] == stage, role
        if "already registered" not in entry["outcome"]:
            assert version.run_id == stage_runs[stage].info.run_id, role
        assert (
            trained.info.status == "FINISHED"
            and trained.info.end_time < client.get_run(stage_runs["register"].info.run_id).info.start_time
        ), role
    # A stage's params name its upstream runs, not the temporary artifact folders of the local run.
    assert stage_runs["reward"].data.params["reward.base_model"] == f"sft run {stage_runs['sft'].info.run_id}"
    assert stage_runs["ppo"].data.params["ppo.reward_model"] == f"reward run {stage_runs['reward'].info.run_id}"
    ours = {f"{stage}.": run for stage, run in stage_runs.items() if stage != "register"}  # not the trainer's args
    assert not [
        (key, value)
        for prefix, r in ours.items()
        for key, value in r.data.params.items()
        if key.startswith(prefix) and str(folder) in value
    ]


def test_local_kubeflow_run_skips_everything_after_a_failed_gate(pipeline, tmp_path):
    """A reward gate out of reach: the local run exits 1 naming the check, PPO and the rest never run (dsl.If
    skipped them), and nothing is registered."""
    folder = tmp_path / "project"
    shutil.copytree(pipeline.folder, folder, symlinks=True)
    env = dict(pipeline.env, MLFLOW_EXPERIMENT_NAME=f"{pipeline.experiment}-kfp-gated")
    result = run(
        ["rlhf", "pipeline", "run", "--local", "--set", "gates.min_rm_accuracy=0.99"], cwd=folder, env=env, check=False
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "gate 'reward' failed: min_rm_accuracy" in result.stderr
    run_folder = Path(result.stdout.split("pipeline run: ")[1].splitlines()[0])
    assert (run_folder / "reward" / "model").is_dir()
    for task in ("ppo", "evaluate", "gate-evaluation", "register"):
        assert not (run_folder / task).exists(), task
