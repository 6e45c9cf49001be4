"""PPOTrainer end to end on a tiny GPT-2 (CPU, seconds): learning a toy reward, which weights move, resume, LoRA."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from ppo_helpers import ToyReward, make_trainer, random_classifier, snapshot

from rlhf.config import LoraParams, PPOConfig
from rlhf.ppo.rollout import Critic, join, sequence_logprobs
from rlhf.ppo.trainer import STEP_METRICS, frozen_copy

pytestmark = pytest.mark.slow

# Metrics that measure the machine rather than the run.
TIMING = {"time/rollout", "time/update", "tokens_per_second"}


def config(**overrides) -> PPOConfig:
    settings = dict(rollout_batch_size=8, mini_batch_size=8, ppo_epochs=1, learning_rate=1e-3,
                    lr_scheduler="constant", max_new_tokens=12, missing_eos_penalty=None, kl_coef=0.02,
                    value_model="policy_head", save_steps=1000, seed=0)
    settings.update(overrides)
    return PPOConfig(**settings)


def no_callback(step, metrics, trainer) -> None:
    pass


def test_ppo_raises_a_toy_reward(make_policy, tokenizer, reward_tokenizer, prompts, tmp_path: Path) -> None:
    """The reward counts " great" in the answer (scored through the reward tokenizer's ids); PPO must raise it."""
    torch.manual_seed(0)
    policy = make_policy()
    steps = 30
    cfg = config(total_episodes=steps * 16, rollout_batch_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=16)
    reward = ToyReward(reward_tokenizer)
    trainer = make_trainer(cfg, policy, frozen_copy(policy), None, reward, tokenizer, reward_tokenizer, prompts,
                           tmp_path / "checkpoints")
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
        assert row["objective/rlhf_reward"] == pytest.approx(row["objective/scores"] + row["objective/non_score_reward"],
                                                             abs=1e-4)
        assert row["objective/non_score_reward"] == pytest.approx(-0.02 * row["objective/kl"], abs=1e-4)
        assert row["kl_coef"] == 0.02
    assert trainer.last_samples[1] and all(isinstance(text, str) for text in trainer.last_samples[1])


@pytest.mark.parametrize("value_model", ["reward", "policy_head"])
def test_a_few_steps_move_every_trainable_weight_and_no_frozen_one(make_policy, tokenizer, prompts, tmp_path: Path,
                                                                   value_model: str) -> None:
    torch.manual_seed(0)
    policy = make_policy()
    reference = frozen_copy(policy)
    reward_model = random_classifier(tokenizer, seed=1).requires_grad_(False)
    critic = Critic(copy.deepcopy(reward_model).requires_grad_(True)) if value_model == "reward" else None
    cfg = config(total_episodes=3 * 8, value_model=value_model)
    trainer = make_trainer(cfg, policy, reference, critic, reward_model, tokenizer, tokenizer, prompts,
                           tmp_path / "checkpoints")
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


def _comparable(row: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in row.items() if key not in TIMING}


def test_resume_after_an_interruption_continues_the_same_run(make_policy, tokenizer, reward_tokenizer, prompts,
                                                             tmp_path: Path) -> None:
    steps = 6
    cfg = config(total_episodes=steps * 4, rollout_batch_size=4, mini_batch_size=2, ppo_epochs=2, save_steps=2,
                 max_new_tokens=10, target_kl=1.0, kl_horizon=100, lr_scheduler="linear")

    def fresh(folder: Path):
        torch.manual_seed(cfg.seed)  # as the stage's set_seed
        policy = make_policy()
        return make_trainer(cfg, policy, frozen_copy(policy), None, ToyReward(reward_tokenizer), tokenizer,
                            reward_tokenizer, prompts, folder)

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
    assert [p.name for p in interrupted._checkpoints()] == ["step-000002"]

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


def test_lora_policy_uses_the_disabled_adapters_as_reference(make_policy, tokenizer, prompts, tmp_path: Path) -> None:
    from peft import get_peft_model

    from rlhf.stages.sft import lora_config

    torch.manual_seed(0)
    cfg = config(total_episodes=3 * 8, learning_rate=5e-3,
                 lora=LoraParams(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["c_attn", "c_fc"]))
    base = make_policy()
    original = snapshot(base)
    policy = get_peft_model(base, lora_config(cfg))
    base_names = {name for name, p in policy.named_parameters() if "lora_" not in name}
    lora_before = {name: p.detach().clone() for name, p in policy.named_parameters() if "lora_" in name}
    assert lora_before and all(not p.requires_grad for name, p in policy.named_parameters() if name in base_names)
    reward_model = random_classifier(tokenizer, seed=1).requires_grad_(False)
    trainer = make_trainer(cfg, policy, None, None, reward_model, tokenizer, tokenizer, prompts,
                           tmp_path / "checkpoints")
    assert trainer.reference is None

    history = trainer.train(no_callback)

    # LoRA's B matrices start at zero: before any update the policy is its base model, so the KL is zero.
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert abs(history[-1]["objective/kl"]) > 1e-4
    lora_after = {name: p.detach() for name, p in trainer.policy.named_parameters() if "lora_" in name}
    assert any(not torch.equal(lora_before[name], lora_after[name]) for name in lora_before)
    merged_names = {name.replace("base_model.model.", "").replace(".base_layer", ""): p
                    for name, p in trainer.policy.named_parameters() if "lora_" not in name}
    for name, tensor in original.items():
        if name in merged_names:
            assert torch.equal(merged_names[name].detach(), tensor), f"base weight changed: {name}"

    # The reference log-probs are the untouched base model's, while the adapted policy's differ.
    batch = prompts[:4]
    encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
    responses = torch.tensor([tokenizer(" A great film.", add_special_tokens=False)["input_ids"]] * len(batch))
    mask = torch.ones(responses.shape)
    ids, attention, positions = join(encoded["input_ids"], encoded["attention_mask"], responses, mask)
    context = encoded["input_ids"].shape[1]
    with torch.no_grad():
        reference = trainer._reference_logprobs(ids, attention, positions, context, responses)
        fresh_base = make_policy()
        expected = sequence_logprobs(fresh_base(input_ids=ids, attention_mask=attention, position_ids=positions).logits,
                                     context, responses, cfg.temperature)[1]
        adapted = sequence_logprobs(trainer.policy(input_ids=ids, attention_mask=attention,
                                                   position_ids=positions).logits, context, responses,
                                    cfg.temperature)[1]
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(adapted, expected, atol=1e-4)
