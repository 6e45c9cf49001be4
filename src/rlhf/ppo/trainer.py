"""The PPO training loop for language models: rollout, rewards, advantages, clipped updates, checkpoints.

Reads top to bottom like nanoGPT's loop. Four models: the policy (trained), the reference (frozen; the same weights
with LoRA adapters disabled when the policy uses LoRA), the critic (trained; from the reward model or a value head
on the policy) and the reward model (frozen). Runs under `accelerate launch` unchanged: each process samples its
own prompts, gradients are averaged by DDP, and statistics are averaged across processes.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from trl.trainer.utils import disable_dropout_in_model, entropy_from_logits

from rlhf.chat import Prompt, format_prompt
from rlhf.config import PPOConfig
from rlhf.console import progress_as_lines, report_progress
from rlhf.modeling import stop_token_ids
from rlhf.ppo import core
from rlhf.ppo.models import PolicyAndValue
from rlhf.sampling import Rollout, rollout, sequence_logprobs, with_model_sampling
from rlhf.storage import mirror_checkpoint, restore_checkpoint

# TRL's PPO metric names, so users of TRL (and of the seed tutorial) recognise them.
STEP_METRICS = (
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "objective/scores",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "policy/entropy_avg",
    "val/ratio",
    "val/ratio_var",
    "val/num_eos_tokens",
    "lr",
    "episode",
)


class Progress:
    """Where the run is and the metrics so far; saved with every checkpoint, so a resumed run continues with the
    next step and still reports the whole run's curves."""

    def __init__(self) -> None:
        self.step = 0
        self.episode = 0
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict:
        return {"step": self.step, "episode": self.episode, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.episode, self.history = int(state["step"]), int(state["episode"]), list(state["history"])


class PPOTrainer:
    def __init__(
        self,
        cfg: PPOConfig,
        policy,
        reference,
        critic,
        reward_model,
        tokenizer,
        reward_tokenizer,
        prompts: list[Prompt],
        checkpoint_dir: Path,
        accelerator,
    ) -> None:
        from transformers import get_scheduler

        cfg = with_model_sampling(cfg, policy)  # null temperature/top_k/top_p: the policy's generation_config
        self.cfg = cfg
        self.accelerator = accelerator
        self.tokenizer = tokenizer
        self.reward_tokenizer = reward_tokenizer
        self.prompts = prompts  # as in the data (text or messages): the reward model renders them its own way
        self.queries = [format_prompt(prompt, tokenizer) for prompt in prompts]  # what the policy continues
        self.stop_ids = stop_token_ids(policy, tokenizer)
        self.checkpoint_dir = checkpoint_dir
        world = accelerator.num_processes
        self.num_steps = max(1, cfg.total_episodes // (cfg.rollout_batch_size * world))

        if cfg.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        model = PolicyAndValue(policy, critic)
        disable_dropout_in_model(model)  # rollout (eval mode) and update (train mode) must give the same log-probs
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, eps=1e-5
        )
        updates_per_step = cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
        # Stepped once per optimiser step by hand (not prepared), so its length does not depend on the process count.
        self.scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer,
            num_warmup_steps=int(cfg.warmup_ratio * self.num_steps * updates_per_step),
            num_training_steps=self.num_steps * updates_per_step,
        )
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        device = accelerator.device
        self.reference = reference.to(device).eval() if reference is not None else None
        self.reward_model = reward_model.to(device).eval()
        self.kl_controller = core.KLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.progress = Progress()
        for stateful in (self.scheduler, self.kl_controller, self.progress):
            accelerator.register_for_checkpointing(stateful)

    # -- helpers --------------------------------------------------------------------------------------------------

    @property
    def policy(self):
        return self.accelerator.unwrap_model(self.model).policy

    def _prompt_batch(self, step: int) -> list[int]:
        """This process's prompt indices for `step`: a seeded permutation per pass over the data, so a resumed run
        draws exactly the prompts the uninterrupted run would have."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_step = self.cfg.rollout_batch_size * world
        start = step * per_step
        order: list[int] = []
        epoch = start // len(self.prompts)
        while len(order) < (start % len(self.prompts)) + per_step:
            generator = torch.Generator().manual_seed(self.cfg.seed + epoch)
            order.extend(torch.randperm(len(self.prompts), generator=generator).tolist())
            epoch += 1
        offset = start % len(self.prompts)
        return order[offset : offset + per_step][rank::world]

    def reference_logits(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        if self.reference is not None:
            return self.reference(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        with self.policy.disable_adapter():  # LoRA: the reference is the same network with its adapters off
            return self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits

    def _mean(self, value: torch.Tensor) -> float:
        return self.accelerator.reduce(value.detach().float().reshape(1), reduction="mean").item()

    # -- one PPO step ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, indices: list[int]) -> Rollout:
        """Answers, log-probs, values and scores for these prompts; scores carry the missing-EOS penalty."""
        cfg = self.cfg
        self.model.eval()
        batch = rollout(
            self.policy,
            self.model,
            self.reference_logits,
            self.tokenizer,
            [self.queries[i] for i in indices],
            [self.prompts[i] for i in indices],
            self.reward_model,
            self.reward_tokenizer,
            cfg,
            self.accelerator.device,
            self.stop_ids,
        )
        if cfg.missing_eos_penalty is None:
            return batch
        missing_eos = (~batch.samples.ends_with_eos).float()
        return dataclasses.replace(batch, scores=batch.scores - cfg.missing_eos_penalty * missing_eos)

    def step(self, indices: list[int]) -> dict[str, float]:
        cfg, accelerator = self.cfg, self.accelerator
        started = time.perf_counter()
        batch = self.rollout(indices)
        rollout_seconds = time.perf_counter() - started
        mask, samples = batch.mask, batch.samples

        kl = core.kl_per_token(batch.logprobs, batch.ref_logprobs, cfg.kl_estimator) * mask
        rewards, non_score = core.token_rewards(batch.scores, kl, self.kl_controller.value, mask)
        if cfg.whiten_rewards:
            rewards = core.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = core.gae(rewards, batch.values, mask, cfg.gamma, cfg.lam)
        advantages = core.masked_whiten(advantages, mask)

        started = time.perf_counter()
        self.model.train()
        stats = defaultdict(list)
        micro = cfg.mini_batch_size // cfg.gradient_accumulation_steps
        input_ids, attention_mask, position_ids = batch.input_ids, batch.attention_mask, batch.position_ids
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(indices))
            for start in range(0, len(indices), cfg.mini_batch_size):
                for micro_start in range(start, start + cfg.mini_batch_size, micro):
                    index = order[micro_start : micro_start + micro]
                    with accelerator.accumulate(self.model), accelerator.autocast():
                        logits, values = self.model(input_ids[index], attention_mask[index], position_ids[index])
                        logits, logprobs = sequence_logprobs(
                            logits, batch.context, samples.responses[index], cfg.temperature
                        )
                        values = values[:, batch.context - 1 : -1].float()
                        m = mask[index]
                        policy = core.policy_loss(
                            logprobs.float(), batch.logprobs[index], advantages[index], m, cfg.cliprange
                        )
                        value_loss, value_clipfrac = core.value_loss(
                            values, batch.values[index], returns[index], m, cfg.cliprange_value
                        )
                        accelerator.backward(policy.loss + cfg.vf_coef * value_loss)
                        if accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                        self.optimizer.step()  # a no-op until the last micro-batch of an accumulation
                        self.optimizer.zero_grad()
                        if accelerator.sync_gradients:
                            self.scheduler.step()
                    with torch.no_grad():
                        entropy = core.masked_mean(entropy_from_logits(logits.float()), m)
                    for key, value in (
                        ("policy/approxkl_avg", policy.approxkl),
                        ("policy/clipfrac_avg", policy.clipfrac),
                        ("loss/policy_avg", policy.loss),
                        ("loss/value_avg", value_loss),
                        ("val/clipfrac_avg", value_clipfrac),
                        ("policy/entropy_avg", entropy),
                        ("val/ratio", policy.ratio),
                    ):
                        stats[key].append(value.detach().float())
        update_seconds = time.perf_counter() - started

        mean_kl = self._mean(kl.sum(1).mean())
        self.kl_controller.update(mean_kl, cfg.rollout_batch_size * accelerator.num_processes)
        self.progress.step += 1
        self.progress.episode += cfg.rollout_batch_size * accelerator.num_processes
        ratios = torch.stack(stats.pop("val/ratio"))
        tokens = self._mean(mask.sum() + samples.query_mask.sum()) * accelerator.num_processes
        metrics = {
            "objective/kl": mean_kl,
            "objective/entropy": self._mean((-batch.logprobs).sum(1).mean()),
            "objective/non_score_reward": self._mean(non_score.sum(1).mean()),
            "objective/rlhf_reward": self._mean((batch.scores + non_score.sum(1)).mean()),
            "objective/scores": self._mean(batch.scores.mean()),
            "val/ratio": self._mean(ratios.mean()),
            "val/ratio_var": self._mean(ratios.var() if len(ratios) > 1 else torch.zeros(())),
            "val/num_eos_tokens": self._mean(samples.ends_with_eos.float().sum()) * accelerator.num_processes,
            "lr": self.scheduler.get_last_lr()[0],
            "episode": float(self.progress.episode),
            "kl_coef": self.kl_controller.value,
            "time/rollout": rollout_seconds,
            "time/update": update_seconds,
            "tokens_per_second": tokens / (rollout_seconds + update_seconds),
        }
        metrics |= {key: self._mean(torch.stack(values).mean()) for key, values in stats.items()}
        self.last_samples = ([self.queries[i] for i in indices], samples.texts, batch.scores.tolist())
        return metrics

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        folder = self.checkpoint_dir / f"step-{self.progress.step:06d}"
        # Pickled, not safetensors: the policy's tied embeddings would be dropped from the file with a warning.
        self.accelerator.save_state(str(folder), safe_serialization=False)
        if self.accelerator.is_main_process:
            (folder / "COMPLETE").touch()  # written last: a folder without it was interrupted mid-save
            for older in self._checkpoints()[:-1]:
                import shutil

                shutil.rmtree(older, ignore_errors=True)
            mirror_checkpoint(folder)
        self.accelerator.wait_for_everyone()

    def _checkpoints(self) -> list[Path]:
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoint_dir.glob("step-*") if (p / "COMPLETE").exists())

    def resume(self) -> bool:
        restore_checkpoint(self.checkpoint_dir)
        checkpoints = self._checkpoints()
        if not checkpoints:
            return False
        self.accelerator.load_state(str(checkpoints[-1]))
        self.accelerator.print(f"Resuming from checkpoint {checkpoints[-1]} (step {self.progress.step})")
        return True

    # -- the loop -------------------------------------------------------------------------------------------------

    def train(self, on_step: Callable[[int, dict[str, float], PPOTrainer], None]) -> list[dict[str, float]]:
        from tqdm.auto import tqdm

        self.resume()
        # In a local pipeline run the console shows progress records instead of the bar (rlhf.console).
        bar = tqdm(
            total=self.num_steps,
            initial=self.progress.step,
            desc="ppo",
            disable=not self.accelerator.is_main_process or progress_as_lines(),
        )
        while self.progress.step < self.num_steps:
            metrics = self.step(self._prompt_batch(self.progress.step))
            self.progress.history.append({"step": self.progress.step, **metrics})
            on_step(self.progress.step, metrics, self)
            bar.update(1)
            bar.set_postfix(score=f"{metrics['objective/scores']:.2f}", kl=f"{metrics['objective/kl']:.2f}")
            if progress_as_lines() and self.accelerator.is_main_process:
                report_progress(
                    "ppo",
                    self.progress.step,
                    self.num_steps,
                    score=metrics["objective/scores"],
                    kl=metrics["objective/kl"],
                )
            if self.progress.step % self.cfg.save_steps == 0 and self.progress.step < self.num_steps:
                self.save_checkpoint()
        bar.close()
        return self.progress.history
