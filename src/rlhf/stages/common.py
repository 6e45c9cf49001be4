"""What the trainer-based stages share: training arguments, checkpoint/resume, saving, and the loss history."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from rlhf import tracking
from rlhf.config import LoraParams, TrainingParams, config_hash
from rlhf.console import progress_as_lines, trainer_progress
from rlhf.storage import (
    atomic_dir,
    checkpoints_root,
    fetch,
    mirror_checkpoint,
    remove_checkpoints,
    restore_checkpoint,
    write_json,
)


@dataclass
class StageResult:
    """What every stage returns: its headline metrics, its per-step history (for plots) and where the model is."""

    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    output_dir: str | None = None
    # The curves to plot from `history`: (file name, metric key); DVC wants one series per file.
    curves: tuple[tuple[str, str], ...] = (("train", "loss"), ("eval", "eval_loss"))


def checkpoint_dir(stage: str, cfg: BaseModel, data_fingerprint: str, *models: str | None) -> Path:
    """Checkpoints live outside the stage output, keyed by the config, the data and the input models' files, so only
    an identical run resumes (a retrained base model must not resume from checkpoints built on the old one)."""
    key = "-".join([config_hash(cfg), data_fingerprint[:8], *(folder_signature(model) for model in models)])
    return checkpoints_root() / f"{stage}-{key}"


def folder_signature(path: str | None) -> str:
    """A cheap signature of a model folder, local or s3:// (file names and sizes, plus the provenance file that names
    the run which trained it, or else mtimes); hub ids sign as themselves.

    A pipeline output's signature survives a fresh download (on another machine, a rescheduled pod), whose mtimes
    differ, so a resumed run there finds its checkpoints."""
    digest = hashlib.sha256(str(path).encode())
    folder = Path(fetch(path)) if path else None
    if folder is not None and folder.is_dir():
        provenance = folder / tracking.PROVENANCE_FILE
        for file in sorted(folder.iterdir()):
            stat = file.stat()
            stamp = "" if provenance.is_file() else f":{stat.st_mtime_ns}"
            digest.update(f"{file.name}:{stat.st_size}{stamp}".encode())
        if provenance.is_file():
            digest.update(provenance.read_bytes())
    return digest.hexdigest()[:8]


def lora_config(lora: LoraParams, task_type: str = "CAUSAL_LM"):
    """PEFT's LoraConfig for a stage's `lora` section (None when off). For a reward model (SEQ_CLS) PEFT also trains
    the new scoring head in full."""
    if not lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )


def training_arguments(cfg: TrainingParams, checkpoints: Path, stage: str) -> dict[str, Any]:
    """Keyword arguments shared by TRL's SFTConfig and RewardConfig (both TrainingArguments)."""
    import torch

    return dict(
        output_dir=str(checkpoints),
        run_name=stage,
        seed=cfg.seed,
        data_seed=cfg.seed,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler,
        max_grad_norm=cfg.max_grad_norm,
        max_length=cfg.max_length,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=cfg.eval_steps or cfg.save_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=1,
        activation_checkpointing=cfg.gradient_checkpointing,
        # Pinned memory only helps copies to a GPU (torch warns on every dataloader without one).
        dataloader_pin_memory=torch.cuda.is_available(),
        bf16=cfg.bf16,
        # transformers allows bf16 autocast without a GPU only when told to use the CPU (fast where the CPU has
        # bf16 instructions).
        use_cpu=cfg.bf16 and not torch.cuda.is_available(),
        # The per-step metrics go to the stage's active MLflow run through transformers' MLflow callback.
        report_to=["mlflow"],
        # In a local pipeline run the console shows progress records instead of bars (rlhf.console).
        disable_tqdm=progress_as_lines(),
    )


def _trainer_state_readable(folder: Path) -> bool:
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def _last_complete_checkpoint(checkpoints: Path) -> Path | None:
    # trainer_state.json is the last file a checkpoint gets, written in place: a kill during saving leaves a folder
    # without it, or with it empty or cut short. Such a checkpoint is skipped.
    complete = [
        folder
        for folder in (checkpoints.glob("checkpoint-*") if checkpoints.is_dir() else [])
        if folder.name.removeprefix("checkpoint-").isdigit() and _trainer_state_readable(folder)
    ]
    return max(complete, key=lambda folder: int(folder.name.removeprefix("checkpoint-")), default=None)


def _mirror_on_save():
    from transformers import TrainerCallback

    class MirrorCheckpoints(TrainerCallback):
        """Each checkpoint the trainer completes goes to RLHF_CHECKPOINT_DIR, when that is s3://."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                mirror_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return MirrorCheckpoints()


def _log_the_last_step():
    from transformers import TrainerCallback

    class LogTheLastStep(TrainerCallback):
        """The last step's loss is logged too (transformers logs every `logging_steps` only): the log then covers
        every step, and the training loss is computed from it (`train_loss`)."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True

    return LogTheLastStep()


def train_loss(log_history: list[dict[str, Any]]) -> float:
    """The mean training loss over every step, from the logged losses (each the mean of its logging window).

    Not transformers' `train_loss`: that averages the steps of the last `train()` call only, so a resumed run would
    report a different number for the same training. The log is restored with a checkpoint; this is the same."""
    total, previous = 0.0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    return total / previous if previous else float("nan")


def _remove_if_unused(checkpoints: Path) -> None:
    if checkpoints.is_dir() and not any(checkpoints.glob("checkpoint-*")):
        shutil.rmtree(checkpoints, ignore_errors=True)


def train_resuming(trainer, checkpoints: Path) -> dict[str, float]:
    """Trains, resuming from the newest complete checkpoint in `checkpoints` (or in its s3:// mirror) if an earlier
    attempt was interrupted. A failure before the first checkpoint leaves no empty checkpoints folder behind."""
    restore_checkpoint(checkpoints)
    trainer.add_callback(_mirror_on_save())
    trainer.add_callback(_log_the_last_step())
    if progress_as_lines():
        from transformers.trainer_callback import PrinterCallback

        # Without bars transformers prints every log entry; the progress records replace them.
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(trainer_progress(trainer.args.run_name))
    last = _last_complete_checkpoint(checkpoints)
    if last:
        print(f"Resuming from checkpoint {last}")
    try:
        metrics = trainer.train(resume_from_checkpoint=str(last) if last else None).metrics
    except BaseException:
        if tracking.is_main_process():
            _remove_if_unused(checkpoints)
        raise
    return metrics | {"train_loss": train_loss(trainer.state.log_history)}


def final_evaluation(trainer) -> dict[str, float]:
    """The held-out metrics of the trained model. The trainer evaluates once more at its last step (step-based
    evaluation), so those are taken from its log rather than computed again (minutes, on a real model)."""
    last = trainer.state.global_step
    logged = [entry for entry in trainer.state.log_history if entry.get("step") == last and "eval_loss" in entry]
    return dict(logged[-1]) if logged else trainer.evaluate()


def report_dropped_examples(trainer, rows: int) -> dict[str, float]:
    """TRL silently drops examples (e.g. fully truncated ones); say how many, so a too-small max_length shows."""
    used = len(trainer.train_dataset)
    if used < 0.9 * rows:
        print(f"warning: the trainer kept {used} of {rows} training examples; raise max_length?", file=sys.stderr)
    return {"train_examples": float(rows), "train_examples_used": float(used)}


def save_model(
    model, tokenizer, output_dir: str, provenance: dict[str, Any], extra_json: dict[str, Any] | None = None
) -> None:
    """Saves model and tokenizer with `save_pretrained`, its provenance and any extra JSON files, into a temporary
    folder renamed into place (or uploaded, for an s3:// output) and logged to the stage's MLflow run."""
    if not tracking.is_main_process():
        return
    with atomic_dir(output_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for name, payload in {tracking.PROVENANCE_FILE: provenance, **(extra_json or {})}.items():
            write_json(staging / name, payload)
        tracking.log_artifacts(staging, "model")


def finish(checkpoints: Path) -> None:
    """A finished stage no longer needs its checkpoints."""
    if tracking.is_main_process():
        remove_checkpoints(checkpoints)


def loss_history(trainer) -> list[dict[str, float]]:
    """One row per logged step with train and eval loss, the form DVC plots take."""
    rows: dict[int, dict[str, float]] = {}
    for entry in trainer.state.log_history:
        for key in ("loss", "eval_loss"):
            if key in entry and "step" in entry:
                rows.setdefault(entry["step"], {"step": entry["step"]})[key] = round(float(entry[key]), 6)
    return [rows[step] for step in sorted(rows)]


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
