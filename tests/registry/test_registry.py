"""The MLflow model registry: `rlhf register`, `promote`, `rollback` and `lineage` against a real (SQLite) MLflow
store, with real, tiny transformers models. Everything is read back through `MlflowClient`, the way a user of the
registry sees it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from registry_helpers import (
    GIT_COMMIT,
    NAMES,
    ROLES,
    Project,
    aliases,
    concurrent_registrations,
    gold_metrics,
    provenance,
    registry_state,
    rlhf_tags,
    rm_metrics,
    versions,
)

from rlhf import cli, registry
from rlhf.config import load_params

SFT, REWARD, POLICY = NAMES["sft"], NAMES["reward"], NAMES["policy"]


def rlhf(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Runs the `rlhf` command in-process; returns (exit code, stdout, stderr). An exception that escapes `main` ends
    as it would in the console script: a traceback on stderr and exit status 1."""
    capsys.readouterr()
    try:
        code = cli.main(list(args))
    except Exception:
        traceback.print_exc()
        code = 1
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def assert_one_line_error(err: str) -> str:
    """The command failed with a single `error: ...` line, not a traceback; returns that line."""
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    return lines[0]


def register(project: Project, capsys: pytest.CaptureFixture[str]) -> str:
    """`rlhf register` in the project; fails the test unless it exits 0; returns its stdout."""
    code, out, err = rlhf(capsys, "register")
    assert code == 0, f"rlhf register exited {code}:\n{out}\n{err}"
    return out


# ------------------------------------------------------------------------------------------------ register


def test_first_registration_creates_tagged_champion_versions(project: Project, capsys) -> None:
    """One version of each model, tagged with its content hash, provenance, gates, score and upstream versions;
    with nothing to beat, each is both candidate and champion; registered.json lists the versions."""
    project.pipeline_run(sft=1, reward=1, policy=1, metrics=gold_metrics(policy=0.5, sft=0.3))
    register(project, capsys)

    client = project.client()
    expected_scores = {"sft": 0.3, "reward": 0.5, "policy": 0.5}
    expected_upstream = {
        "sft": {},
        "reward": {"rlhf.upstream.sft": f"{SFT}/1"},
        "policy": {"rlhf.upstream.sft": f"{SFT}/1", "rlhf.upstream.reward": f"{REWARD}/1"},
    }
    run_ids = set()
    for role in ROLES:
        name = NAMES[role]
        assert list(versions(client, name)) == [1], name
        tags = rlhf_tags(versions(client, name)[1])
        source = provenance(role, 1)
        assert tags["rlhf.model_sha256"] == registry.content_hash(project.model_folder(role))
        assert tags["rlhf.role"] == role
        assert tags["rlhf.training_run_id"] == source["mlflow_run_id"]
        assert tags["rlhf.params_hash"] == source["params_hash"]
        assert tags["rlhf.git_commit"] == GIT_COMMIT
        assert tags["rlhf.data_dvc_md5"] == source["data_dvc_md5"]
        assert tags["rlhf.gates"] == "passed"
        assert (tags["rlhf.gate.reward"], tags["rlhf.gate.evaluation"]) == ("passed", "passed")
        assert tags["rlhf.score_metric"] == "gold_score"
        assert float(tags["rlhf.score"]) == pytest.approx(expected_scores[role])
        assert {k: v for k, v in tags.items() if k.startswith("rlhf.data.")} == {
            f"rlhf.data.{dataset}": fp for dataset, fp in source["datasets"].items()
        }
        assert {k: v for k, v in tags.items() if k.startswith("rlhf.upstream.")} == expected_upstream[role]
        assert aliases(client, name) == {"candidate": 1, "champion": 1}
        card = versions(client, name)[1].description  # the version page's model card
        assert "trained in MLflow run " in card and source["mlflow_run_id"] in card and "- reward: passed" in card
        assert all(
            f"[{up.replace('/', ' v')}](#/models/{up.replace('/', '/versions/')})" in card
            for up in expected_upstream[role].values()
        )
        run_ids.add(tags["rlhf.pipeline_run_id"])
    assert len(run_ids) == 1, "the three versions share one pipeline run id"

    written = json.loads((project.root / "registry" / "registered.json").read_text())
    assert written["pipeline_run_id"] in run_ids
    assert {role: (entry["model"], entry["version"]) for role, entry in written["versions"].items()} == {
        role: (NAMES[role], 1) for role in ROLES
    }


def test_registering_the_same_run_again_changes_nothing(project: Project, capsys) -> None:
    """Re-running `rlhf register` on the same model folders creates no versions and moves no alias."""
    project.pipeline_run()
    register(project, capsys)
    before = registry_state(project.client())

    out = register(project, capsys)

    assert registry_state(project.client()) == before
    assert out.count("already registered; unchanged") == 3, out


def test_better_policy_becomes_champion_and_reuses_unchanged_models(project: Project, capsys) -> None:
    """A second run with new policy weights and a higher gold score: policy v2 is champion, v1 previous; the SFT and
    reward folders are unchanged, so they keep their one version and the new policy points at it."""
    project.pipeline_run(policy=1, metrics=gold_metrics(policy=0.5))
    register(project, capsys)
    project.pipeline_run(policy=2, metrics=gold_metrics(policy=0.7))
    register(project, capsys)

    client = project.client()
    assert aliases(client, POLICY) == {"candidate": 2, "champion": 2, "previous": 1}
    assert list(versions(client, SFT)) == [1] and list(versions(client, REWARD)) == [1]
    assert aliases(client, SFT) == aliases(client, REWARD) == {"candidate": 1, "champion": 1}
    v2 = rlhf_tags(versions(client, POLICY)[2])
    assert (v2["rlhf.upstream.sft"], v2["rlhf.upstream.reward"]) == (f"{SFT}/1", f"{REWARD}/1")
    assert v2["rlhf.model_sha256"] == registry.content_hash(project.model_folder("policy"))


def test_worse_policy_is_only_a_candidate(project: Project, capsys) -> None:
    """A new policy with a lower gold score than the champion's is registered as candidate; champion stays v1."""
    project.pipeline_run(policy=1, metrics=gold_metrics(policy=0.5))
    register(project, capsys)
    project.pipeline_run(policy=2, metrics=gold_metrics(policy=0.4))
    register(project, capsys)

    assert aliases(project.client(), POLICY) == {"candidate": 2, "champion": 1}


def test_failed_gate_keeps_new_versions_out_of_champion(project: Project, capsys) -> None:
    """New models from a run whose evaluation gate failed are candidates tagged gates=failed, however well they
    score; the champions stay; the output names the failed check."""
    project.pipeline_run(sft=1, reward=1, policy=1, metrics=gold_metrics(policy=0.5, sft=0.3))
    register(project, capsys)
    project.pipeline_run(
        sft=2, reward=2, policy=2, metrics=gold_metrics(policy=0.9, sft=0.8), failed={"evaluation": ["max_kl"]}
    )
    out = register(project, capsys)

    client = project.client()
    for role in ROLES:
        name = NAMES[role]
        assert aliases(client, name) == {"candidate": 2, "champion": 1}, name
        tags = rlhf_tags(versions(client, name)[2])
        assert (tags["rlhf.gates"], tags["rlhf.gate.reward"], tags["rlhf.gate.evaluation"]) == (
            "failed",
            "passed",
            "failed",
        )
    assert "max_kl" in out


def test_the_decision_page_shows_the_verdicts_the_gate_steps_wrote(project: Project, capsys) -> None:
    """The decision page is written from the gates' verdict files, after the gates: change metrics/reward.json,
    rerun `rlhf gate reward`, and the page's reward verdict moves with the gate's. It sets the champion as it stood
    before beside the policy, and says what was registered."""

    def page_after_reward_accuracy(accuracy: float) -> tuple[int, dict, str]:
        (project.root / "metrics" / "reward.json").write_text(
            json.dumps({"eval_accuracy": accuracy, "eval_pairs": 400})
        )
        # The test's models name training runs this store lacks: the gate judges a folder without provenance.
        (project.root / "unjudged").mkdir(exist_ok=True)
        gate = ["--set", "gates.min_rm_accuracy=0.7", "--set", "gates.reward_model=unjudged"]
        code, _, err = rlhf(capsys, "gate", "reward", *gate)
        assert code in (0, 1), err
        register(project, capsys)
        verdict = json.loads((project.root / "gates" / "reward.json").read_text())
        return code, verdict, (project.root / "reports" / "decision" / "decision.md").read_text()

    project.pipeline_run(sft=1, reward=1, policy=1, metrics=gold_metrics(policy=0.5, sft=0.3))
    code, verdict, page = page_after_reward_accuracy(0.9)
    assert code == 0 and verdict["passed"]
    (check,) = verdict["checks"]
    row = f"| reward | min_rm_accuracy | eval_accuracy | {check['value']:.4g} (measured 0.9) | &gt;= 0.7 | PASS |"
    assert row in page
    assert "Against the champion: none yet" in page and "| rlhf-policy | 1 | " in page

    project.pipeline_run(sft=2, reward=2, policy=2, metrics=gold_metrics(policy=0.9, sft=0.3))
    code, verdict, page = page_after_reward_accuracy(0.6)
    assert code == 1 and not verdict["passed"]
    (check,) = verdict["checks"]
    assert (
        f"| reward | min_rm_accuracy | eval_accuracy | {check['value']:.4g} (measured 0.6) | &gt;= 0.7 | FAIL |" in page
    )
    assert "Against the champion: rlhf-policy v1; this policy does not replace it" in page
    side_by_side = page.split("## Against the champion", 1)[1].split("##", 1)[0]
    for row in (
        "| score (gold_score) | 0.5 | 0.9 |",
        "| gates | passed | failed |",
        "| trained in MLflow run | {} | {} |".format(*(provenance("policy", seed)["mlflow_run_id"] for seed in (1, 2))),
        f"| commit | {GIT_COMMIT[:12]} | {GIT_COMMIT[:12]} |",
    ):
        assert row in side_by_side, row
    assert "its gates fail" in page and "| rlhf-policy | 2 | new version; candidate only (gates failed: reward" in page


def test_missing_gate_verdict_counts_as_failed(project: Project, capsys) -> None:
    """A gate that never ran (no verdict file) fails the run: even an empty registry gets no champion."""
    project.pipeline_run(missing_gates=("reward",))
    register(project, capsys)

    client = project.client()
    for role in ROLES:
        assert aliases(client, NAMES[role]) == {"candidate": 1}
        tags = rlhf_tags(versions(client, NAMES[role])[1])
        assert (tags["rlhf.gates"], tags["rlhf.gate.reward"], tags["rlhf.gate.evaluation"]) == (
            "failed",
            "failed",
            "passed",
        )


def test_without_gold_scores_champions_are_compared_on_reward_model_score(project: Project, capsys) -> None:
    """No gold annotator: the score is the reward-model score (the SFT's own for SFT, the policy's otherwise)."""
    project.pipeline_run(metrics=rm_metrics(policy=1.5, sft=0.25))
    register(project, capsys)

    client = project.client()
    scores = {"sft": 0.25, "reward": 1.5, "policy": 1.5}
    for role in ROLES:
        tags = rlhf_tags(versions(client, NAMES[role])[1])
        assert tags["rlhf.score_metric"] == "rm_score"
        assert float(tags["rlhf.score"]) == pytest.approx(scores[role])
        assert aliases(client, NAMES[role])["champion"] == 1


def test_register_without_evaluation_metrics_is_a_one_line_error(project: Project, capsys) -> None:
    """Without metrics/evaluate.json there is nothing to judge the models by: exit 2, nothing registered."""
    project.pipeline_run()
    (project.root / "metrics" / "evaluate.json").unlink()

    code, _, err = rlhf(capsys, "register")

    assert code == 2
    assert "evaluate.json" in assert_one_line_error(err)
    assert versions(project.client(), POLICY) == {}


# ------------------------------------------------------------------------------------------ promote, rollback


@pytest.mark.slow
def test_concurrent_registrations_leave_one_version_per_model(project: Project) -> None:
    """Registrations into one SQLite store take turns (two at once used to make v2 and v3 of every model, with the same
    content hash): four at once leave one version of each model."""
    project.pipeline_run()
    env = {**os.environ, "MLFLOW_TRACKING_URI": project.tracking_uri}
    results = concurrent_registrations([sys.executable, "-m", "rlhf.cli", "register"], project.root, env)

    assert [result.returncode for result in results] == [0] * 4, [result.stderr[-2000:] for result in results]
    client = project.client()
    for role in ROLES:
        assert list(versions(client, NAMES[role])) == [1], role
        assert aliases(client, NAMES[role]) == {"candidate": 1, "champion": 1}
    outcomes = [result.stdout.count("already registered; unchanged") for result in results]
    assert sorted(outcomes) == [0, 3, 3, 3], [result.stdout for result in results]


@pytest.fixture
def failed_candidate(project: Project, capsys) -> Project:
    """Policy v1 champion; policy v2 a candidate from a run whose evaluation gate failed (max_kl)."""
    project.pipeline_run(policy=1, metrics=gold_metrics(policy=0.5))
    register(project, capsys)
    project.pipeline_run(policy=2, metrics=gold_metrics(policy=0.7), failed={"evaluation": ["max_kl"]})
    register(project, capsys)
    assert aliases(project.client(), POLICY) == {"candidate": 2, "champion": 1}
    return project


def test_promote_refuses_a_version_whose_gates_failed(failed_candidate: Project, capsys) -> None:
    """`rlhf promote` of a failed-gates version exits 2 naming the version and --force; the champion stays."""
    code, _, err = rlhf(capsys, "promote", POLICY, "2")

    assert code == 2
    line = assert_one_line_error(err)
    assert "v2" in line and "--force" in line
    assert aliases(failed_candidate.client(), POLICY) == {"candidate": 2, "champion": 1}


def test_forced_promotion_crowns_the_version_and_keeps_the_old_champion_as_previous(
    failed_candidate: Project, capsys
) -> None:
    """With --force the version becomes champion, the displaced champion previous, and the version says it was
    forced."""
    code, _, err = rlhf(capsys, "promote", POLICY, "2", "--force")

    assert code == 0, err
    client = failed_candidate.client()
    assert aliases(client, POLICY) == {"candidate": 2, "champion": 2, "previous": 1}
    assert "rlhf.forced_promotion" in versions(client, POLICY)[2].tags


def test_promote_of_a_missing_version_is_a_one_line_error(failed_candidate: Project, capsys) -> None:
    code, _, err = rlhf(capsys, "promote", POLICY, "99")

    assert code == 2
    assert "99" in assert_one_line_error(err)
    assert aliases(failed_candidate.client(), POLICY) == {"candidate": 2, "champion": 1}


@pytest.mark.parametrize("alias", ["latest", "bad alias"])
def test_promote_to_an_alias_mlflow_rejects_is_a_one_line_error(failed_candidate: Project, capsys, alias: str) -> None:
    """An alias MLflow refuses (reserved like `latest`, or with a space) is a user error like any other: exit 2 and
    one `error:` line naming the alias, not a traceback.

    Fails until src/rlhf/registry.py promote() turns the MlflowException from set_registered_model_alias into a
    RegistryError.
    """
    code, _, err = rlhf(capsys, "promote", POLICY, "1", "--alias", alias)

    assert "Traceback" not in err, f"promote lets MLflow's alias-name error escape as a traceback:\n{err[-600:]}"
    assert code == 2
    assert alias in assert_one_line_error(err)
    assert aliases(failed_candidate.client(), POLICY) == {"candidate": 2, "champion": 1}


def test_rollback_restores_the_previous_champion_once(project: Project, capsys) -> None:
    """`rlhf rollback`: previous becomes champion, previous is cleared, the rolled-back version is tagged; a second
    rollback has nothing to go back to (exit 2)."""
    project.pipeline_run(policy=1, metrics=gold_metrics(policy=0.5))
    register(project, capsys)
    project.pipeline_run(policy=2, metrics=gold_metrics(policy=0.7))
    register(project, capsys)

    code, _, err = rlhf(capsys, "rollback", POLICY)

    assert code == 0, err
    client = project.client()
    assert aliases(client, POLICY) == {"candidate": 2, "champion": 1}
    assert versions(client, POLICY)[2].tags.get("rlhf.rolled_back") == "true"

    code, _, err = rlhf(capsys, "rollback", POLICY)

    assert code == 2
    assert POLICY in assert_one_line_error(err)
    assert aliases(client, POLICY) == {"candidate": 2, "champion": 1}


# ------------------------------------------------------------------------------------------------ lineage


@pytest.fixture
def two_runs(project: Project, capsys) -> Project:
    """Run 1 registers v1 of everything; run 2 brings a new reward model and policy on the same SFT model and wins:
    the champion policy is v2, trained against reward v2, both from SFT v1."""
    project.pipeline_run(sft=1, reward=1, policy=1, metrics=gold_metrics(policy=0.5))
    register(project, capsys)
    project.pipeline_run(sft=1, reward=2, policy=2, metrics=gold_metrics(policy=0.7))
    register(project, capsys)
    return project


def test_the_reward_version_names_the_sft_version_only_if_it_was_trained_from_it(project: Project, capsys) -> None:
    """The demo trains its reward model from the pretrained model: its provenance names that run, so its version
    has no SFT upstream (the policy's still names both). One trained from this SFT model names it."""

    def started_from(run_id: str) -> None:
        record = project.model_folder("reward") / "rlhf_run.json"
        record.write_text(json.dumps(json.loads(record.read_text()) | {"base_run_id": run_id}))

    def upstream(name: str, version: int) -> dict[str, str]:
        return {
            k: v
            for k, v in rlhf_tags(versions(project.client(), name)[version]).items()
            if k.startswith("rlhf.upstream.")
        }

    project.pipeline_run(sft=1, reward=1, policy=1)
    started_from("run-of-the-pretrained-model")
    register(project, capsys)
    assert upstream(REWARD, 1) == {}
    assert upstream(POLICY, 1) == {"rlhf.upstream.sft": f"{SFT}/1", "rlhf.upstream.reward": f"{REWARD}/1"}
    code, out, _ = rlhf(capsys, "lineage", f"models:/{REWARD}/1", "--json")
    assert code == 0 and json.loads(out)["upstream"] == {}

    project.pipeline_run(sft=1, reward=2, policy=2)
    started_from(provenance("sft", 1)["mlflow_run_id"])
    register(project, capsys)
    assert upstream(REWARD, 2) == {"rlhf.upstream.sft": f"{SFT}/1"}


def test_lineage_json_traces_the_champion_policy_to_its_reward_and_sft_versions(two_runs: Project, capsys) -> None:
    """`rlhf lineage --json`: policy v2 -> reward v2 -> sft v1, and policy v2 -> sft v1, each with the datasets,
    params hash and commit it was trained with."""
    code, out, err = rlhf(capsys, "lineage", f"models:/{POLICY}@champion", "--json")

    assert code == 0, err
    policy = json.loads(out)
    reward = policy["upstream"]["reward"]
    sft_via_reward, sft = reward["upstream"]["sft"], policy["upstream"]["sft"]
    assert (policy["model"], policy["version"]) == (POLICY, 2)
    assert (reward["model"], reward["version"]) == (REWARD, 2)
    assert (sft["model"], sft["version"]) == (sft_via_reward["model"], sft_via_reward["version"]) == (SFT, 1)
    assert sft["upstream"] == {}
    assert "champion" in policy["aliases"]
    for node, role, seed in ((policy, "policy", 2), (reward, "reward", 2), (sft, "sft", 1)):
        source = provenance(role, seed)
        assert node["datasets"] == source["datasets"], role
        assert node["params_hash"] == source["params_hash"], role
        assert node["git_commit"] == GIT_COMMIT, role


def test_lineage_text_names_every_upstream_version_with_its_data_and_code(two_runs: Project, capsys) -> None:
    """The tree printed by `rlhf lineage` names the reward and SFT versions, dataset fingerprints, params hashes and
    the commit."""
    code, out, err = rlhf(capsys, "lineage", f"models:/{POLICY}@champion")

    assert code == 0, err
    for text in (f"{POLICY} v2", f"{REWARD} v2", f"{SFT} v1", GIT_COMMIT[:12]):
        assert text in out
    for role, seed in (("policy", 2), ("reward", 2), ("sft", 1)):
        source = provenance(role, seed)
        assert source["params_hash"] in out, role
        for fp in source["datasets"].values():
            assert fp[:16] in out, role
    assert out.index(f"{REWARD} v2") < out.index(f"{SFT} v1"), "the SFT model is listed under the reward model"


@pytest.mark.parametrize(
    "uri",
    ["rlhf-policy@champion", "models:/rlhf-policy@no-such-alias", "models:/rlhf-policy/x", "models:/rlhf-policy/99"],
)
def test_lineage_of_a_bad_uri_is_a_one_line_error(project: Project, capsys, uri: str) -> None:
    code, _, err = rlhf(capsys, "lineage", uri)

    assert code == 2
    assert_one_line_error(err)


# ------------------------------------------------------------------------------------------- serving


LOAD_AND_PREDICT = """
import json, sys
import mlflow, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

policy_folder, reward_folder, template, max_new_tokens = sys.argv[1:]
review = "A review."
answers = mlflow.pyfunc.load_model("models:/rlhf-policy@champion").predict([review])
# What the policy answers, greedily, to the review wrapped in the served prompt template.
expected = pipeline("text-generation", model=policy_folder)(
    template.format(prompt=review), max_new_tokens=int(max_new_tokens), do_sample=False,
    return_full_text=False)[0]["generated_text"]
scores = mlflow.pyfunc.load_model("models:/rlhf-reward@champion").predict([review])
tokenizer = AutoTokenizer.from_pretrained(reward_folder)
model = AutoModelForSequenceClassification.from_pretrained(reward_folder)
with torch.no_grad():
    logit = model(**tokenizer(review, return_tensors="pt")).logits[0, 0].item()
print(json.dumps({"answers": answers if isinstance(answers, list) else repr(answers), "expected": expected,
                  "scores": [float(s) for s in scores["score"]], "logit": logit}))
"""


def test_registered_champions_load_and_predict_in_a_fresh_process(project: Project, capsys, tmp_path: Path) -> None:
    """`mlflow.pyfunc.load_model("models:/rlhf-policy@champion")` answers a bare review with generated text (the
    prompt template wraps it, greedy decoding); the reward champion scores text with its raw scalar reward."""
    project.pipeline_run()
    register(project, capsys)
    served = load_params().registry  # params.yaml's registry section: prompt template, max_new_tokens
    elsewhere = tmp_path / "consumer"
    elsewhere.mkdir()

    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_AND_PREDICT,
            str(project.model_folder("policy")),
            str(project.model_folder("reward")),
            served.prompt_template,
            str(served.max_new_tokens),
        ],
        cwd=elsewhere,
        env={**os.environ, "MLFLOW_TRACKING_URI": project.tracking_uri, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stderr[-4000:]
    predicted = json.loads(result.stdout.strip().splitlines()[-1])
    assert isinstance(predicted["answers"], list) and len(predicted["answers"]) == 1, predicted
    answer = predicted["answers"][0]
    assert isinstance(answer, str) and answer.strip(), predicted
    assert answer.strip() == predicted["expected"].strip()
    assert predicted["scores"] == [pytest.approx(predicted["logit"], abs=1e-5)]


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_champion_policy(project: Project, capsys, tmp_path: Path) -> None:
    """`mlflow models serve -m models:/rlhf-policy@champion` starts a REST server whose /invocations answers a bare
    review with the champion's generated text."""
    import signal
    import time
    import urllib.request

    project.pipeline_run()
    register(project, capsys)
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as output:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "models",
                "serve",
                "-m",
                "models:/rlhf-policy@champion",
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            env={**os.environ, "MLFLOW_TRACKING_URI": project.tracking_uri},
            stdout=output,
            stderr=output,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": ["A review."]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.loads(response.read())["predictions"]
        assert len(predictions) == 1 and isinstance(predictions[0], str) and predictions[0].strip(), predictions
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
