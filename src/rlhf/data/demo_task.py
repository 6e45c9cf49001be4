"""The demo task's grammar and its gold annotator: the vocabulary reviews are made of, a review's structure, and the
rubric that reads a review's structure back from its text and measures a summary against it.

The grammar is closed, so `rubric` knows exactly what each review says: its genre and, for each aspect, its tone. It
scores a summary's components — `genre` (the right one and no other), `tone` (the overall adjective and each named
aspect's adjective in the review's tone), `invented` aspects, `aspect_recall`, `repetition` — and an overall `score`
in [0, 1] where faithfulness weighs most. `vader` is the sentiment task's annotator: VADER's compound score.
`rlhf.data.demo` generates the files from this grammar.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from rlhf.measures import repetition

GENRES = [
    "drama",
    "comedy",
    "thriller",
    "horror film",
    "western",
    "romance",
    "documentary",
    "musical",
    "science fiction film",
    "animated film",
    "war film",
    "mystery",
]
ASPECTS = [
    "plot",
    "acting",
    "soundtrack",
    "editing",
    "ending",
    "pacing",
    "dialogue",
    "cast",
    "script",
    "cinematography",
    "humour",
    "direction",
]
ADJECTIVES = {
    "positive": [
        "brilliant",
        "wonderful",
        "superb",
        "delightful",
        "beautiful",
        "excellent",
        "charming",
        "lovely",
        "clever",
        "great",
    ],
    "negative": ["terrible", "awful", "dull", "boring", "horrible", "weak", "painful", "bad", "messy", "disappointing"],
    "neutral": ["ordinary", "conventional", "simple", "quiet", "predictable", "long", "modest", "familiar"],
}
OVERALL = {
    "positive": ["wonderful", "great", "delightful", "superb"],
    "negative": ["disappointing", "bad", "dull", "weak"],
    "neutral": ["ordinary", "modest", "conventional", "familiar"],
}
TONES = ("positive", "negative", "neutral")
TONE_OF = {adjective: tone for tone, words in ADJECTIVES.items() for adjective in words}
# The rubric's weights: faithfulness (genre, tone, nothing invented) first, then completeness; repetition scales all.
WEIGHTS = {"genre": 0.25, "tone": 0.35, "no_invention": 0.25, "aspect_recall": 0.15}


@dataclass(frozen=True)
class Review:
    text: str
    genre: str
    aspects: tuple[tuple[str, str, str], ...]  # (aspect, tone, adjective), in the order the review mentions them

    @property
    def tone(self) -> str:
        balance = sum({"positive": 1, "negative": -1, "neutral": 0}[tone] for _, tone, _ in self.aspects)
        return "positive" if balance > 0 else "negative" if balance < 0 else "neutral"

    @property
    def prompt(self) -> str:
        return f"Review: {self.text}\nSummary:"


_GENRE_PATTERN = re.compile(r"\b(" + "|".join(sorted(map(re.escape, GENRES), key=len, reverse=True)) + r")\b")
_WORD = re.compile(r"[a-z]+")
_GENRE_MARK = "genremark"  # stands for a genre (some are two or three words) once it is found


def parse_review(prompt: str) -> Review | None:
    """The structure of a demo review, read back from its prompt (or None when the text is not one)."""
    text = prompt.split("Review:", 1)[-1].split("Summary:", 1)[0].strip()
    genres = _GENRE_PATTERN.findall(text.lower())
    words = _WORD.findall(_GENRE_PATTERN.sub(" ", text.lower()))
    aspects = []
    for i, word in enumerate(words):
        if word in ASPECTS:  # "a dull plot", or "the plot is dull"
            adjective = (
                words[i - 1]
                if i and words[i - 1] in TONE_OF
                else next((w for w in words[i + 1 :] if w in TONE_OF or w in ASPECTS), None)
            )
            if adjective in TONE_OF:
                aspects.append((word, TONE_OF[adjective], adjective))
    if not genres or not aspects:
        return None
    return Review(text, genres[0], tuple(aspects))


def rubric_components(review: Review, response: str) -> dict[str, float]:
    """How faithful, complete and concise `response` is as a summary of `review`, each in [0, 1] (`invented` counts
    aspects), and the overall `score`."""
    lowered = response.lower()
    genres = set(_GENRE_PATTERN.findall(lowered))
    words = _WORD.findall(_GENRE_PATTERN.sub(f" {_GENRE_MARK} ", lowered))
    truth = {aspect: tone for aspect, tone, _ in review.aspects}
    named: dict[str, str | None] = {}  # aspect -> the adjective before its first mention
    for i, word in enumerate(words):
        if word in ASPECTS and word not in named:
            named[word] = words[i - 1] if i and words[i - 1] in TONE_OF else None
    # Tone: the overall adjective (the word before the genre) and each true aspect's adjective.
    judged = [TONE_OF.get(words[i - 1]) == review.tone for i, word in enumerate(words) if word == _GENRE_MARK and i][:1]
    judged += [TONE_OF.get(adjective or "") == truth[aspect] for aspect, adjective in named.items() if aspect in truth]
    recalled = sum(aspect in named for aspect in truth)
    invented = sum(aspect not in truth for aspect in named)
    components = {
        "genre": float(genres == {review.genre}),
        "aspect_recall": recalled / len(truth),
        "tone": sum(judged) / len(judged) if judged else 0.0,
        "no_invention": float(bool(named) and invented == 0),
        "invented": float(invented),
        "repetition": repetition(response),
    }
    weighted = sum(weight * components[key] for key, weight in WEIGHTS.items())
    return components | {"score": weighted * (1.0 - components["repetition"])}


def rubric(prompts: Sequence[str], responses: Sequence[str]) -> list[dict[str, float]]:
    """The demo's gold annotator: the rubric's components and score for each (prompt, response); a prompt that is
    not a demo review scores 0 with no components."""
    scores = []
    for prompt, response in zip(prompts, responses, strict=True):
        review = parse_review(prompt)
        scores.append(rubric_components(review, response) if review else {"score": 0.0})
    return scores


@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader(texts: Sequence[str]) -> list[float]:
    analyzer = _vader()
    return [analyzer.polarity_scores(text)["compound"] for text in texts]
