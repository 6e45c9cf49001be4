"""Evaluate: the PPO policy against the SFT model on held-out prompts, and the reward model on held-out pairs.

Both policies answer every held-out prompt under the same sampling seed. Each answer is scored by the reward model
and the gold annotator; the report gives per-model means (scores, KL to the SFT reference, EOS rate, length,
repetition, distinct-2), PPO's win rates and gains over SFT, and the reward model's pairwise accuracy on the pairs
the reward stage held out. The metrics feed the evaluation gate; the report (Markdown + HTML with plots) and the
per-prompt answers go to the output folder and to MLflow. It measures and judges nothing: the gate steps judge
these metrics, and the register step's decision page shows their verdicts beside the registered champion.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf import tracking
from rlhf.annotators import get_annotator
from rlhf.config import ConfigError, EvaluateConfig, config_hash, flatten
from rlhf.console import progress_as_lines
from rlhf.data.formats import load_dataset, split
from rlhf.evaluation import (
    best_of_n,
    best_of_n_metrics,
    compare,
    overoptimisation,
    pairwise_accuracy,
    sample_and_score,
)
from rlhf.modeling import (
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    require_context,
    require_reward_model,
    resolve,
)
from rlhf.report import write_report
from rlhf.stages.common import StageResult
from rlhf.storage import atomic_dir, fetch, write_json
from rlhf.tracking import HISTORY_FILE


def run(cfg: EvaluateConfig) -> StageResult:
    eval_prompts, prompts_fingerprint = load_dataset(cfg.eval_prompts, "prompts")
    preferences, preferences_fingerprint = load_dataset(cfg.preferences, "preference")
    held_out_pairs = split(preferences, cfg.preferences_eval_fraction, cfg.preferences_seed, cfg.preferences)[1]
    annotator = get_annotator(cfg.gold_annotator)
    # Models that are not here, too short a context window, or a causal LM given as the reward model, fail now:
    # before any model loads.
    require_context(
        cfg.policy_model,
        "evaluate.policy_model",
        cfg.max_new_tokens + 1,
        "evaluate.max_new_tokens",
        cfg.trust_remote_code,
    )
    resolve(cfg.sft_model, "evaluate.sft_model")
    require_reward_model(cfg.reward_model, "evaluate.reward_model", cfg.trust_remote_code)
    import torch
    from transformers import set_seed

    set_seed(cfg.seed)
    loading = {"dtype": cfg.dtype, "trust_remote_code": cfg.trust_remote_code}
    tokenizer = load_tokenizer(cfg.policy_model, "evaluate.policy_model", cfg.trust_remote_code)
    tokenizer.padding_side = "left"  # generation continues from the right end of every prompt
    if load_tokenizer(cfg.sft_model, "evaluate.sft_model", cfg.trust_remote_code).get_vocab() != tokenizer.get_vocab():
        raise ConfigError("evaluate.sft_model: its tokenizer differs from the policy's, so KL cannot be measured")
    reward_tokenizer = load_tokenizer(cfg.reward_model, "evaluate.reward_model", cfg.trust_remote_code)
    reward_tokenizer.padding_side = "right"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = load_causal_lm(cfg.policy_model, tokenizer, "evaluate.policy_model", **loading).to(device).eval()
    sft = load_causal_lm(cfg.sft_model, tokenizer, "evaluate.sft_model", **loading).to(device).eval()
    reward_model = (
        load_reward_model(cfg.reward_model, reward_tokenizer, "evaluate.reward_model", **loading).to(device).eval()
    )
    history_file = Path(fetch(cfg.policy_model)) / HISTORY_FILE
    history = json.loads(history_file.read_text()) if history_file.is_file() else []

    def sft_logits(ids, attention, positions):
        return sft(input_ids=ids, attention_mask=attention, position_ids=positions).logits

    prompts = eval_prompts["prompt"]

    def answers(model, seed: int = cfg.seed) -> list[dict]:
        return sample_and_score(
            model,
            sft_logits,
            tokenizer,
            reward_model,
            reward_tokenizer,
            prompts,
            cfg.model_copy(update={"seed": seed}),
            cfg.batch_size,
            annotator,
            device,
        )

    with tracking.stage_run("evaluate", flatten(cfg, "evaluate")):
        tracking.log_dataset(eval_prompts, "eval_prompts", cfg.eval_prompts, prompts_fingerprint, "evaluation")
        tracking.log_dataset(held_out_pairs, "preferences", cfg.preferences, preferences_fingerprint, "evaluation")
        policy_rows, sft_rows = answers(policy), answers(sft)
        metrics = compare(policy_rows, sft_rows) | overoptimisation(history)
        if cfg.best_of_n:  # SFT's own sample is one of the n
            samples = [sft_rows, *(answers(sft, cfg.seed + k) for k in range(1, cfg.best_of_n))]
            metrics |= best_of_n_metrics(best_of_n(samples), sft_rows, cfg.best_of_n)
        metrics["rm_accuracy"] = pairwise_accuracy(
            reward_model, reward_tokenizer, held_out_pairs, cfg.batch_size, device
        )
        metrics["rm_pairs"] = float(len(held_out_pairs))
        tracking.log_metrics(metrics)
        datasets = {"eval_prompts": prompts_fingerprint, "preferences": preferences_fingerprint}
        with atomic_dir(cfg.output_dir) as staging:
            identities = _identities(cfg, datasets)
            write_report(staging, metrics, policy_rows, sft_rows, history, cfg.sample_rows, identities)
            with open(staging / "answers.jsonl", "w", encoding="utf-8") as answers_file:
                for model, rows in (("sft", sft_rows), ("policy", policy_rows)):
                    for row in rows:
                        answers_file.write(json.dumps({"model": model, **row}) + "\n")
            provenance = tracking.provenance("evaluate", config_hash(cfg), datasets)
            write_json(staging / tracking.PROVENANCE_FILE, provenance)
            tracking.log_artifacts(staging, "evaluation")
        tracking.log_table(
            {
                "prompt": [row["prompt"] for row in sft_rows],
                "sft": [row["response"] for row in sft_rows],
                "sft_rm_score": [row["rm_score"] for row in sft_rows],
                "ppo": [row["response"] for row in policy_rows],
                "ppo_rm_score": [row["rm_score"] for row in policy_rows],
            },
            "evaluation/answers.json",
        )
    if not progress_as_lines():  # a local pipeline run names the report's copy under reports/ at its end
        print(f"evaluation report: {cfg.output_dir.rstrip('/')}/report.html")
    return StageResult(metrics, [], cfg.output_dir, curves=())


def _identities(cfg: EvaluateConfig, datasets: dict[str, str]) -> list[dict[str, str]]:
    """Who each model is, from the provenance saved beside it: the MLflow run that trained it, the commit, the data."""
    rows = []
    for model, folder in (("PPO policy", cfg.policy_model), ("SFT", cfg.sft_model), ("reward model", cfg.reward_model)):
        provenance = tracking.read_provenance(folder)
        rows.append(
            {
                "model": f"{model}: {folder}",
                "mlflow": provenance.get("mlflow_run_id") or "–",
                "commit": (provenance.get("git_commit") or "–")[:12],
                "data": ", ".join(
                    f"{name} {fingerprint[:12]}" for name, fingerprint in provenance.get("datasets", {}).items()
                )
                or "–",
            }
        )
    rows.append(
        {
            "model": "this evaluation",
            "mlflow": "–",
            "commit": (tracking.git_commit() or "–")[:12],
            "data": ", ".join(f"{name} {fingerprint[:12]}" for name, fingerprint in datasets.items()),
        }
    )
    return rows
