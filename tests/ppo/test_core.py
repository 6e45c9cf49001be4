"""The PPO math in rlhf.ppo.core against hand-worked examples, naive references and exact expectations."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.ppo import core


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# -- masked statistics -----------------------------------------------------------------------------------------------


def test_masked_mean_ignores_masked_entries_overall_and_per_row() -> None:
    values = torch.tensor([[1.0, 2.0, 100.0], [4.0, -50.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    close(core.masked_mean(values, mask), (1 + 2 + 4) / 3)
    close(core.masked_mean(values, mask, dim=1), [1.5, 4.0])
    close(core.masked_mean(values, torch.zeros_like(mask)), 0.0)  # no division by zero


def test_masked_var_is_the_unbiased_variance_of_the_masked_entries() -> None:
    values = torch.tensor([[1.0, 2.0, 100.0], [4.0, 7.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    kept = torch.tensor([1.0, 2.0, 4.0, 7.0])
    close(core.masked_var(values, mask), kept.var(unbiased=True))
    close(core.masked_var(values, mask, unbiased=False), kept.var(unbiased=False))


def test_masked_whiten_gives_zero_mean_unit_variance_on_the_mask_and_zero_outside() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(4, 7, generator=generator) * 3 + 5
    lengths = torch.tensor([7, 3, 1, 5])
    mask = (torch.arange(7) < lengths[:, None]).float()
    values = values.masked_fill(mask == 0, 1e3)  # junk past the end must not leak into the statistics

    whitened = core.masked_whiten(values, mask)
    kept = whitened[mask.bool()]
    close(kept.mean(), 0.0, atol=1e-5)
    close(kept.var(unbiased=True), 1.0, atol=1e-4)
    assert torch.all(whitened[~mask.bool()] == 0)
    # An affine map of the masked entries: the same ranks, the same standardised values.
    original = values[mask.bool()]
    close(kept, (original - original.mean()) / original.std(unbiased=True), atol=1e-5)

    kept_mean = core.masked_whiten(values, mask, shift_mean=False)[mask.bool()]
    close(kept_mean.mean(), original.mean(), atol=1e-4)  # the mean stays
    close(kept_mean.var(unbiased=True), 1.0, atol=1e-4)  # the spread is normalised
    assert torch.all(core.masked_whiten(values, mask, shift_mean=False)[~mask.bool()] == 0)


# -- KL estimators ---------------------------------------------------------------------------------------------------


def test_k1_is_the_log_ratio_and_k3_the_nonnegative_bregman_form() -> None:
    logp = torch.tensor([[-0.1, -2.0, -0.7], [-3.0, -0.01, -1.2]])
    ref = torch.tensor([[-0.5, -1.0, -0.7], [-0.2, -4.0, -1.0]])
    close(core.kl_per_token(logp, ref, "k1"), logp - ref)
    k3 = core.kl_per_token(logp, ref, "k3")
    r = torch.exp(ref - logp)
    close(k3, (r - 1) - torch.log(r), atol=1e-6)
    assert torch.all(k3 >= 0)
    assert k3[0, 2] == 0  # equal log-probs: no divergence
    # k3 is never negative even where k1 is (the policy gives a token less mass than the reference)
    assert core.kl_per_token(logp, ref, "k1")[1, 0] < 0 < k3[1, 0]


def test_k1_and_k3_are_unbiased_estimates_of_the_exact_kl() -> None:
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.2, 0.2, 0.3, 0.2, 0.1])
    exact = float((p * (p.log() - q.log())).sum())  # KL(p || q) = 0.5·ln 2.5 + 0.3·ln 0.5 ≈ 0.2502
    generator = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=generator)
    logp, ref = p.log()[tokens].unsqueeze(0), q.log()[tokens].unsqueeze(0)
    k1 = core.kl_per_token(logp, ref, "k1").mean().item()
    k3 = core.kl_per_token(logp, ref, "k3").mean().item()
    assert exact == pytest.approx(0.5 * math.log(2.5) + 0.3 * math.log(0.5), abs=1e-6)
    assert k1 == pytest.approx(exact, abs=0.01)
    assert k3 == pytest.approx(exact, abs=0.01)
    # and k3 has the smaller variance (why it is offered)
    assert core.kl_per_token(logp, ref, "k3").var() < core.kl_per_token(logp, ref, "k1").var()


def test_unknown_kl_estimator_raises() -> None:
    with pytest.raises(ValueError, match="k2"):
        core.kl_per_token(torch.zeros(1, 2), torch.zeros(1, 2), "k2")  # type: ignore[arg-type]


# -- rewards ---------------------------------------------------------------------------------------------------------


def test_token_rewards_put_the_score_on_the_last_real_token() -> None:
    scores = torch.tensor([2.0, -1.0, 0.5])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 99.0], [1.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    rewards, non_score = core.token_rewards(scores, kl, 0.5, mask)
    # -β·KL on real tokens, zero past the end (the 99 and 7s are junk past the end)
    close(non_score, [[-0.05, -0.1, -0.15], [-0.2, -0.25, 0.0], [-0.5, 0.0, 0.0]])
    close(rewards, [[-0.05, -0.1, -0.15 + 2.0], [-0.2, -0.25 - 1.0, 0.0], [-0.5 + 0.5, 0.0, 0.0]])
    # the inputs are untouched (no in-place update of kl or non_score through rewards)
    assert kl[1, 2] == 99.0 and non_score[0, 2] == pytest.approx(-0.15)


# -- GAE -------------------------------------------------------------------------------------------------------------


def naive_gae(rewards, values, mask, gamma, lam):
    """Straight from the definition, row by row, over the real tokens only: A_t = Σ_l (γλ)^l δ_{t+l}."""
    advantages = torch.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        length = int(mask[row].sum())
        v = [float(values[row, t]) for t in range(length)] + [0.0]
        deltas = [float(rewards[row, t]) + gamma * v[t + 1] - v[t] for t in range(length)]
        for t in range(length):
            advantages[row, t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(length - t))
    returns = (advantages + values) * mask
    return advantages, returns


def test_gae_matches_a_hand_worked_example_with_a_short_row() -> None:
    # γ = 0.9, λ = 0.8, so γλ = 0.72.
    # Row 0 (three real tokens): rewards [0, 0, 1], values [0.5, 0.6, 0.7], V past the end = 0.
    #   δ2 = 1 + 0.9·0   - 0.7 = 0.3      A2 = 0.3
    #   δ1 = 0 + 0.9·0.7 - 0.6 = 0.03     A1 = 0.03 + 0.72·0.3   = 0.246
    #   δ0 = 0 + 0.9·0.6 - 0.5 = 0.04     A0 = 0.04 + 0.72·0.246 = 0.21712
    #   returns = A + V = [0.71712, 0.846, 1.0]
    # Row 1 (mask [1, 1, 0]): rewards [0, 1, 5], values [0.5, 0.6, 9.0]; the 5 and the 9.0 lie past the end and
    # must be ignored (V_2 counts as 0, A_2 = 0).
    #   δ1 = 1 + 0.9·0   - 0.6 = 0.4      A1 = 0.4
    #   δ0 = 0 + 0.9·0.6 - 0.5 = 0.04     A0 = 0.04 + 0.72·0.4 = 0.328
    #   returns = [0.828, 1.0, 0]
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    advantages, returns = core.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(advantages, [[0.21712, 0.246, 0.3], [0.328, 0.4, 0.0]], atol=1e-12)
    close(returns, [[0.71712, 0.846, 1.0], [0.828, 1.0, 0.0]], atol=1e-12)
    naive = naive_gae(rewards, values, mask, 0.9, 0.8)
    close(advantages, naive[0], atol=1e-12)
    close(returns, naive[1], atol=1e-12)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (0.0, 0.5)])
def test_gae_matches_the_naive_reference_on_random_ragged_batches(gamma: float, lam: float) -> None:
    generator = torch.Generator().manual_seed(1)
    rewards = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    values = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 4, 8, 2, 5])
    mask = (torch.arange(9) < lengths[:, None]).double()
    advantages, returns = core.gae(rewards, values, mask, gamma, lam)
    expected_advantages, expected_returns = naive_gae(rewards, values, mask, gamma, lam)
    close(advantages, expected_advantages, atol=1e-10)
    close(returns, expected_returns, atol=1e-10)
    assert torch.all(advantages[mask == 0] == 0) and torch.all(returns[mask == 0] == 0)
    if lam == 1.0:  # λ = 1: returns are the discounted reward-to-go (Monte Carlo), whatever the values
        for row, length in enumerate(lengths.tolist()):
            for t in range(length):
                to_go = sum(gamma**k * float(rewards[row, t + k]) for k in range(length - t))
                assert float(returns[row, t]) == pytest.approx(to_go, abs=1e-10)


# -- policy and value losses -----------------------------------------------------------------------------------------


def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
    advantages = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    result = core.policy_loss(logprobs, logprobs.clone(), advantages, mask, clip=0.2)
    close(result.loss, -(1.0 - 2.0 + 0.5 + 3.0 + 0.25) / 5)
    close(result.clipfrac, 0.0)
    close(result.approxkl, 0.0)
    close(result.ratio, 1.0)


def test_policy_loss_clips_only_in_the_direction_that_limits_the_update() -> None:
    # ε = 0.2. Per token (ratio, advantage) → unclipped -A·r, clipped -A·clip(r), loss max(...):
    #   (1.5, +1): -1.5 vs -1.2 → -1.2, clipped (the objective stops rewarding a larger ratio)
    #   (1.5, -1): +1.5 vs +1.2 → +1.5, not clipped (a bad move away is fully penalised)
    #   (0.5, +1): -0.5 vs -0.8 → -0.5, not clipped
    #   (0.5, -1): +0.5 vs +0.8 → +0.8, clipped
    #   (1.1, +2): inside [0.8, 1.2] → -2.2, not clipped
    #   (3.0, +1): masked out (past the end of the response)
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1, 3.0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    old = torch.full_like(ratios, -1.3)
    logprobs = (old + ratios.log()).requires_grad_(True)
    result = core.policy_loss(logprobs, old, advantages, mask, clip=0.2)
    close(result.loss, (-1.2 + 1.5 - 0.5 + 0.8 - 2.2) / 5, atol=1e-12)
    close(result.clipfrac, 2 / 5, atol=1e-12)
    log_ratios = ratios.log()[0, :5]
    close(result.approxkl, 0.5 * (log_ratios**2).mean(), atol=1e-12)
    close(result.ratio, (1.5 + 1.5 + 0.5 + 0.5 + 1.1) / 5, atol=1e-12)
    # Clipped tokens pass no gradient; the others get d(-A·r)/d(log p) = -A·r, averaged over the 5 real tokens.
    result.loss.backward()
    close(logprobs.grad, [[0.0, 1.5 / 5, -0.5 / 5, 0.0, -2.2 / 5, 0.0]], atol=1e-12)


def test_value_loss_takes_the_larger_of_clipped_and_unclipped_errors() -> None:
    # clip 0.2, old values all 0:
    #   new 1.0, return 1.0: unclipped 0,    clipped (0.2-1)²  = 0.64 → 0.64, clipped
    #   new 0.1, return 1.0: unclipped 0.81, clipped the same        → 0.81, not clipped
    #   new 1.0, return 0.0: unclipped 1.0,  clipped 0.2²      = 0.04 → 1.0,  not clipped
    #   new -0.5, return -1: unclipped 0.25, clipped (-0.2+1)² = 0.64 → 0.64, clipped
    #   masked token: new 5, return -5 (would dominate if counted)
    values = torch.tensor([[1.0, 0.1, 1.0, -0.5, 5.0]], dtype=torch.float64)
    old = torch.zeros_like(values)
    returns = torch.tensor([[1.0, 1.0, 0.0, -1.0, -5.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, clipfrac = core.value_loss(values, old, returns, mask, clip=0.2)
    close(loss, 0.5 * (0.64 + 0.81 + 1.0 + 0.64) / 4, atol=1e-12)
    close(clipfrac, 2 / 4, atol=1e-12)


# -- logits helpers --------------------------------------------------------------------------------------------------


# -- KL controller ---------------------------------------------------------------------------------------------------


def test_fixed_kl_controller_never_moves() -> None:
    controller = core.KLController(0.05)
    for kl in (0.0, 3.0, 1e6):
        controller.update(kl, batch_size=64)
    assert controller.value == 0.05


def test_adaptive_kl_controller_moves_towards_the_target_with_a_clipped_error() -> None:
    controller = core.KLController(0.1, target=6.0, horizon=10_000)
    controller.update(6.6, batch_size=100)  # error +0.1 → β·(1 + 0.1·100/10000)
    assert controller.value == pytest.approx(0.1 * 1.001)
    controller.value = 0.1
    controller.update(12.0, batch_size=100)  # error +1 clipped to +0.2
    assert controller.value == pytest.approx(0.1 * 1.002)
    controller.value = 0.1
    controller.update(0.0, batch_size=100)  # error -1 clipped to -0.2
    assert controller.value == pytest.approx(0.1 * 0.998)
    controller.value = 0.1
    controller.update(4.8, batch_size=100)  # error -0.2 exactly
    assert controller.value == pytest.approx(0.1 * 0.998)
    controller.update(6.0, batch_size=100)  # on target: unchanged
    assert controller.value == pytest.approx(0.1 * 0.998)


def test_kl_controller_state_dict_round_trip() -> None:
    controller = core.KLController(0.2, target=3.0, horizon=500)
    controller.update(9.0, batch_size=50)
    restored = core.KLController(1.0)
    restored.load_state_dict(controller.state_dict())
    assert (restored.value, restored.target, restored.horizon) == (controller.value, 3.0, 500)
    restored.update(1.0, 50)
    controller.update(1.0, 50)
    assert restored.value == controller.value
    fixed = core.KLController(0.3)
    copy = core.KLController(9.0, target=1.0)
    copy.load_state_dict(fixed.state_dict())
    copy.update(100.0, 10)
    assert (copy.value, copy.target) == (0.3, None)


# -- EOS masking -----------------------------------------------------------------------------------------------------


def test_first_true_indices_and_response_mask() -> None:
    eos = 0
    responses = torch.tensor(
        [
            [5, eos, 7, eos],  # EOS at 1: it counts, everything after it does not
            [5, 6, 7, 8],  # no EOS: all real (truncated at max_new_tokens)
            [eos, 5, eos, 6],  # EOS first
            [5, 6, 7, eos],  # EOS last
        ]
    )
    assert core.first_true_indices(responses == eos).tolist() == [1, 4, 0, 3]
    assert core.response_mask(responses, eos).tolist() == [
        [1, 1, 0, 0],
        [1, 1, 1, 1],
        [1, 0, 0, 0],
        [1, 1, 1, 1],
    ]
