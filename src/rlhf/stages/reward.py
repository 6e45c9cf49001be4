"""Reward modelling: a scalar scorer trained on preference pairs (TRL's RewardTrainer, Bradley-Terry loss).

The model is `AutoModelForSequenceClassification` with one label, initialised from the SFT model by default (it
already knows the domain) or from `reward.base_model`. Held-out pairwise accuracy (how often the chosen answer scores
higher) and the mean margin are the metrics the gate after this stage reads.
"""

from __future__ import annotations

from rlhf import tracking
from rlhf.config import RewardConfig, config_hash, flatten
from rlhf.data.formats import load_dataset, split
from rlhf.modeling import load_reward_model, load_tokenizer
from rlhf.stages.common import (
    StageResult,
    checkpoint_dir,
    finish,
    loss_history,
    save_model,
    report_dropped_examples,
    train_resuming,
    training_arguments,
)


def run(cfg: RewardConfig) -> StageResult:
    from transformers import set_seed
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    set_seed(cfg.seed)
    dataset, fingerprint = load_dataset(cfg.dataset, "preference")
    train, held_out = split(dataset, cfg.eval_fraction, cfg.seed)
    tokenizer = load_tokenizer(cfg.base_model)
    checkpoints = checkpoint_dir("reward", cfg, fingerprint, cfg.base_model)

    with tracking.stage_run("reward", flatten(cfg, "reward")):
        tracking.log_dataset(train, "preferences", cfg.dataset, fingerprint, context="training")
        tracking.log_dataset(held_out, "preferences", cfg.dataset, fingerprint, context="evaluation")
        args = TRLRewardConfig(
            **training_arguments(cfg, checkpoints, "reward"),
            center_rewards_coefficient=cfg.center_rewards_coefficient,
        )
        trainer = RewardTrainer(
            model=load_reward_model(cfg.base_model, tokenizer),
            args=args,
            train_dataset=train,
            eval_dataset=held_out,
            processing_class=tokenizer,
        )
        train_metrics = train_resuming(trainer, checkpoints)
        evaluation = trainer.evaluate()
        metrics = {
            "train_loss": train_metrics["train_loss"],
            "eval_loss": evaluation["eval_loss"],
            "eval_accuracy": evaluation["eval_accuracy"],
            "eval_margin": evaluation["eval_margin"],
            "eval_pairs": float(len(held_out)),  # the reward gate's confidence interval needs the sample size
        }
        metrics |= report_dropped_examples(trainer, len(train))
        tracking.log_metrics(metrics)
        save_model(trainer.model, tokenizer, cfg.output_dir,
                   tracking.provenance("reward", config_hash(cfg), {"preferences": fingerprint}))
    finish(checkpoints)
    return StageResult(metrics, loss_history(trainer), cfg.output_dir)
