"""Reward modelling: a scalar scorer trained on preference pairs (TRL's RewardTrainer, Bradley-Terry loss).

The model is `AutoModelForSequenceClassification` with one label, initialised from the SFT model by default (it
already knows the domain) or from `reward.base_model`: a causal LM's backbone (GPT-2, Llama, Qwen...) with a new
scoring head, or an existing reward model to train further. A chat model sees the pairs through its own chat
template (`rlhf.chat`); with `lora.enabled` the backbone trains adapters and the head trains in full. Held-out
pairwise accuracy (how often the chosen answer scores higher) and the mean margin are the metrics the gate after
this stage reads.
"""

from __future__ import annotations

from rlhf import tracking
from rlhf.chat import preference_rows
from rlhf.config import RewardConfig, config_hash, flatten
from rlhf.data.formats import load_dataset, split
from rlhf.modeling import load_reward_model, load_tokenizer, require_context
from rlhf.stages.common import (
    StageResult,
    checkpoint_dir,
    final_evaluation,
    finish,
    lora_config,
    loss_history,
    report_dropped_examples,
    save_model,
    train_resuming,
    training_arguments,
)


def run(cfg: RewardConfig) -> StageResult:
    dataset, fingerprint = load_dataset(cfg.dataset, "preference")
    train, held_out = split(dataset, cfg.eval_fraction, cfg.seed, cfg.dataset)
    # A model that is not here, or too short a context for max_length, fails now: not after the imports.
    require_context(cfg.base_model, "reward.base_model", cfg.max_length, "reward.max_length", cfg.trust_remote_code)
    from transformers import set_seed
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    set_seed(cfg.seed)  # before loading: a new scoring head is initialised randomly
    tokenizer = load_tokenizer(cfg.base_model, "reward.base_model", cfg.trust_remote_code)
    model = load_reward_model(
        cfg.base_model, tokenizer, "reward.base_model", cfg.dtype, cfg.trust_remote_code, new_head=True
    )
    checkpoints = checkpoint_dir("reward", cfg, fingerprint, cfg.base_model)

    with tracking.stage_run("reward", flatten(cfg, "reward"), checkpoints):
        tracking.log_dataset(train, "preferences", cfg.dataset, fingerprint, context="training")
        tracking.log_dataset(held_out, "preferences", cfg.dataset, fingerprint, context="evaluation")
        args = TRLRewardConfig(
            **training_arguments(cfg, checkpoints, "reward"),
            center_rewards_coefficient=cfg.center_rewards_coefficient,
        )
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=preference_rows(train, tokenizer),
            eval_dataset=preference_rows(held_out, tokenizer),
            processing_class=tokenizer,
            peft_config=lora_config(cfg.lora, "SEQ_CLS"),
        )
        train_metrics = train_resuming(trainer, checkpoints)
        evaluation = final_evaluation(trainer)
        metrics = {
            "train_loss": train_metrics["train_loss"],
            "eval_loss": evaluation["eval_loss"],
            "eval_accuracy": evaluation["eval_accuracy"],
            "eval_margin": evaluation["eval_margin"],
            # The gate's confidence interval needs the sample size: the pairs judged, after TRL dropped the ones
            # longer than max_length.
            "eval_pairs": float(len(trainer.eval_dataset)),
        }
        metrics |= report_dropped_examples(trainer, len(train))
        tracking.log_metrics(metrics)
        model = trainer.model.merge_and_unload() if cfg.lora.enabled else trainer.model
        provenance = tracking.provenance("reward", config_hash(cfg), {"preferences": fingerprint})
        # The run whose model it started from (none for a model from elsewhere): the registry names the SFT version
        # as its upstream only if it started from that one (the demo's starts from the pretrained model).
        provenance["base_run_id"] = tracking.read_provenance(cfg.base_model).get("mlflow_run_id")
        save_model(model, tokenizer, cfg.output_dir, provenance)
    finish(checkpoints)
    return StageResult(metrics, loss_history(trainer), cfg.output_dir)
