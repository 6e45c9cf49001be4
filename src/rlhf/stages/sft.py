"""Supervised fine-tuning: the policy learns to imitate the reference answers (TRL's SFTTrainer).

The loss covers completion tokens only (or assistant turns, for conversational data), and always the token that
ends the answer (TRL appends EOS to plain completions; a chat template closes the assistant turn), so the model
learns to stop. A chat model sees the data through its own chat template (`rlhf.chat`). With `lora.enabled` the
adapters are merged into the saved model, so the next stages load it like any other.
"""

from __future__ import annotations

from rlhf import tracking
from rlhf.chat import sft_rows
from rlhf.config import SFTConfig, config_hash, flatten
from rlhf.data.formats import load_dataset, split
from rlhf.modeling import load_causal_lm, load_tokenizer, require_context
from rlhf.stages.common import (
    StageResult,
    checkpoint_dir,
    final_evaluation,
    finish,
    lora_config,
    loss_history,
    perplexity,
    report_dropped_examples,
    save_model,
    train_resuming,
    training_arguments,
)


def run(cfg: SFTConfig) -> StageResult:
    dataset, fingerprint = load_dataset(cfg.dataset, "sft")
    train, held_out = split(dataset, cfg.eval_fraction, cfg.seed, cfg.dataset)
    # A model that is not here, or too short a context for max_length, fails now: not after the imports.
    require_context(cfg.model, "sft.model", cfg.max_length, "sft.max_length", cfg.trust_remote_code)
    from transformers import set_seed
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, "sft.model", cfg.trust_remote_code)
    model = load_causal_lm(cfg.model, tokenizer, "sft.model", cfg.dtype, cfg.trust_remote_code)
    checkpoints = checkpoint_dir("sft", cfg, fingerprint, cfg.model)
    (train_rows, assistant_masks), (held_out_rows, _) = sft_rows(train, tokenizer), sft_rows(held_out, tokenizer)

    with tracking.stage_run("sft", flatten(cfg, "sft"), checkpoints):
        tracking.log_dataset(train, "sft", cfg.dataset, fingerprint, context="training")
        tracking.log_dataset(held_out, "sft", cfg.dataset, fingerprint, context="evaluation")
        args = TRLSFTConfig(
            **training_arguments(cfg, checkpoints, "sft"),
            completion_only_loss=None if assistant_masks else True,
            assistant_only_loss=assistant_masks,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_rows,
            eval_dataset=held_out_rows,
            processing_class=tokenizer,
            peft_config=lora_config(cfg.lora),
        )
        train_metrics = train_resuming(trainer, checkpoints)
        eval_metrics = final_evaluation(trainer)
        metrics = {
            "train_loss": train_metrics["train_loss"],
            "eval_loss": eval_metrics["eval_loss"],
            "eval_perplexity": perplexity(eval_metrics["eval_loss"]),
            "eval_mean_token_accuracy": eval_metrics.get("eval_mean_token_accuracy", float("nan")),
        }
        metrics |= report_dropped_examples(trainer, len(train_rows))
        tracking.log_metrics(metrics)
        model = trainer.model.merge_and_unload() if cfg.lora.enabled else trainer.model
        save_model(model, tokenizer, cfg.output_dir, tracking.provenance("sft", config_hash(cfg), {"sft": fingerprint}))
    finish(checkpoints)
    return StageResult(metrics, loss_history(trainer), cfg.output_dir)
