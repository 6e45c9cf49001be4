"""PPOTrainer end to end on a tiny GPT-2 (CPU, seconds): learning a toy reward, which weights move, resume, LoRA."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from ppo_helpers import ToyReward, make_trainer, random_classifier, random_lm, snapshot

from rlhf.config import LoraParams, PPOConfig
from rlhf.ppo import core
from rlhf.ppo.models import Critic, reference_model
from rlhf.ppo.trainer import STEP_METRICS
from rlhf.sampling import join, sequence_logprobs

# Metrics that measure the machine rather than the run.
TIMING = {"time/rollout", "time/update", "tokens_per_second"}


def config(**overrides) -> PPOConfig:
    settings = dict(
        rollout_batch_size=8,
        mini_batch_size=8,
        ppo_epochs=1,
        learning_rate=1e-3,
        lr_scheduler="constant",
        max_new_tokens=12,
        missing_eos_penalty=None,
        kl_coef=0.02,
        value_model="policy_head",
        save_steps=1000,
        seed=0,
    )
    settings.update(overrides)
    return PPOConfig(**settings)


def no_callback(step, metrics, trainer) -> None:
    pass


@pytest.mark.slow
def test_ppo_raises_a_toy_reward(make_policy, tokenizer, reward_tokenizer, prompts, tmp_path: Path) -> None:
    """The reward counts " great" in the answer (scored through the reward tokenizer's ids); PPO must raise it."""
    torch.manual_seed(0)
    policy = make_policy()
    steps = 30
    cfg = config(total_episodes=steps * 16, rollout_batch_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=16)
    reward = ToyReward(reward_tokenizer)
    trainer = make_trainer(
        cfg,
        policy,
        reference_model(policy),
        None,
        reward,
        tokenizer,
        reward_tokenizer,
        prompts,
        tmp_path / "checkpoints",
    )
    assert trainer.num_steps == steps
    seen: list[int] = []
    history = trainer.train(lambda step, metrics, _: seen.append(step))

    assert seen == list(range(1, steps + 1)) and [row["step"] for row in history] == seen
    assert reward.calls.item() == steps  # one scoring call per rollout
    for row in history:
        missing = set(STEP_METRICS) - set(row)
        assert not missing, f"step {row['step']} lacks {sorted(missing)}"
        assert all(math.isfinite(value) for value in row.values()), row
    scores = [row["objective/scores"] for row in history]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 1.0, scores
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the reference is a copy of the policy
    assert history[-1]["objective/kl"] > 0.1  # the policy moved away from it
    assert [row["episode"] for row in history] == [16.0 * (i + 1) for i in range(steps)]
    # rlhf_reward = score + non-score reward, and the non-score reward is -β·KL (fixed β, k1 estimator)
    for row in history:
        total = row["objective/scores"] + row["objective/non_score_reward"]
        assert row["objective/rlhf_reward"] == pytest.approx(total, abs=1e-4)
        assert row["objective/non_score_reward"] == pytest.approx(-0.02 * row["objective/kl"], abs=1e-4)
        assert row["kl_coef"] == 0.02
    assert trainer.last_samples[1] and all(isinstance(text, str) for text in trainer.last_samples[1])


@pytest.mark.slow
@pytest.mark.parametrize("value_model", ["reward", "policy_head"])
def test_a_few_steps_move_every_trainable_weight_and_no_frozen_one(
    make_policy, tokenizer, prompts, tmp_path: Path, value_model: str
) -> None:
    torch.manual_seed(0)
    policy = make_policy()
    reference = reference_model(policy)
    reward_model = random_classifier(tokenizer, seed=1).requires_grad_(False)
    critic = Critic(copy.deepcopy(reward_model).requires_grad_(True)) if value_model == "reward" else None
    cfg = config(total_episodes=3 * 8, value_model=value_model)
    trainer = make_trainer(
        cfg, policy, reference, critic, reward_model, tokenizer, tokenizer, prompts, tmp_path / "checkpoints"
    )
    trainable = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert any(name.startswith("policy.") for name in trainable)
    assert any(name.startswith("critic." if critic else "value_head.") for name in trainable)
    frozen = {"reference": (reference, snapshot(reference)), "reward": (reward_model, snapshot(reward_model))}

    history = trainer.train(no_callback)

    assert len(history) == 3
    # One epoch over one mini-batch: the first update starts exactly on-policy (the training forward reproduces
    # the rollout's log-probs), and the reference equals the policy before any update.
    first = history[0]
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert first["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-8)
    assert first["policy/clipfrac_avg"] == 0.0
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    after = dict(trainer.model.named_parameters())
    unchanged = [name for name, before in trainable.items() if torch.equal(before, after[name].detach())]
    assert not unchanged, f"not updated: {unchanged}"
    for label, (model, before) in frozen.items():
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, before[name]), f"{label} model changed: {name}"
        assert not any(p.requires_grad for p in model.parameters()), label


@pytest.mark.slow
def test_gradient_accumulation_steps_the_optimiser_and_schedule_once_per_mini_batch(
    make_policy, tokenizer, prompts, tmp_path: Path
) -> None:
    # 2 steps × 2 epochs × (8 / 4) mini-batches = 8 optimiser steps, each from 2 micro-batches of 2.
    cfg = config(
        total_episodes=16,
        rollout_batch_size=8,
        mini_batch_size=4,
        gradient_accumulation_steps=2,
        ppo_epochs=2,
        lr_scheduler="linear",
        learning_rate=1e-3,
    )
    torch.manual_seed(0)
    policy = make_policy()
    trainer = make_trainer(
        cfg,
        policy,
        reference_model(policy),
        None,
        random_classifier(tokenizer, seed=1),
        tokenizer,
        tokenizer,
        prompts,
        tmp_path,
    )
    history = trainer.train(no_callback)
    assert [row["lr"] for row in history] == pytest.approx([1e-3 * 4 / 8, 0.0])  # linear decay over 8 updates
    steps_taken = {int(state["step"]) for state in trainer.optimizer.optimizer.state.values()}
    assert steps_taken == {8}


@pytest.mark.slow
def test_dropout_does_not_make_the_first_update_off_policy(
    pretrained_weights, tokenizer, prompts, tmp_path: Path
) -> None:
    """Hub models (gpt2, ...) ship with dropout 0.1: the first update must still see ratio 1, as without dropout."""
    torch.manual_seed(0)
    policy = random_lm(tokenizer, dropout=0.1)
    policy.load_state_dict(pretrained_weights)
    trainer = make_trainer(
        config(total_episodes=8),
        policy,
        reference_model(policy),
        None,
        random_classifier(tokenizer, seed=1),
        tokenizer,
        tokenizer,
        prompts,
        tmp_path,
    )
    (first,) = trainer.train(no_callback)
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert first["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-8)


def _comparable(row: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in row.items() if key not in TIMING}


@pytest.mark.slow
def test_resume_after_an_interruption_continues_the_same_run(
    make_policy, tokenizer, reward_tokenizer, prompts, tmp_path: Path
) -> None:
    steps = 6
    cfg = config(
        total_episodes=steps * 4,
        rollout_batch_size=4,
        mini_batch_size=2,
        ppo_epochs=2,
        save_steps=2,
        max_new_tokens=10,
        target_kl=1.0,
        kl_horizon=100,
        lr_scheduler="linear",
    )

    def fresh(folder: Path):
        torch.manual_seed(cfg.seed)  # as the stage's set_seed
        policy = make_policy()
        return make_trainer(
            cfg,
            policy,
            reference_model(policy),
            None,
            ToyReward(reward_tokenizer),
            tokenizer,
            reward_tokenizer,
            prompts,
            folder,
        )

    reference_trainer = fresh(tmp_path / "a")
    uninterrupted = reference_trainer.train(no_callback)
    assert [row["step"] for row in uninterrupted] == list(range(1, steps + 1))

    class Interrupt(KeyboardInterrupt):
        pass

    def stop_after_three(step, metrics, trainer) -> None:
        if step == 3:
            raise Interrupt

    interrupted = fresh(tmp_path / "b")
    with pytest.raises(Interrupt):
        interrupted.train(stop_after_three)
    assert sorted(p.name for p in (tmp_path / "b").glob("step-*")) == ["step-000002"]
    assert (tmp_path / "b" / "step-000002" / "COMPLETE").exists()

    resumed_trainer = fresh(tmp_path / "b")
    ran: list[int] = []
    resumed = resumed_trainer.train(lambda step, metrics, _: ran.append(step))
    assert ran == [3, 4, 5, 6]  # continues after the last checkpoint (step 2), redoing the lost step 3
    # The returned history is the whole run's (steps 1-2 come back from the checkpoint), equal to the
    # uninterrupted run's step for step.
    assert [row["step"] for row in resumed] == list(range(1, steps + 1))
    for expected, actual in zip(uninterrupted, resumed):
        expected, actual = _comparable(expected), _comparable(actual)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert actual[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), (actual["step"], key)
    # the adaptive β, the schedule and the episode count carry over through the checkpoint
    assert resumed_trainer.kl_controller.value == pytest.approx(reference_trainer.kl_controller.value, rel=1e-6)
    assert resumed_trainer.kl_controller.value != cfg.kl_coef
    assert resumed_trainer.scheduler.get_last_lr() == pytest.approx(reference_trainer.scheduler.get_last_lr())
    assert (resumed_trainer.progress.step, resumed_trainer.progress.episode) == (steps, steps * 4)
    # The weights end where the uninterrupted run's do.
    expected_weights = dict(reference_trainer.model.named_parameters())
    for name, weight in resumed_trainer.model.named_parameters():
        torch.testing.assert_close(weight, expected_weights[name], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning")
def test_lora_policy_uses_the_disabled_adapters_as_reference(make_policy, tokenizer, prompts, tmp_path: Path) -> None:
    from peft import get_peft_model

    from rlhf.stages.common import lora_config

    torch.manual_seed(0)
    cfg = config(
        total_episodes=3 * 8, learning_rate=5e-3, lora=LoraParams(enabled=True, r=4, alpha=8, dropout=0.0)
    )  # all-linear, as the stage default
    base = make_policy()
    original = snapshot(base)
    policy = get_peft_model(base, lora_config(cfg.lora))
    base_names = {name for name, p in policy.named_parameters() if "lora_" not in name}
    lora_before = {name: p.detach().clone() for name, p in policy.named_parameters() if "lora_" in name}
    assert lora_before and all(not p.requires_grad for name, p in policy.named_parameters() if name in base_names)
    reward_model = random_classifier(tokenizer, seed=1).requires_grad_(False)
    trainer = make_trainer(
        cfg, policy, None, None, reward_model, tokenizer, tokenizer, prompts, tmp_path / "checkpoints"
    )
    assert trainer.reference is None
    rollouts = []
    original_rollout = trainer.rollout

    def record_rollout(batch_prompts):
        rollouts.append(original_rollout(batch_prompts))
        return rollouts[-1]

    trainer.rollout = record_rollout

    history = trainer.train(no_callback)

    # LoRA's B matrices start at zero: before any update the policy is its base model, so the KL is zero.
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert abs(history[-1]["objective/kl"]) > 1e-4
    lora_after = {name: p.detach() for name, p in trainer.policy.named_parameters() if "lora_" in name}
    assert any(not torch.equal(lora_before[name], lora_after[name]) for name in lora_before)
    merged_names = {
        name.replace("base_model.model.", "").replace(".base_layer", ""): p
        for name, p in trainer.policy.named_parameters()
        if "lora_" not in name
    }
    for name, tensor in original.items():
        if name in merged_names:
            assert torch.equal(merged_names[name].detach(), tensor), f"base weight changed: {name}"

    # The last rollout's reference log-probs are the untouched base model's; its policy log-probs are not.
    batch = rollouts[-1]
    samples, mask = batch.samples, batch.mask
    ids, attention, positions = join(samples.queries, samples.query_mask, samples.responses, mask)
    with torch.no_grad():
        base_logits = make_policy()(input_ids=ids, attention_mask=attention, position_ids=positions).logits
        expected = sequence_logprobs(base_logits, batch.context, samples.responses, trainer.cfg.temperature)[1] * mask
    torch.testing.assert_close(batch.ref_logprobs, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(batch.logprobs, expected, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(("whiten_rewards", "kl_estimator"), [(False, "k1"), (True, "k3")])
def test_one_step_feeds_the_losses_what_the_math_says(
    make_policy,
    tokenizer,
    reward_tokenizer,
    prompts,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    whiten_rewards: bool,
    kl_estimator: str,
) -> None:
    """Intercepts the rollout and the loss calls of one step and recomputes every input independently:
    log-probs and values from unpadded forwards, scores from the reward model on its own encoding (minus the
    missing-EOS penalty), then rewards, GAE (non-default γ, λ) and whitening from the rlhf.ppo.core functions."""
    torch.manual_seed(0)
    policy = make_policy()
    reference = make_policy()
    with torch.no_grad():  # a reference that differs from the policy, so the KL term is not zero
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    reference.requires_grad_(False)
    reward_model = random_classifier(reward_tokenizer, seed=1).requires_grad_(False)
    critic = Critic(random_classifier(tokenizer, seed=2))
    cfg = config(
        total_episodes=6,
        rollout_batch_size=6,
        mini_batch_size=6,
        ppo_epochs=1,
        max_new_tokens=10,
        temperature=0.8,
        gamma=0.9,
        lam=0.8,
        kl_coef=0.3,
        missing_eos_penalty=2.0,
        value_model="reward",
        whiten_rewards=whiten_rewards,
        kl_estimator=kl_estimator,
    )
    trainer = make_trainer(
        cfg, policy, reference, critic, reward_model, tokenizer, reward_tokenizer, prompts, tmp_path / "checkpoints"
    )
    rollouts, policy_calls, value_calls = [], [], []
    original_rollout, original_policy_loss, original_value_loss = trainer.rollout, core.policy_loss, core.value_loss

    def record_rollout(batch_prompts):
        rollouts.append(original_rollout(batch_prompts))
        return rollouts[-1]

    def record_policy_loss(*args, **kwargs):
        policy_calls.append([a.detach().clone() if torch.is_tensor(a) else a for a in args])
        return original_policy_loss(*args, **kwargs)

    def record_value_loss(*args, **kwargs):
        value_calls.append([a.detach().clone() if torch.is_tensor(a) else a for a in args])
        return original_value_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "rollout", record_rollout)
    monkeypatch.setattr(core, "policy_loss", record_policy_loss)
    monkeypatch.setattr(core, "value_loss", record_value_loss)
    # the update changes the models in place: keep copies as they were during the rollout
    policy_before, critic_before = copy.deepcopy(policy), copy.deepcopy(critic)
    (metrics,) = trainer.train(no_callback)

    (batch,), (policy_args,), (value_args,) = rollouts, policy_calls, value_calls
    samples, mask = batch.samples, batch.mask
    batch_prompts = samples.prompts
    assert len(batch_prompts) == 6 and set(batch_prompts) <= set(prompts)
    assert samples.ends_with_eos.any() and not samples.ends_with_eos.all()  # the EOS penalty applies to some rows

    with torch.no_grad():
        logprobs, ref_logprobs, values = (torch.zeros_like(mask) for _ in range(3))
        raw_scores = []
        for row, prompt in enumerate(batch_prompts):
            length = int(mask[row].sum())
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + samples.responses[row, :length].tolist()])
            positions = torch.arange(ids.shape[1])[None]
            for model, out in ((policy_before, logprobs), (reference, ref_logprobs)):
                logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1] / cfg.temperature
                out[row, :length] = torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt_ids) :, None])[:, 0]
            # V_t is the critic's value of the state before response token t: prompt + response[:t]
            state_values = critic_before(ids, torch.ones_like(ids), positions)[0]
            values[row, :length] = state_values[len(prompt_ids) - 1 : -1]
            encoded = reward_tokenizer(prompt + samples.texts[row] + reward_tokenizer.eos_token, return_tensors="pt")
            raw_scores.append(reward_model(**encoded).logits[0, 0].item())
    scores = torch.tensor(raw_scores) - 2.0 * (~samples.ends_with_eos).float()
    torch.testing.assert_close(batch.logprobs, logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(batch.ref_logprobs, ref_logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(batch.values, values, atol=1e-4, rtol=0)
    torch.testing.assert_close(batch.scores, scores, atol=1e-4, rtol=0)

    kl = core.kl_per_token(logprobs, ref_logprobs, kl_estimator) * mask
    rewards, non_score = core.token_rewards(scores, kl, cfg.kl_coef, mask)
    if whiten_rewards:
        rewards = core.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = core.gae(rewards, values, mask, 0.9, 0.8)
    advantages = core.masked_whiten(advantages, mask)

    new_logprobs, old_logprobs, passed_advantages, passed_mask, clip = policy_args
    # one mini-batch holding every rollout row, in a random order: recover it from the old log-probs
    order = [
        next(j for j in range(len(mask)) if torch.equal(old_logprobs[i], batch.logprobs[j])) for i in range(len(mask))
    ]
    assert sorted(order) == list(range(len(mask)))
    assert clip == cfg.cliprange
    torch.testing.assert_close(passed_mask, mask[order])
    torch.testing.assert_close(passed_advantages, advantages[order], atol=1e-4, rtol=0)
    torch.testing.assert_close(new_logprobs * passed_mask, logprobs[order], atol=1e-4, rtol=0)  # on-policy
    new_values, old_values, passed_returns, value_mask, value_clip = value_args
    assert value_clip == cfg.cliprange_value
    torch.testing.assert_close(old_values, values[order], atol=1e-4, rtol=0)
    torch.testing.assert_close(new_values * value_mask, values[order], atol=1e-4, rtol=0)
    torch.testing.assert_close(passed_returns, returns[order], atol=1e-4, rtol=0)

    assert metrics["objective/kl"] == pytest.approx(kl.sum(1).mean().item(), abs=1e-4)
    assert metrics["objective/kl"] > 0.01
    assert metrics["objective/scores"] == pytest.approx(scores.mean().item(), abs=1e-4)
    assert metrics["objective/non_score_reward"] == pytest.approx(non_score.sum(1).mean().item(), abs=1e-4)
    assert metrics["objective/entropy"] == pytest.approx((-logprobs * mask).sum(1).mean().item(), abs=1e-3)
    assert metrics["val/num_eos_tokens"] == samples.ends_with_eos.sum().item()


@pytest.mark.slow
def test_prompt_batches_walk_seeded_permutations_of_the_prompts(make_policy, tokenizer, tmp_path: Path) -> None:
    prompts = [f"Review: film number {i}.\nSummary:" for i in range(10)]
    cfg = config(rollout_batch_size=4, mini_batch_size=4, total_episodes=20, max_new_tokens=2, seed=3)
    policy = make_policy()
    trainer = make_trainer(
        cfg,
        policy,
        reference_model(policy),
        None,
        random_classifier(tokenizer),
        tokenizer,
        tokenizer,
        prompts,
        tmp_path,
    )
    drawn: list[list[str]] = []
    original_rollout = trainer.rollout

    def record_rollout(indices):
        drawn.append([trainer.prompts[i] for i in indices])
        return original_rollout(indices)

    trainer.rollout = record_rollout
    trainer.train(no_callback)

    assert len(drawn) == 5 and all(len(batch) == 4 for batch in drawn)  # 20 episodes = two passes over 10
    first = [prompts[i] for i in torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()]
    second = [prompts[i] for i in torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()]
    # every prompt once per pass, in a seeded order (seed + pass); step 3 straddles the two passes
    assert [prompt for batch in drawn for prompt in batch] == first + second
    assert drawn[2] == first[8:] + second[:2]
