"""Gold scorers: functions from a list of texts to a list of floats, higher meaning preferred.

`vader` is the demo's simulated human: VADER's compound sentiment score (a lexicon rated by people, shipped inside the
`vadersentiment` package, so it works offline). Users plug in their own scorer as `module:function`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence

from rlhf.config import ConfigError

Annotator = Callable[[Sequence[str]], list[float]]


@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader(texts: Sequence[str]) -> list[float]:
    analyzer = _vader()
    return [analyzer.polarity_scores(text)["compound"] for text in texts]


def get_annotator(name: str) -> Annotator | None:
    """`vader`, `none` (returns None) or `package.module:function`."""
    if name == "vader":
        return vader
    if name == "none":
        return None
    module_name, sep, attribute = name.partition(":")
    if not sep:
        raise ConfigError(f"gold_annotator {name!r}: expected 'vader', 'none' or 'module:function'")
    try:
        scorer = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"gold_annotator {name!r} cannot be loaded: {exc}") from None
    if not callable(scorer):
        raise ConfigError(f"gold_annotator {name!r} is not callable")
    return scorer
