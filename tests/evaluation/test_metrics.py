"""Code checks of the evaluation arithmetic: repetition, distinct-2, win rates, the Wilson bound and `compare`."""

from __future__ import annotations

import math

import pytest

from rlhf.evaluation import best_of_n, best_of_n_metrics, compare, overoptimisation, summarize, win_rate
from rlhf.gates import wilson_lower_bound
from rlhf.measures import distinct_2, repetition


def _row(response: str, rm: float, gold: float | None = None, kl: float = 0.0, eos: bool = True) -> dict:
    return {
        "prompt": "p",
        "response": response,
        "rm_score": rm,
        "gold_score": gold,
        "kl": kl,
        "eos": eos,
        "length": len(response.split()),
        "repetition": repetition(response),
    }


def test_repetition_counts_repeated_bigrams_within_an_answer() -> None:
    assert repetition("a fine film with a fine cast") == pytest.approx(1 / 6)  # "a fine" repeats once of 6 bigrams
    assert repetition("great great great great great") == pytest.approx(3 / 4)
    assert repetition("short") == 0.0
    assert repetition("") == 0.0


def test_distinct_2_is_corpus_level() -> None:
    assert distinct_2(["a b c", "a b d"]) == pytest.approx(3 / 4)  # bigrams ab, bc, ab, bd
    assert distinct_2(["same answer", "same answer"]) == pytest.approx(0.5)
    assert distinct_2(["x"]) == 0.0


def test_win_rate_counts_ties_as_half() -> None:
    assert win_rate([2.0, 1.0, 0.0, 5.0], [1.0, 1.0, 1.0, 4.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


def test_wilson_lower_bound_matches_the_closed_form() -> None:
    # p = 1: the bound is n / (n + z^2).
    z = 1.959963984540054
    assert wilson_lower_bound(1.0, 300, 0.95) == pytest.approx(300 / (300 + z * z))
    assert wilson_lower_bound(1.0, 300, 0.95) < 0.99  # why the out-of-reach example gate fails on the demo
    # p = 0.5, n = 100: 0.5 +- ~0.097.
    assert wilson_lower_bound(0.5, 100, 0.95) == pytest.approx(0.4038, abs=1e-3)
    assert wilson_lower_bound(0.8, 10, 0.95) < wilson_lower_bound(0.8, 1000, 0.95) < 0.8
    assert wilson_lower_bound(0.8, 10, 0.0) == 0.8  # confidence 0: the point estimate
    assert wilson_lower_bound(0.8, 0, 0.95) == 0.8


def test_compare_reports_both_models_gains_and_win_rates() -> None:
    sft = [_row("a nice film", 0.0, 0.1), _row("a dull film", 1.0, -0.2), _row("ok", 2.0, 0.0, eos=False)]
    policy = [
        _row("great great great", 1.0, 0.5, kl=2.0),
        _row("a fine film", 1.0, 0.3, kl=4.0),
        _row("superb", 3.0, 0.0, kl=3.0),
    ]
    stats = compare(policy, sft)
    assert stats["policy/rm_score"] == pytest.approx(5 / 3)
    assert stats["sft/rm_score"] == pytest.approx(1.0)
    assert stats["rm_gain_in_sft_std"] == pytest.approx((5 / 3 - 1.0) / math.sqrt(2 / 3))
    assert stats["win_rate/rm"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert stats["win_rate/gold"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert stats["gold_gain"] == pytest.approx(0.8 / 3 - (-0.1 / 3))
    assert stats["policy/kl"] == pytest.approx(3.0)
    assert stats["sft/eos_rate"] == pytest.approx(2 / 3)
    assert stats["policy/repetition"] == pytest.approx(0.5 / 3)  # "great great" twice of 2 bigrams
    assert stats["prompts"] == 3.0


def test_without_a_gold_annotator_there_are_no_gold_metrics() -> None:
    rows = [_row("a b", 1.0), _row("c d", 2.0)]
    assert "gold_score" not in summarize(rows)
    stats = compare(rows, rows)
    assert "win_rate/gold" not in stats and "gold_gain" not in stats
    assert stats["win_rate/rm"] == 0.5  # identical answers tie everywhere


# ------------------------------------------------------------------------------------- intervals, over-optimisation


def test_compare_gives_each_gain_and_rate_a_95_percent_interval_around_it() -> None:
    policy = [_row(f"p{i}", rm=1.0 + (i % 5) * 0.2, gold=0.5 + (i % 3) * 0.1) for i in range(40)]
    sft = [_row(f"s{i}", rm=0.5 + (i % 7) * 0.1, gold=0.45 + (i % 4) * 0.05) for i in range(40)]
    stats = compare(policy, sft)
    for key in ("gold_gain", "rm_gain_in_sft_std", "win_rate/rm", "win_rate/gold"):
        assert stats[f"{key}_ci_low"] < stats[key] < stats[f"{key}_ci_high"], key
    # The gain's interval is the paired one: mean ± 1.96 standard errors of the per-prompt differences.
    differences = [p["gold_score"] - s["gold_score"] for p, s in zip(policy, sft)]
    mean = sum(differences) / 40
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 39)
    assert stats["gold_gain_ci_high"] - stats["gold_gain"] == pytest.approx(1.959964 * sd / math.sqrt(40))
    # Four times the prompts, half the width.
    wide = compare(policy * 4, sft * 4)
    assert (wide["gold_gain_ci_high"] - wide["gold_gain_ci_low"]) == pytest.approx(
        (stats["gold_gain_ci_high"] - stats["gold_gain_ci_low"]) * math.sqrt(39 / 159), rel=1e-6
    )


def test_compare_averages_the_gold_annotators_components() -> None:
    policy = [
        _row("a", 1.0, 0.5) | {"gold": {"genre": 1.0, "tone": 0.5}},
        _row("b", 1.0, 0.7) | {"gold": {"genre": 0.0, "tone": 1.0}},
    ]
    sft = [_row("c", 0.0, 0.2) | {"gold": {"genre": 1.0}}, _row("d", 0.0, 0.1) | {"gold": {"genre": 1.0}}]
    stats = compare(policy, sft)
    assert stats["policy/gold/genre"] == 0.5 and stats["policy/gold/tone"] == 0.75
    assert stats["sft/gold/genre"] == 1.0 and "sft/gold/tone" not in stats


def _curve(*points: tuple[float, float]) -> list[dict]:
    """PPO's history: a training row per step; (rm, gold) held-out points at steps 0, 8, 16, …"""
    history = [{"step": step, "objective/scores": 0.1 * step} for step in range(1, 8 * len(points))]
    history.insert(0, {"step": 0})
    for i, (rm, gold) in enumerate(points):
        history[8 * i] |= {"heldout/rm_score": rm, "heldout/gold_score": gold, "heldout/kl": 0.5 * i}
    return history


def test_overoptimisation_is_gold_falling_from_its_peak_while_the_proxy_rises() -> None:
    hacked = overoptimisation(_curve((0.0, 0.3), (1.0, 0.6), (2.0, 0.5), (3.0, 0.4)))
    assert hacked["overoptimisation/gold_peak"] == 0.6 and hacked["overoptimisation/gold_peak_step"] == 8
    assert hacked["gold_drop_while_rm_rose"] == pytest.approx(0.2)
    assert hacked["overoptimisation/rm_rise"] == pytest.approx(2.0)
    # Both rising: nothing fell. Both falling after the peak: the proxy agrees with gold, not over-optimisation.
    assert overoptimisation(_curve((0.0, 0.3), (1.0, 0.5), (2.0, 0.7)))["gold_drop_while_rm_rose"] == 0.0
    assert overoptimisation(_curve((0.0, 0.3), (2.0, 0.7), (1.0, 0.5)))["gold_drop_while_rm_rose"] == 0.0
    # No curve (an older policy, or no gold annotator): nothing to judge.
    assert overoptimisation([{"step": 1, "objective/scores": 1.0}]) == {}


def test_best_of_n_picks_per_prompt_the_answer_the_reward_model_scores_highest() -> None:
    first = [_row("a", 0.0, 0.9), _row("b", 2.0, 0.1), _row("c", 1.0, 0.5)]
    second = [_row("d", 1.0, 0.2), _row("e", 1.0, 0.3), _row("f", 1.0, 0.7)]
    best = best_of_n([first, second])
    assert [row["response"] for row in best] == ["d", "b", "c"]  # a tie keeps the first sample's answer
    stats = best_of_n_metrics(best, first, 2)
    assert stats["best_of_n/gold_gain"] == pytest.approx((0.2 - 0.9) / 3)  # the proxy's pick can lose gold
    assert stats["best_of_n/win_rate/rm"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert stats["best_of_n/kl"] == pytest.approx(math.log(2) - 0.5)
    assert not [key for key in stats if key.startswith("best_of_n/sft/") or not key.startswith("best_of_n/")]
    with pytest.raises(ValueError):
        best_of_n([first, second[:2]])
