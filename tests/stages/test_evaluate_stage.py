"""The evaluate stage (`rlhf.stages.evaluate.run`) on the session's tiny SFT and reward models.

The policy is either the SFT model itself (every answer must then be identical to SFT's: a tie on every prompt, no
KL, no gain) or a perturbed copy of it (different answers, KL > 0). All evaluations of this module share one sqlite
MLflow store in their own tmp project, so the runs they leave can be inspected.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from stage_helpers import STAGE_PARAMS, Trained, inside

from rlhf.config import ConfigError, load_params

# Tests on the session's trained models (trained once, ~15-30 s on CPU); the config checks alone are fast.
slow = pytest.mark.slow


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


class Project:
    """A tmp project with the tiny data and params, evaluating the session models; one MLflow store for all runs."""

    def __init__(self, root: Path, sft: Path, reward: Path) -> None:
        self.root, self.sft, self.reward = root, sft, reward
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"

    def params(self, *overrides: str):
        return load_params(
            self.root / "params.yaml",
            [f"evaluate.sft_model={self.sft}", f"evaluate.reward_model={self.reward}", *overrides],
        )

    def evaluate(self, policy: Path, output: str, *overrides: str):
        """Runs the stage inside the project (its working directory), tracking into the project's store."""
        from rlhf.stages import evaluate

        with inside(self.root) as patch:
            patch.setenv("MLFLOW_TRACKING_URI", self.tracking_uri)
            params = self.params(f"evaluate.policy_model={policy}", f"evaluate.output_dir={output}", *overrides)
            return evaluate.run(params.evaluate)

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri)

    def runs(self, name: str) -> list[Any]:
        client = self.client()
        experiment = client.get_experiment_by_name("rlhf")
        if experiment is None:
            return []
        return [run for run in client.search_runs([experiment.experiment_id]) if run.info.run_name == name]


@pytest.fixture(scope="module")
def project(
    tmp_path_factory: pytest.TempPathFactory, tiny_demo_data: Path, sft_trained: Trained, reward_trained: Trained
) -> Project:
    root = tmp_path_factory.mktemp("evaluate-project")
    shutil.copytree(tiny_demo_data, root / "data")
    (root / "params.yaml").write_text(yaml.safe_dump(STAGE_PARAMS, sort_keys=False))
    return Project(root, sft_trained.output, reward_trained.output)


@pytest.fixture(scope="module")
def same_policy(project: Project) -> Any:
    """The SFT model evaluated against itself (gold annotator: vader)."""
    return project.evaluate(project.sft, "reports/same")


@pytest.fixture(scope="module")
def perturbed_policy(project: Project, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the SFT model with noise on every weight, carrying a PPO training history like a PPO output does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.tracking import HISTORY_FILE

    folder = tmp_path_factory.mktemp("perturbed") / "policy"
    model = AutoModelForCausalLM.from_pretrained(str(project.sft))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(parameter.std() * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(project.sft)).save_pretrained(str(folder))
    history = [{"step": step, "objective/scores": 0.1 * step, "objective/kl": 0.05 * step} for step in range(1, 6)]
    (folder / HISTORY_FILE).write_text(json.dumps(history))
    return folder


@pytest.fixture(scope="module")
def different_policy(project: Project, perturbed_policy: Path) -> Any:
    """The perturbed policy evaluated without a gold annotator."""
    return project.evaluate(perturbed_policy, "reports/different", "evaluate.gold_annotator=none")


# ------------------------------------------------------------------------------------ the SFT model against itself


@slow
def test_same_model_ties_on_every_prompt(project: Project, same_policy: Any) -> None:
    """Same weights, same sampling seed: identical answers, so win rates 0.5, no gain and no KL."""
    metrics = same_policy.metrics
    prompts = STAGE_PARAMS["demo"]["eval_prompts"]
    assert metrics["prompts"] == prompts
    assert metrics["win_rate/rm"] == 0.5 and metrics["win_rate/gold"] == 0.5
    assert metrics["rm_gain_in_sft_std"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["gold_gain"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["policy/kl"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["sft/kl"] == pytest.approx(0.0, abs=1e-5)
    for key in ("rm_score", "gold_score", "eos_rate", "length", "repetition", "distinct_2"):
        assert metrics[f"policy/{key}"] == pytest.approx(metrics[f"sft/{key}"]), key
    expected = {
        f"{model}/{key}"
        for model in ("policy", "sft")
        for key in ("rm_score", "rm_score_std", "gold_score", "kl", "eos_rate", "length", "repetition", "distinct_2")
    }
    expected |= {
        "win_rate/rm",
        "win_rate/gold",
        "rm_gain_in_sft_std",
        "gold_gain",
        "prompts",
        "rm_accuracy",
        "rm_pairs",
    }
    expected |= {
        f"{key}_ci_{end}"
        for key in ("win_rate/rm", "win_rate/gold", "rm_gain_in_sft_std", "gold_gain")
        for end in ("low", "high")
    }
    assert set(metrics) == expected

    output = project.root / "reports" / "same"
    answers = read_jsonl(output / "answers.jsonl")
    assert len(answers) == 2 * prompts
    sft = [row for row in answers if row["model"] == "sft"]
    policy = [row for row in answers if row["model"] == "policy"]
    assert len(sft) == len(policy) == prompts
    assert [row["prompt"] for row in sft] == [row["prompt"] for row in policy]
    assert [row["response"] for row in sft] == [row["response"] for row in policy]
    assert any(row["response"].strip() for row in sft)  # real answers, not empty strings
    assert all(isinstance(row["gold_score"], float) for row in answers)


@slow
def test_report_and_mlflow_run(project: Project, same_policy: Any) -> None:
    """The report lands in the output folder (no staging leftovers) and in a finished MLflow run named evaluate,
    whose id the folder's rlhf_run.json records (the evaluation gate tags that run)."""
    output = project.root / "reports" / "same"
    for name in ("report.md", "report.html", "plots/score_distributions.png", "answers.jsonl", "rlhf_run.json"):
        assert (output / name).is_file(), name
    assert not (output / "plots" / "ppo_training.png").exists()  # the SFT folder has no PPO history
    assert leftovers(output.parent) == []

    provenance = json.loads((output / "rlhf_run.json").read_text())
    assert provenance["stage"] == "evaluate"
    run = project.client().get_run(provenance["mlflow_run_id"])
    assert run.info.run_name == "evaluate" and run.info.status == "FINISHED"
    assert run.data.tags["rlhf.stage"] == "evaluate"
    assert run.data.metrics["rm_accuracy"] == pytest.approx(same_policy.metrics["rm_accuracy"])
    assert run.data.metrics["win_rate/rm"] == 0.5

    artifacts = {info.path for info in project.client().list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/report.md",
        "evaluation/report.html",
        "evaluation/answers.jsonl",
        "evaluation/plots",
    } <= artifacts
    plots = {info.path for info in project.client().list_artifacts(run.info.run_id, "evaluation/plots")}
    assert plots == {"evaluation/plots/score_distributions.png"}

    report = (output / "report.md").read_text()
    # It measures; the gate steps judge, and the register step's decision page shows their verdicts and the champion.
    assert "Gate verdicts" not in report and "champion" not in report


@slow
def test_rm_accuracy_is_measured_on_the_reward_stage_held_out_pairs(
    project: Project, same_policy: Any, reward_trained: Trained, session_project: Path
) -> None:
    """The evaluation recomputes the reward model's accuracy on exactly the pairs the reward stage held out."""
    import torch
    from mlflow import MlflowClient
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.data.formats import load_dataset
    from rlhf.data.io import fingerprint

    # The same rows: the evaluate run's preference input has the fingerprint of the reward run's evaluation input.
    def preference_inputs(client, folder: Path, context: str) -> list[str]:
        run = client.get_run(json.loads((folder / "rlhf_run.json").read_text())["mlflow_run_id"])
        return [
            item.dataset.digest
            for item in run.inputs.dataset_inputs
            if item.dataset.name == "preferences"
            and {tag.key: tag.value for tag in item.tags}.get("mlflow.data.context") == context
        ]

    reward_held_out = preference_inputs(
        MlflowClient(f"sqlite:///{session_project / 'mlflow.db'}"), reward_trained.output, "evaluation"
    )
    evaluated = preference_inputs(project.client(), project.root / "reports" / "same", "evaluation")
    assert len(reward_held_out) == 1 and evaluated == reward_held_out

    dataset, _ = load_dataset(str(project.root / "data" / "preferences.jsonl"), "preference")
    fraction, seed = STAGE_PARAMS["reward"]["eval_fraction"], load_params(project.root / "params.yaml").reward.seed
    held_out = dataset.train_test_split(test_size=fraction, seed=seed, shuffle=True)["test"]
    assert same_policy.metrics["rm_pairs"] == len(held_out) == reward_trained.result.metrics["eval_pairs"]

    assert evaluated == [fingerprint(held_out.to_list())[:16]]  # ... and they are the rows scored below

    # Score each pair on its own (no padding): prompt + answer + EOS, as the reward model was trained.
    tokenizer = AutoTokenizer.from_pretrained(str(reward_trained.output))
    model = AutoModelForSequenceClassification.from_pretrained(str(reward_trained.output)).eval()

    def reward(prompt: str, answer: str) -> float:
        with torch.no_grad():
            return model(**tokenizer(prompt + answer + tokenizer.eos_token, return_tensors="pt")).logits.item()

    correct = sum(
        reward(pair["prompt"], pair["chosen"]) > reward(pair["prompt"], pair["rejected"]) for pair in held_out
    )
    assert same_policy.metrics["rm_accuracy"] == pytest.approx(correct / len(held_out))
    # ... and the reward stage's own evaluation (TRL's) counted the same.
    assert same_policy.metrics["rm_accuracy"] == pytest.approx(reward_trained.result.metrics["eval_accuracy"], abs=1e-6)


# --------------------------------------------------------------------------------------- a policy that differs


@slow
def test_different_policy_answers_differently_with_kl(project: Project, different_policy: Any) -> None:
    metrics = different_policy.metrics
    assert metrics["policy/kl"] > 0.1
    assert metrics["sft/kl"] == pytest.approx(0.0, abs=1e-5)
    answers = read_jsonl(project.root / "reports" / "different" / "answers.jsonl")
    sft = [row["response"] for row in answers if row["model"] == "sft"]
    policy = [row["response"] for row in answers if row["model"] == "policy"]
    assert len(sft) == len(policy) == STAGE_PARAMS["demo"]["eval_prompts"]
    assert sum(a != b for a, b in zip(sft, policy)) >= len(sft) // 2
    # Its PPO history travels with it: the report plots the training curves.
    assert (project.root / "reports" / "different" / "plots" / "ppo_training.png").is_file()


@slow
def test_sft_answers_do_not_depend_on_the_policy(project: Project, same_policy: Any, different_policy: Any) -> None:
    """The baseline is sampled under the same seed whatever it is compared with."""

    def sft_answers(folder: str) -> list[str]:
        rows = read_jsonl(project.root / "reports" / folder / "answers.jsonl")
        return [row["response"] for row in rows if row["model"] == "sft"]

    assert sft_answers("same") == sft_answers("different")
    assert different_policy.metrics["sft/rm_score"] == pytest.approx(same_policy.metrics["sft/rm_score"])


@slow
def test_without_gold_annotator_there_are_no_gold_metrics(project: Project, different_policy: Any) -> None:
    metrics = different_policy.metrics
    assert not [key for key in metrics if "gold" in key]
    assert {"win_rate/rm", "rm_gain_in_sft_std", "policy/kl", "rm_accuracy"} <= set(metrics)
    answers = read_jsonl(project.root / "reports" / "different" / "answers.jsonl")
    assert all(row["gold_score"] is None for row in answers)
    assert "gold_score" not in (project.root / "reports" / "different" / "report.md").read_text(encoding="utf-8")


@slow
def test_best_of_n_keeps_the_sft_sample_the_reward_model_prefers(project: Project, same_policy: Any) -> None:
    """Best of 3 SFT samples by the reward model: SFT's own sample is one of the three, so per prompt the best scores
    at least as high by the reward model; the report shows it beside PPO, and its KL is the analytic bound."""
    best = project.evaluate(project.sft, "reports/best", "evaluate.best_of_n=3").metrics
    assert best["best_of_n/n"] == 3 and best["best_of_n/kl"] == pytest.approx(math.log(3) - 2 / 3)
    assert best["best_of_n/rm_score"] >= best["sft/rm_score"] + 1e-6  # three tiny-model samples never all tie
    assert best["best_of_n/win_rate/rm"] > 0.5
    assert {"best_of_n/gold_score", "best_of_n/gold_gain", "best_of_n/gold_gain_ci_low"} <= set(best)
    # The PPO side and the SFT side are untouched by the extra samples.
    assert {key: value for key, value in best.items() if not key.startswith("best_of_n/")} == pytest.approx(
        {key: value for key, value in same_policy.metrics.items()}
    )
    report = (project.root / "reports" / "best" / "report.md").read_text(encoding="utf-8")
    assert "SFT best of 3 by RM" in report and "best_of_n/gold_gain" in report


def test_best_of_one_is_a_config_error(workdir: Path) -> None:
    with pytest.raises(ConfigError, match=r"best_of_n: .*1 is the SFT model itself"):
        load_params("params.yaml", ["evaluate.best_of_n=1"])


# ---------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("override", ["evaluate.preferences_eval_fraction=0.3", "evaluate.preferences_seed=7"])
def test_evaluating_on_training_pairs_is_a_config_error(workdir: Path, override: str) -> None:
    """Another split of the reward stage's dataset would count pairs the reward model trained on."""
    with pytest.raises(ConfigError, match=override.split(".")[1].split("=")[0]):
        load_params(overrides=[override])


def test_other_split_of_another_preferences_file_is_fine(workdir: Path) -> None:
    params = load_params(
        overrides=["evaluate.preferences=data/other_preferences.jsonl", "evaluate.preferences_eval_fraction=0.3"]
    )
    assert params.evaluate.preferences_eval_fraction == 0.3


@pytest.mark.parametrize("spelling", ["./data/preferences.jsonl", "ABSOLUTE"])
def test_held_out_check_sees_through_path_spellings(workdir: Path, spelling: str) -> None:
    """The reward stage's dataset spelt another way is still the same file: the split check must still apply."""
    path = str(workdir / "data" / "preferences.jsonl") if spelling == "ABSOLUTE" else spelling
    with pytest.raises(ConfigError, match="preferences_eval_fraction"):
        load_params(overrides=[f"evaluate.preferences={path}", "evaluate.preferences_eval_fraction=0.3"])


@slow
def test_sft_model_with_another_tokenizer_is_a_config_error(project: Project, tmp_path: Path) -> None:
    """KL needs both models over the same vocabulary; the stage says so before loading any model or tracking."""
    from transformers import AutoTokenizer

    other = tmp_path / "other-sft"
    shutil.copytree(project.sft, other)
    tokenizer = AutoTokenizer.from_pretrained(str(other))
    tokenizer.add_tokens(["<an-extra-token>"])
    tokenizer.save_pretrained(str(other))
    runs_before = len(project.runs("evaluate"))

    with pytest.raises(ConfigError, match=r"sft_model.*tokenizer"):
        project.evaluate(project.sft, "reports/tokenizer", f"evaluate.sft_model={other}")
    assert not (project.root / "reports" / "tokenizer").exists()
    assert len(project.runs("evaluate")) == runs_before


@slow
def test_unknown_gold_annotator_fails_before_writing(project: Project) -> None:
    runs_before = len(project.runs("evaluate"))
    with pytest.raises(ConfigError, match="nosuch:fn"):
        project.evaluate(project.sft, "reports/nosuch", "evaluate.gold_annotator=nosuch:fn")
    assert not (project.root / "reports" / "nosuch").exists()
    assert len(project.runs("evaluate")) == runs_before


# --------------------------------------------------------------------------------------------- failures midway


@pytest.fixture
def exploding_annotator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A gold annotator that loads but raises when it scores (module named per test, so never cached)."""
    (tmp_path / "exploding_annotator.py").write_text(
        "def score(texts):\n    raise RuntimeError('annotator service unavailable')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "exploding_annotator:score"


@slow
def test_failure_midway_leaves_no_report_and_a_failed_run(project: Project, exploding_annotator: str) -> None:
    """The annotator fails while scoring, inside the MLflow run: the run ends FAILED and nothing is written."""
    runs_before = {run.info.run_id for run in project.runs("evaluate")}
    with pytest.raises(RuntimeError, match="annotator service unavailable"):
        project.evaluate(project.sft, "reports/midway", f"evaluate.gold_annotator={exploding_annotator}")
    reports = project.root / "reports"
    assert not (reports / "midway").exists()
    assert leftovers(reports) == []
    [new_run] = [run for run in project.runs("evaluate") if run.info.run_id not in runs_before]
    assert new_run.info.status == "FAILED"


@slow
def test_failure_while_writing_keeps_the_previous_report(
    project: Project, same_policy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash halfway through writing the report leaves the last complete report in place, untouched."""
    import rlhf.stages.evaluate as evaluate_stage

    output = project.root / "reports" / "same"
    before = {path.relative_to(output): path.read_bytes() for path in output.rglob("*") if path.is_file()}
    write_report = evaluate_stage.write_report

    def crash_after_writing(folder: Path, *args: Any) -> list[str]:
        write_report(folder, *args)
        raise OSError("disk full")

    monkeypatch.setattr(evaluate_stage, "write_report", crash_after_writing)
    from rlhf.s3 import StorageError

    with pytest.raises(
        StorageError,
        match=r"reports/same: not written \(disk full\); the previous contents are "
        "unchanged",
    ):
        project.evaluate(project.sft, "reports/same")
    after = {path.relative_to(output): path.read_bytes() for path in output.rglob("*") if path.is_file()}
    assert after == before
    assert leftovers(output.parent) == []
