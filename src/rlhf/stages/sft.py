"""Supervised fine-tuning: the policy learns to imitate the reference answers (TRL's SFTTrainer).

The loss covers completion tokens only (or assistant turns, for conversational data); TRL appends EOS to every
completion so the model learns to stop. With `lora.enabled` the adapters are merged into the saved model, so the next
stages load it like any other.
"""

from __future__ import annotations

from rlhf import tracking
from rlhf.config import SFTConfig, config_hash, flatten
from rlhf.data.formats import load_dataset, split
from rlhf.modeling import load_causal_lm, load_tokenizer
from rlhf.stages.common import (
    StageResult,
    checkpoint_dir,
    finish,
    loss_history,
    perplexity,
    save_model,
    report_dropped_examples,
    train_resuming,
    training_arguments,
)


def lora_config(cfg: SFTConfig):
    if not cfg.lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )


def run(cfg: SFTConfig) -> StageResult:
    from transformers import set_seed
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    set_seed(cfg.seed)
    dataset, fingerprint = load_dataset(cfg.dataset, "sft")
    train, held_out = split(dataset, cfg.eval_fraction, cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    checkpoints = checkpoint_dir("sft", cfg, fingerprint, cfg.model)
    conversational = "messages" in dataset.column_names

    with tracking.stage_run("sft", flatten(cfg, "sft")):
        tracking.log_dataset(train, "sft", cfg.dataset, fingerprint, context="training")
        tracking.log_dataset(held_out, "sft", cfg.dataset, fingerprint, context="evaluation")
        args = TRLSFTConfig(
            **training_arguments(cfg, checkpoints, "sft"),
            completion_only_loss=None if conversational else True,
            assistant_only_loss=conversational,
        )
        trainer = SFTTrainer(
            model=load_causal_lm(cfg.model, tokenizer),
            args=args,
            train_dataset=train,
            eval_dataset=held_out,
            processing_class=tokenizer,
            peft_config=lora_config(cfg),
        )
        train_metrics = train_resuming(trainer, checkpoints)
        eval_metrics = trainer.evaluate()
        metrics = {
            "train_loss": train_metrics["train_loss"],
            "eval_loss": eval_metrics["eval_loss"],
            "eval_perplexity": perplexity(eval_metrics["eval_loss"]),
            "eval_mean_token_accuracy": eval_metrics.get("eval_mean_token_accuracy", float("nan")),
        }
        metrics |= report_dropped_examples(trainer, len(train))
        tracking.log_metrics(metrics)
        model = trainer.model.merge_and_unload() if cfg.lora.enabled else trainer.model
        save_model(model, tokenizer, cfg.output_dir, tracking.provenance("sft", config_hash(cfg), {"sft": fingerprint}))
    finish(checkpoints)
    return StageResult(metrics, loss_history(trainer), cfg.output_dir)
