"""PPO: raise the reward model's score of the policy's answers, minus a KL penalty to the reference (SFT) model.

Loads the four models, runs the project's PPO engine (`rlhf.ppo`), then compares the policy with the SFT model on
the held-out prompts (same sampling seed): reward-model score, gold score, KL, EOS rate and length. The policy is
saved with `save_pretrained` (LoRA adapters merged) for the evaluation and registry stages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf import tracking
from rlhf.annotators import get_annotator
from rlhf.config import ConfigError, PPOConfig, config_hash, flatten
from rlhf.console import progress_as_lines
from rlhf.data.formats import load_dataset
from rlhf.evaluation import compare, sample_and_score
from rlhf.modeling import (
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    require_context,
    require_reward_model,
)
from rlhf.ppo.models import Critic, reference_model
from rlhf.stages.common import StageResult, checkpoint_dir, finish, lora_config, save_model
from rlhf.tracking import HISTORY_FILE

if TYPE_CHECKING:
    from rlhf.ppo.trainer import PPOTrainer


def run(cfg: PPOConfig) -> StageResult:
    prompts, prompts_fingerprint = load_dataset(cfg.prompts, "prompts")
    eval_prompts, eval_fingerprint = load_dataset(cfg.eval_prompts, "prompts")
    get_annotator(cfg.gold_annotator)  # fail now, not after training, on a scorer that cannot be loaded
    # Models that are not here, or a causal LM given as the reward model, fail now: before the heavy imports.
    # max_new_tokens and at least one prompt token must fit the policy's context window.
    require_context(cfg.policy_model, "ppo.policy_model", cfg.max_new_tokens + 1, "ppo.max_new_tokens",
                    cfg.trust_remote_code)
    require_reward_model(cfg.reward_model, "ppo.reward_model", cfg.trust_remote_code)
    from accelerate import Accelerator
    from transformers import set_seed

    from rlhf.ppo.trainer import PPOTrainer

    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision="bf16" if cfg.bf16 else "no")
    set_seed(cfg.seed)
    loading = {"dtype": cfg.dtype, "trust_remote_code": cfg.trust_remote_code}
    tokenizer = load_tokenizer(cfg.policy_model, "ppo.policy_model", cfg.trust_remote_code)
    tokenizer.padding_side = "left"  # generation continues from the right end of every prompt
    reward_tokenizer = load_tokenizer(cfg.reward_model, "ppo.reward_model", cfg.trust_remote_code)
    reward_tokenizer.padding_side = "right"
    if cfg.value_model == "reward" and tokenizer.get_vocab() != reward_tokenizer.get_vocab():
        raise ConfigError("ppo.value_model: 'reward' needs the reward model to share the policy's tokenizer; "
                          "use 'policy_head'")

    policy = load_causal_lm(cfg.policy_model, tokenizer, "ppo.policy_model", **loading)
    reference = None if cfg.lora.enabled else reference_model(policy)
    if cfg.lora.enabled:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(cfg.lora))
    reward_model = load_reward_model(cfg.reward_model, reward_tokenizer, "ppo.reward_model",
                                     **loading).requires_grad_(False)
    critic = _critic(cfg, reward_tokenizer, loading) if cfg.value_model == "reward" else None
    checkpoints = checkpoint_dir("ppo", cfg, prompts_fingerprint, cfg.policy_model, cfg.reward_model)

    with tracking.stage_run("ppo", flatten(cfg, "ppo"), checkpoints):
        tracking.log_dataset(prompts, "prompts", cfg.prompts, prompts_fingerprint, context="training")
        tracking.log_dataset(eval_prompts, "eval_prompts", cfg.eval_prompts, eval_fingerprint, context="evaluation")
        trainer = PPOTrainer(cfg, policy, reference, critic, reward_model, tokenizer, reward_tokenizer,
                             prompts["prompt"], checkpoints, accelerator)

        def on_step(step: int, metrics: dict[str, float], trainer: PPOTrainer) -> None:
            if step % cfg.logging_steps == 0:
                tracking.log_metrics(metrics, step=step)
            if step % cfg.sample_steps == 0 and accelerator.is_main_process:
                queries, responses, scores = trainer.last_samples
                rows = list(zip(queries, responses, scores))[:8]
                if not progress_as_lines():  # a local pipeline run's console keeps to progress
                    for query, response, value in rows[:3]:
                        print(f"[step {step}] {value:+.2f} {query[-60:]!r} -> {response!r}")
                tracking.log_table({"query": [r[0] for r in rows], "response": [r[1] for r in rows],
                                    "score": [r[2] for r in rows]}, f"samples/step_{step:05d}.json")

        history = trainer.train(on_step)
        # The final step's metrics, less the timings: they differ run to run and would churn dvc.lock for nothing
        # (they stay in MLflow, step by step).
        timings = ("step", "time/rollout", "time/update", "tokens_per_second")
        metrics = {key: value for key, value in history[-1].items() if key not in timings} if history else {}
        if accelerator.is_main_process:
            metrics |= _compare_on_held_out(cfg, trainer, tokenizer, reward_tokenizer, eval_prompts["prompt"],
                                            accelerator.device)
            tracking.log_metrics(metrics)
        accelerator.wait_for_everyone()
        policy = trainer.policy.merge_and_unload() if cfg.lora.enabled else trainer.policy
        datasets = {"prompts": prompts_fingerprint, "eval_prompts": eval_fingerprint}
        # The training curves travel with the policy: the evaluation report plots them.
        save_model(policy, tokenizer, cfg.output_dir, tracking.provenance("ppo", config_hash(cfg), datasets),
                   extra_json={HISTORY_FILE: history})
    finish(checkpoints)
    curves = (("scores", "objective/scores"), ("kl", "objective/kl"))
    return StageResult(metrics, history, cfg.output_dir, curves)


def _critic(cfg: PPOConfig, reward_tokenizer, loading: dict) -> Critic:
    """The critic, from the reward model; with LoRA it trains adapters on the backbone and its head in full, like
    the policy, so memory stays near one frozen copy of each model."""
    classifier = load_reward_model(cfg.reward_model, reward_tokenizer, "ppo.reward_model", **loading)
    if cfg.lora.enabled:
        from peft import get_peft_model

        classifier = get_peft_model(classifier, lora_config(cfg.lora, "SEQ_CLS")).base_model.model
    return Critic(classifier)


def _compare_on_held_out(cfg, trainer: PPOTrainer, tokenizer, reward_tokenizer, prompts, device) -> dict[str, float]:
    """The policy against the SFT model on held-out prompts, sampled with the same seed (`eval/…` metrics)."""
    annotator = get_annotator(cfg.gold_annotator)
    policy = trainer.policy.eval()

    def answers(model) -> list[dict]:
        return sample_and_score(model, trainer.reference_logits, tokenizer, trainer.reward_model, reward_tokenizer,
                                prompts, trainer.cfg, cfg.eval_batch_size, annotator, device)

    policy_rows = answers(policy)
    if trainer.reference is not None:
        sft_rows = answers(trainer.reference)
    else:
        with policy.disable_adapter():
            sft_rows = answers(policy)
    return {f"eval/{key}": value for key, value in compare(policy_rows, sft_rows).items()}
