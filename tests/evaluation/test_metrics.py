"""Code checks of the evaluation arithmetic: repetition, distinct-2, win rates, the Wilson bound and `compare`."""

from __future__ import annotations

import math

import pytest

from rlhf.evaluation import compare, distinct_2, repetition, summarize, win_rate
from rlhf.gates import wilson_lower_bound


def _row(response: str, rm: float, gold: float | None = None, kl: float = 0.0, eos: bool = True) -> dict:
    return {"prompt": "p", "response": response, "rm_score": rm, "gold_score": gold, "kl": kl, "eos": eos,
            "length": len(response.split()), "repetition": repetition(response)}


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
    policy = [_row("great great great", 1.0, 0.5, kl=2.0), _row("a fine film", 1.0, 0.3, kl=4.0),
              _row("superb", 3.0, 0.0, kl=3.0)]
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
