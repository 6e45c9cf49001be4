"""Domain pretraining (the seed tutorial's stage 1): next-token prediction on the corpus.

With no `base_model`, trains a byte-level BPE tokenizer on the corpus and a small GPT-2-style model from scratch;
with `base_model`, continues pretraining it; with `enabled: false`, saves the base model unchanged as the output, so
the later stages always read one folder. The corpus is packed into `max_length` blocks (TRL's "wrapped" packing,
as in classic causal-LM pretraining), or with `packing: false` kept one document per sequence: blocks cut a
short document from its own beginning, so a model cannot learn to copy from it what the cut removed.
"""

from __future__ import annotations

from rlhf import tracking
from rlhf.config import PretrainConfig, config_hash, flatten
from rlhf.data.formats import load_dataset, split
from rlhf.modeling import (
    build_causal_lm,
    count_parameters,
    load_causal_lm,
    load_tokenizer,
    require_context,
    train_tokenizer,
)
from rlhf.stages.common import (
    StageResult,
    checkpoint_dir,
    final_evaluation,
    finish,
    loss_history,
    perplexity,
    save_model,
    train_resuming,
    training_arguments,
)


def run(cfg: PretrainConfig) -> StageResult:
    if cfg.base_model:
        # A model that is not here, or too short a context for max_length, fails now: not after the imports.
        require_context(
            cfg.base_model, "pretrain.base_model", cfg.max_length, "pretrain.max_length", cfg.trust_remote_code
        )
    from transformers import set_seed
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    set_seed(cfg.seed)
    if cfg.base_model:
        tokenizer = load_tokenizer(cfg.base_model, "pretrain.base_model", cfg.trust_remote_code)
        model = load_causal_lm(cfg.base_model, tokenizer, "pretrain.base_model", cfg.dtype, cfg.trust_remote_code)
    if not cfg.enabled:
        with tracking.stage_run("pretrain", flatten(cfg, "pretrain")):
            tracking.log_metrics({"model_parameters": count_parameters(model), "vocab_size": len(tokenizer)})
            save_model(model, tokenizer, cfg.output_dir, tracking.provenance("pretrain", config_hash(cfg), {}))
        return StageResult({"skipped": 1.0, "parameters": float(count_parameters(model))}, [], cfg.output_dir)

    corpus, fingerprint = load_dataset(cfg.corpus, "text")
    train, held_out = split(corpus, cfg.eval_fraction, cfg.seed, cfg.corpus)
    checkpoints = checkpoint_dir("pretrain", cfg, fingerprint, cfg.base_model)

    with tracking.stage_run("pretrain", flatten(cfg, "pretrain"), checkpoints):
        tracking.log_dataset(train, "corpus", cfg.corpus, fingerprint, context="training")
        tracking.log_dataset(held_out, "corpus", cfg.corpus, fingerprint, context="evaluation")
        if not cfg.base_model:
            # Trained on the training split only, so the held-out perplexity is honest. Deterministic for a corpus.
            tokenizer = train_tokenizer(train["text"], cfg.tokenizer)
            model = build_causal_lm(tokenizer, cfg.architecture)
        tracking.log_metrics({"model_parameters": count_parameters(model), "vocab_size": len(tokenizer)})
        args = TRLSFTConfig(
            **training_arguments(cfg, checkpoints, "pretrain"),
            dataset_text_field="text",
            packing=cfg.packing,
            packing_strategy="wrapped",
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer
        )
        train_metrics = train_resuming(trainer, checkpoints)
        eval_loss = final_evaluation(trainer)["eval_loss"]
        metrics = {
            "train_loss": train_metrics["train_loss"],
            "eval_loss": eval_loss,
            "eval_perplexity": perplexity(eval_loss),
            "parameters": float(count_parameters(model)),
        }
        tracking.log_metrics(metrics)
        save_model(
            trainer.model,
            tokenizer,
            cfg.output_dir,
            tracking.provenance("pretrain", config_hash(cfg), {"corpus": fingerprint}),
        )
    finish(checkpoints)
    return StageResult(metrics, loss_history(trainer), cfg.output_dir)
