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
from rlhf.evaluation import compare, sample_and_score, summarize
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
    require_context(
        cfg.policy_model, "ppo.policy_model", cfg.max_new_tokens + 1, "ppo.max_new_tokens", cfg.trust_remote_code
    )
    require_reward_model(cfg.reward_model, "ppo.reward_model", cfg.trust_remote_code)
    from accelerate import Accelerator
    from transformers import set_seed

    from rlhf.ppo.trainer import PPOTrainer

    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision="bf16" if cfg.bf16 else "no"
    )
    set_seed(cfg.seed)
    loading = {"dtype": cfg.dtype, "trust_remote_code": cfg.trust_remote_code}
    tokenizer = load_tokenizer(cfg.policy_model, "ppo.policy_model", cfg.trust_remote_code)
    tokenizer.padding_side = "left"  # generation continues from the right end of every prompt
    reward_tokenizer = load_tokenizer(cfg.reward_model, "ppo.reward_model", cfg.trust_remote_code)
    reward_tokenizer.padding_side = "right"
    if cfg.value_model == "reward" and tokenizer.get_vocab() != reward_tokenizer.get_vocab():
        raise ConfigError(
            "ppo.value_model: 'reward' needs the reward model to share the policy's tokenizer; use 'policy_head'"
        )

    policy = load_causal_lm(cfg.policy_model, tokenizer, "ppo.policy_model", **loading)
    reference = None if cfg.lora.enabled else reference_model(policy)
    if cfg.lora.enabled:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(cfg.lora))
    reward_model = load_reward_model(cfg.reward_model, reward_tokenizer, "ppo.reward_model", **loading).requires_grad_(
        False
    )
    critic = _critic(cfg, reward_tokenizer, loading) if cfg.value_model == "reward" else None
    checkpoints = checkpoint_dir("ppo", cfg, prompts_fingerprint, cfg.policy_model, cfg.reward_model)

    with tracking.stage_run("ppo", flatten(cfg, "ppo"), checkpoints):
        tracking.log_dataset(prompts, "prompts", cfg.prompts, prompts_fingerprint, context="training")
        tracking.log_dataset(eval_prompts, "eval_prompts", cfg.eval_prompts, eval_fingerprint, context="evaluation")
        trainer = PPOTrainer(
            cfg,
            policy,
            reference,
            critic,
            reward_model,
            tokenizer,
            reward_tokenizer,
            prompts["prompt"],
            checkpoints,
            accelerator,
        )

        held_out = _HeldOut(cfg, trainer, tokenizer, reward_tokenizer, eval_prompts["prompt"], accelerator.device)

        def on_step(step: int, metrics: dict[str, float], trainer: PPOTrainer) -> None:
            if step % cfg.eval_steps == 0 and step < trainer.num_steps and accelerator.is_main_process:
                # Kept in the step's history row, so a resumed run keeps the points before its checkpoint.
                trainer.progress.history[-1] |= held_out.point(held_out.answers(trainer.policy))
                metrics = trainer.progress.history[-1]
            if step % cfg.logging_steps == 0:
                tracking.log_metrics({key: value for key, value in metrics.items() if key != "step"}, step=step)
            if step % cfg.sample_steps == 0 and accelerator.is_main_process:
                queries, responses, scores = trainer.last_samples
                rows = list(zip(queries, responses, scores))[:8]
                if not progress_as_lines():  # a local pipeline run's console keeps to progress
                    for query, response, value in rows[:3]:
                        print(f"[step {step}] {value:+.2f} {query[-60:]!r} -> {response!r}")
                tracking.log_table(
                    {"query": [r[0] for r in rows], "response": [r[1] for r in rows], "score": [r[2] for r in rows]},
                    f"samples/step_{step:05d}.json",
                )

        history = trainer.train(on_step)
        # The final step's metrics, less the timings: they differ run to run and would churn dvc.lock for nothing
        # (they stay in MLflow, step by step).
        timings = ("step", "time/rollout", "time/update", "tokens_per_second")
        metrics = {key: value for key, value in history[-1].items() if key not in timings} if history else {}
        if accelerator.is_main_process:
            metrics |= held_out.compare_with_sft(history)
            tracking.log_metrics(metrics)
        accelerator.wait_for_everyone()
        policy = trainer.policy.merge_and_unload() if cfg.lora.enabled else trainer.policy
        datasets = {"prompts": prompts_fingerprint, "eval_prompts": eval_fingerprint}
        # The training curves travel with the policy: the evaluation report plots them.
        save_model(
            policy,
            tokenizer,
            cfg.output_dir,
            tracking.provenance("ppo", config_hash(cfg), datasets),
            extra_json={HISTORY_FILE: history},
        )
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


class _HeldOut:
    """The held-out prompts, answered and scored by the reward model and the gold annotator under one sampling seed:
    every `eval_steps` during training (over-optimisation shows as gold falling while the proxy rises), and the
    final policy against the SFT model."""

    def __init__(self, cfg: PPOConfig, trainer: PPOTrainer, tokenizer, reward_tokenizer, prompts, device) -> None:
        self.cfg, self.trainer, self.prompts, self.device = cfg, trainer, prompts, device
        self.tokenizer, self.reward_tokenizer = tokenizer, reward_tokenizer
        self.annotator = get_annotator(cfg.gold_annotator)

    def answers(self, model) -> list[dict]:
        import torch

        training = model.training
        with torch.random.fork_rng(devices=[]):  # the training run's random stream stays as it was
            rows = sample_and_score(
                model.eval(),
                self.trainer.reference_logits,
                self.tokenizer,
                self.trainer.reward_model,
                self.reward_tokenizer,
                self.prompts,
                self.trainer.cfg,
                self.cfg.eval_batch_size,
                self.annotator,
                self.device,
            )
        model.train(training)
        return rows

    @staticmethod
    def point(rows: list[dict]) -> dict[str, float]:
        summary = summarize(rows)
        return {f"heldout/{key}": summary[key] for key in ("rm_score", "gold_score", "kl") if key in summary}

    def compare_with_sft(self, history: list[dict[str, float]]) -> dict[str, float]:
        """`eval/…` metrics; the SFT model's answers become the curve's point at step 0 and the policy's its last."""
        policy_rows = self.answers(self.trainer.policy)
        if self.trainer.reference is not None:
            sft_rows = self.answers(self.trainer.reference)
        else:
            with self.trainer.policy.disable_adapter():
                sft_rows = self.answers(self.trainer.policy)
        if history:
            history.insert(0, {"step": 0, **self.point(sft_rows)})
            history[-1] |= self.point(policy_rows)
            for row in (history[0], history[-1]):
                tracking.log_metrics({key: row[key] for key in row if key.startswith("heldout/")}, step=row["step"])
        return {f"eval/{key}": value for key, value in compare(policy_rows, sft_rows).items()}
