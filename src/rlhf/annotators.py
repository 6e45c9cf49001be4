"""Gold annotators: what evaluation trusts more than the reward model, to see whether PPO's gains are real.

An annotator scores (prompt, response) pairs. It may return a float per response, or a dict with a `score` and
components (the demo rubric's genre, tone, invented aspects, …), which the evaluation keeps per answer and the report
uses to flag unfaithful answers.

- `rubric`: the demo's gold, which measures a summary against the generated review's structure exactly
  (`rlhf.data.demo_task.rubric`);
- `vader`: VADER's compound sentiment of the response (a lexicon rated by people, shipped inside the `vadersentiment`
  package, so it works offline), for tasks where more positive is better;
- `package.module:function`: a user's own, called as `function(prompts, responses)`, or `function(responses)` when it
  takes one argument.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence

from rlhf.config import ConfigError
from rlhf.data.demo_task import rubric, vader

# (prompts, responses) -> one dict per response with at least "score"
Annotator = Callable[[Sequence[str], Sequence[str]], list[dict[str, float]]]


def _load(name: str) -> Callable:
    if name == "vader":
        return vader
    if name == "rubric":
        return rubric
    module_name, sep, attribute = name.partition(":")
    if not sep:
        raise ConfigError(f"gold_annotator {name!r}: expected 'rubric', 'vader', 'none' or 'module:function'")
    try:
        scorer = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"gold_annotator {name!r} cannot be loaded: {exc}") from None
    if not callable(scorer):
        raise ConfigError(f"gold_annotator {name!r} is not callable")
    return scorer


def _takes_prompts(scorer: Callable) -> bool:
    try:
        parameters = inspect.signature(scorer).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: assume the documented two-argument form
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return len(positional) != 1 or positional[0].kind == positional[0].VAR_POSITIONAL


def get_annotator(name: str) -> Annotator | None:
    """`rubric`, `vader`, `none` (returns None) or `package.module:function`, as an `Annotator`."""
    if name == "none":
        return None
    scorer = _load(name)
    takes_prompts = _takes_prompts(scorer)

    def annotate(prompts: Sequence[str], responses: Sequence[str]) -> list[dict[str, float]]:
        scores = scorer(list(prompts), list(responses)) if takes_prompts else scorer(list(responses))
        if len(scores) != len(responses):
            raise ValueError(f"gold_annotator {name!r} returned {len(scores)} scores for {len(responses)} responses")
        return [dict(score) if isinstance(score, dict) else {"score": float(score)} for score in scores]

    return annotate
