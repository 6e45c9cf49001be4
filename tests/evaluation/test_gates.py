"""The gates between stages (`rlhf.gates`, `rlhf gate`): thresholds checked against metrics files, no models.

Each test writes the metrics a stage would have written, runs a gate on them and reads the verdict: the JSON file, the
tags on the judged MLflow run (a real sqlite store in tmp) or the CLI's exit status and messages.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf.cli import main
from rlhf.config import ConfigError, GatesConfig
from rlhf.gates import evaluate_gate, read_verdicts

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal

# Evaluation metrics that clear every default threshold of GatesConfig by a wide margin (also at 95% confidence).
PASSING_EVALUATION = {
    "win_rate/rm": 0.92,
    "win_rate/gold": 0.91,
    "prompts": 128.0,
    "rm_gain_in_sft_std": 1.2,
    "gold_gain": 0.67,
    "policy/kl": 3.9,
    "policy/eos_rate": 1.0,
    "policy/repetition": 0.0,
    "rm_accuracy": 1.0,
    "rm_pairs": 300.0,
    "gold_drop_while_rm_rose": 0.01,
}
GOLD_METRICS = ("win_rate/gold", "gold_gain", "gold_drop_while_rm_rose")

# check -> (metric, a value that fails the check's default threshold on its own)
FAILING_VALUE = {
    "min_win_rate_rm": ("win_rate/rm", 0.5),
    "min_win_rate_gold": ("win_rate/gold", 0.5),
    "min_rm_gain": ("rm_gain_in_sft_std", 0.1),
    "min_gold_gain": ("gold_gain", 0.0),
    "max_kl": ("policy/kl", 7.5),
    "min_eos_rate": ("policy/eos_rate", 0.8),
    "max_repetition": ("policy/repetition", 0.35),
    "max_gold_drop": ("gold_drop_while_rm_rose", 0.08),  # over-optimisation: gold fell from its peak, proxy rose
}


def write_metrics(tmp_path: Path, metrics: dict[str, Any], name: str = "metrics.json") -> Path:
    path = tmp_path / "metrics" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics))
    return path


def gates_config(tmp_path: Path, **overrides: Any) -> GatesConfig:
    """Gates reading metrics from and writing verdicts into tmp_path (run folders without provenance by default)."""
    settings: dict[str, Any] = {
        "reward_metrics": str(tmp_path / "metrics" / "reward.json"),
        "evaluation_metrics": str(tmp_path / "metrics" / "evaluate.json"),
        "reward_model": str(tmp_path / "models" / "reward"),
        "evaluation_report": str(tmp_path / "reports" / "evaluation"),
        "output_dir": str(tmp_path / "gates"),
    }
    return GatesConfig(**(settings | overrides))


def check_of(verdict: dict[str, Any], name: str) -> dict[str, Any]:
    [check] = [check for check in verdict["checks"] if check["check"] == name]
    return check


# ------------------------------------------------------------------------------------------------ reward gate


def test_reward_gate_at_confidence_zero_judges_the_point_estimate(tmp_path: Path) -> None:
    """Perfect accuracy on 300 pairs passes 0.99 when the gate trusts the point estimate."""
    write_metrics(tmp_path, {"eval_accuracy": 1.0, "eval_pairs": 300.0}, "reward.json")
    verdict = evaluate_gate("reward", gates_config(tmp_path, confidence=0.0, min_rm_accuracy=0.99))

    assert verdict["passed"] is True and verdict["failed_checks"] == []
    check = check_of(verdict, "min_rm_accuracy")
    assert check == {
        "check": "min_rm_accuracy",
        "metric": "eval_accuracy",
        "threshold": 0.99,
        "op": ">=",
        "status": "pass",
        "value": 1.0,
    }  # no `measured`/`judged_on`: nothing was adjusted
    assert json.loads((tmp_path / "gates" / "reward.json").read_text()) == verdict


def test_reward_gate_judges_accuracy_by_its_wilson_lower_bound(tmp_path: Path) -> None:
    """At 95% confidence, 300/300 counts as 300/(300+z^2) ~ 0.9874: it clears 0.98 but not 0.99."""
    write_metrics(tmp_path, {"eval_accuracy": 1.0, "eval_pairs": 300.0}, "reward.json")
    bound = 300 / (300 + Z95**2)

    passing = evaluate_gate("reward", gates_config(tmp_path, confidence=0.95, min_rm_accuracy=0.98))
    assert passing["passed"] is True
    assert check_of(passing, "min_rm_accuracy")["value"] == pytest.approx(bound)

    failing = evaluate_gate("reward", gates_config(tmp_path, confidence=0.95, min_rm_accuracy=0.99))
    assert failing["passed"] is False
    assert failing["failed_checks"] == ["min_rm_accuracy"]
    check = check_of(failing, "min_rm_accuracy")
    assert check["status"] == "fail"
    assert check["value"] == pytest.approx(bound)
    assert check["measured"] == 1.0
    assert check["threshold"] == 0.99
    assert "95%" in check["judged_on"] and "n=300" in check["judged_on"]
    # The file on disk is the latest verdict, and read_verdicts reads it back.
    written = json.loads((tmp_path / "gates" / "reward.json").read_text())
    assert written == failing
    assert read_verdicts(tmp_path / "gates")["reward"] == failing


def test_small_evaluation_set_cannot_pass_by_luck(tmp_path: Path) -> None:
    """The same accuracy on fewer pairs has a wider interval: 0.9 on 20 pairs fails 0.75, on 2000 it passes."""
    cfg = gates_config(tmp_path, confidence=0.95, min_rm_accuracy=0.75)
    write_metrics(tmp_path, {"eval_accuracy": 0.9, "eval_pairs": 20.0}, "reward.json")
    assert evaluate_gate("reward", cfg)["passed"] is False
    write_metrics(tmp_path, {"eval_accuracy": 0.9, "eval_pairs": 2000.0}, "reward.json")
    assert evaluate_gate("reward", cfg)["passed"] is True


def test_read_verdicts_counts_a_gate_that_never_ran_as_failed(tmp_path: Path) -> None:
    write_metrics(tmp_path, {"eval_accuracy": 1.0, "eval_pairs": 300.0}, "reward.json")
    evaluate_gate("reward", gates_config(tmp_path, confidence=0.0, min_rm_accuracy=0.5))
    verdicts = read_verdicts(tmp_path / "gates")
    assert verdicts["reward"]["passed"] is True
    assert verdicts["evaluation"]["passed"] is False


# -------------------------------------------------------------------------------------------- evaluation gate


def test_evaluation_gate_passes_good_metrics(tmp_path: Path) -> None:
    write_metrics(tmp_path, PASSING_EVALUATION, "evaluate.json")
    verdict = evaluate_gate("evaluation", gates_config(tmp_path))
    assert verdict["passed"] is True, verdict
    assert [check["check"] for check in verdict["checks"]] == list(FAILING_VALUE)
    assert {check["status"] for check in verdict["checks"]} == {"pass"}
    assert json.loads((tmp_path / "gates" / "evaluation.json").read_text()) == verdict


@pytest.mark.parametrize("failing_check", list(FAILING_VALUE))
def test_each_evaluation_check_fails_the_gate_on_its_own(tmp_path: Path, failing_check: str) -> None:
    """One metric out of bounds, everything else fine: the gate fails and names that check only."""
    metric, bad_value = FAILING_VALUE[failing_check]
    write_metrics(tmp_path, PASSING_EVALUATION | {metric: bad_value}, "evaluate.json")
    verdict = evaluate_gate("evaluation", gates_config(tmp_path))

    assert verdict["passed"] is False
    assert verdict["failed_checks"] == [failing_check]
    check = check_of(verdict, failing_check)
    assert check["status"] == "fail" and check["metric"] == metric
    if "measured" in check:  # a win rate: judged on its lower bound, which is below the measured value
        assert check["measured"] == bad_value and check["value"] < bad_value
    else:
        assert check["value"] == bad_value
    assert all(other["status"] == "pass" for other in verdict["checks"] if other["check"] != failing_check)


def test_win_rate_passing_as_a_point_estimate_fails_on_too_few_prompts(tmp_path: Path) -> None:
    """0.65 beats 0.6, but not when measured on 16 prompts (the Wilson lower bound is ~0.41)."""
    write_metrics(tmp_path, PASSING_EVALUATION | {"win_rate/rm": 0.65, "prompts": 16.0}, "evaluate.json")
    assert evaluate_gate("evaluation", gates_config(tmp_path, confidence=0.0))["passed"] is True
    verdict = evaluate_gate("evaluation", gates_config(tmp_path, confidence=0.95))
    assert verdict["failed_checks"] == ["min_win_rate_rm"]
    assert check_of(verdict, "min_win_rate_rm")["value"] < 0.45
    # Gains and KL are not proportions: never adjusted.
    assert "measured" not in check_of(verdict, "max_kl")


def test_gold_checks_are_skipped_without_gold_metrics(tmp_path: Path) -> None:
    """No gold annotator, no gold metrics: the gold checks are skipped (not failed), the rest still judge."""
    without_gold = {key: value for key, value in PASSING_EVALUATION.items() if key not in GOLD_METRICS}
    write_metrics(tmp_path, without_gold, "evaluate.json")
    verdict = evaluate_gate("evaluation", gates_config(tmp_path))
    assert verdict["passed"] is True
    for name in ("min_win_rate_gold", "min_gold_gain"):
        check = check_of(verdict, name)
        assert check["status"] == "skipped" and "value" not in check
        assert "not measured" in check["reason"]
    assert check_of(verdict, "max_kl")["status"] == "pass"

    # Skipping gold does not excuse the other checks.
    write_metrics(tmp_path, without_gold | {"policy/kl": 9.0}, "evaluate.json")
    assert evaluate_gate("evaluation", gates_config(tmp_path))["failed_checks"] == ["max_kl"]


def test_null_threshold_turns_a_check_off(tmp_path: Path) -> None:
    write_metrics(tmp_path, PASSING_EVALUATION | {"policy/kl": 50.0}, "evaluate.json")
    assert evaluate_gate("evaluation", gates_config(tmp_path))["failed_checks"] == ["max_kl"]

    verdict = evaluate_gate("evaluation", gates_config(tmp_path, max_kl=None))
    assert verdict["passed"] is True
    check = check_of(verdict, "max_kl")
    assert check["status"] == "skipped" and check["threshold"] is None
    assert "null" in check["reason"]


def test_nan_metric_fails_in_either_direction(tmp_path: Path) -> None:
    """A diverged run (NaN KL, NaN gain) must not slip through a comparison."""
    write_metrics(
        tmp_path, PASSING_EVALUATION | {"policy/kl": math.nan, "rm_gain_in_sft_std": math.nan}, "evaluate.json"
    )
    verdict = evaluate_gate("evaluation", gates_config(tmp_path))
    assert sorted(verdict["failed_checks"]) == ["max_kl", "min_rm_gain"]


@pytest.mark.parametrize(
    ("gate", "metrics_file", "dropped"),
    [
        ("evaluation", "evaluate.json", "policy/kl"),
        ("reward", "reward.json", "eval_accuracy"),
    ],
)
def test_missing_required_metric_does_not_pass(tmp_path: Path, gate: str, metrics_file: str, dropped: str) -> None:
    """Only the gold metrics may legitimately be absent. A metrics file lacking a metric every run produces (a file
    from another stage, a renamed key) must not pass the gate by skipping the check: fail it, or refuse the file."""
    metrics = PASSING_EVALUATION if gate == "evaluation" else {"eval_accuracy": 1.0, "eval_pairs": 300.0}
    write_metrics(tmp_path, {key: value for key, value in metrics.items() if key != dropped}, metrics_file)
    try:
        verdict = evaluate_gate(gate, gates_config(tmp_path))
    except ConfigError as exc:
        assert dropped in str(exc)
    else:
        assert verdict["passed"] is False, f"{gate} gate passed without {dropped}: {verdict['checks']}"


# ---------------------------------------------------------------------------------------------- MLflow tags


@pytest.fixture
def tracking_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real sqlite MLflow store in tmp, via MLFLOW_TRACKING_URI (as a DVC run would have it)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(uri)


def finished_run(client, folder: Path, name: str) -> str:
    """A finished run whose id is in `folder/rlhf_run.json`, as a stage leaves it."""
    experiment = client.create_experiment(f"gates-{name}")
    run = client.create_run(experiment, run_name=name)
    client.set_terminated(run.info.run_id)
    folder.mkdir(parents=True)
    (folder / "rlhf_run.json").write_text(json.dumps({"mlflow_run_id": run.info.run_id}))
    return run.info.run_id


def test_gate_tags_the_judged_runs(tmp_path: Path, tracking_store) -> None:
    """The reward gate tags the reward stage's run, the evaluation gate the evaluate stage's run, pass or fail."""
    reward_run = finished_run(tracking_store, tmp_path / "models" / "reward", "reward")
    evaluate_run = finished_run(tracking_store, tmp_path / "reports" / "evaluation", "evaluate")
    write_metrics(tmp_path, {"eval_accuracy": 0.95, "eval_pairs": 300.0}, "reward.json")
    write_metrics(tmp_path, PASSING_EVALUATION | {"policy/kl": 8.0, "policy/eos_rate": 0.5}, "evaluate.json")

    reward = evaluate_gate("reward", gates_config(tmp_path))
    evaluation = evaluate_gate("evaluation", gates_config(tmp_path))

    assert reward["judged_run"] == reward_run and evaluation["judged_run"] == evaluate_run
    reward_tags = tracking_store.get_run(reward_run).data.tags
    assert reward_tags["rlhf.gate.reward"] == "passed"
    assert reward_tags["rlhf.gate.reward.failed_checks"] == ""
    assert "rlhf.gate.evaluation" not in reward_tags
    evaluate_tags = tracking_store.get_run(evaluate_run).data.tags
    assert evaluate_tags["rlhf.gate.evaluation"] == "failed"
    assert evaluate_tags["rlhf.gate.evaluation.failed_checks"].split(",") == ["max_kl", "min_eos_rate"]
    assert "rlhf.gate.reward" not in evaluate_tags


def test_rerun_gate_overwrites_its_tags(tmp_path: Path, tracking_store) -> None:
    """A gate re-run after a threshold change replaces the verdict on the run (no stale `failed`)."""
    run_id = finished_run(tracking_store, tmp_path / "models" / "reward", "reward")
    write_metrics(tmp_path, {"eval_accuracy": 0.8, "eval_pairs": 300.0}, "reward.json")

    evaluate_gate("reward", gates_config(tmp_path, min_rm_accuracy=0.9))
    assert tracking_store.get_run(run_id).data.tags["rlhf.gate.reward.failed_checks"] == "min_rm_accuracy"
    evaluate_gate("reward", gates_config(tmp_path, min_rm_accuracy=0.7))
    tags = tracking_store.get_run(run_id).data.tags
    assert tags["rlhf.gate.reward"] == "passed" and tags["rlhf.gate.reward.failed_checks"] == ""


# -------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tmp project: params.yaml with the default gates and a passing metrics/evaluate.json; the test runs in it."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"gates": {"confidence": 0.95}}))
    write_metrics(tmp_path, PASSING_EVALUATION, "evaluate.json")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_gate_passing_exits_zero(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gate", "evaluation", "--params", "params.yaml"]) == 0
    out, err = capsys.readouterr()
    assert "gate evaluation: passed" in out
    assert sum("pass  " in line for line in out.splitlines()) == 8  # one line per check
    assert err == ""
    assert json.loads((project / "gates" / "evaluation.json").read_text())["passed"] is True


def test_cli_gate_failing_exits_one_naming_the_check(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tightened threshold fails the gate: exit 1 (DVC stops), the failed check on stderr with value and bound."""
    code = main(["gate", "evaluation", "--params", "params.yaml", "--set", "gates.max_kl=0.1"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "gate evaluation: FAILED" in out
    assert err.startswith("error: gate 'evaluation' failed: max_kl (")
    assert "policy/kl 3.9" in err and "<= 0.1" in err
    assert "min_eos_rate" not in err  # only the failing check
    verdict = json.loads((project / "gates" / "evaluation.json").read_text())
    assert verdict["failed_checks"] == ["max_kl"]


def test_cli_gate_without_metrics_is_a_one_line_error(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "metrics" / "evaluate.json").unlink()
    code = main(["gate", "evaluation", "--params", "params.yaml"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "gates.evaluation_metrics" in err and "metrics/evaluate.json" in err
    assert not (project / "gates" / "evaluation.json").exists()


def test_cli_gate_with_invalid_metrics_json_names_file_and_line(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "metrics" / "evaluate.json").write_text('{\n  "policy/kl": 1.0,\n}\n')
    assert main(["gate", "evaluation", "--params", "params.yaml"]) == 2
    err = capsys.readouterr().err
    assert "gates.evaluation_metrics" in err and "evaluate.json:3" in err and err.count("\n") == 1
