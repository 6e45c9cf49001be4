"""Plain measures of answers and of samples, without torch: repetition, diversity and 95% intervals.

The intervals are what the report prints beside a rate or a gain, and what the gates judge proportions by: Wilson's
score interval for a proportion, and the normal interval of a mean over paired differences (each prompt answered by
both models), which on 128 prompts is within a few thousandths of a bootstrap's.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
from collections.abc import Sequence
from statistics import NormalDist


def _bigrams(text: str) -> list[tuple[str, str]]:
    words = re.findall(r"\w+", text.lower())  # "awful cast" repeats "awful cast." at the sentence's end
    return list(itertools.pairwise(words))


def repetition(text: str) -> float:
    """Share of a response's word bigrams that repeat an earlier one: 0 for none, near 1 for a loop."""
    bigrams = _bigrams(text)
    return 1.0 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def distinct_2(texts: Sequence[str]) -> float:
    """Distinct bigrams over all bigrams across the responses (Li et al., 2016): low means mode collapse."""
    bigrams = [bigram for text in texts for bigram in _bigrams(text)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(proportion: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of a proportion measured on n samples (the point itself when n or confidence is 0)."""
    if confidence <= 0 or n <= 0:
        return proportion, proportion
    z = _z(confidence)
    centre = proportion + z * z / (2 * n)
    spread = z * math.sqrt(proportion * (1 - proportion) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


def mean_interval(differences: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Normal interval of the mean of paired differences (one per prompt)."""
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return mean, mean
    half = _z(confidence) * statistics.stdev(differences) / math.sqrt(len(differences))
    return mean - half, mean + half
