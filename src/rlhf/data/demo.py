"""The demo task: summarise generated movie reviews, with preferences from a simulated (VADER) annotator.

Reviews come from a small grammar (a film of some genre, one to three sentences about its aspects with positive,
negative or neutral adjectives). The reference summary names the genre and the two main aspects and keeps the
review's sentiment. Preference pairs are two summaries of one review in different tones; VADER prefers the more
positive one and pairs closer than a margin are dropped. Everything is drawn from one seeded `random.Random`, so the
files are byte-identical on every run, and no review is shared between the splits.

The vocabulary and `Review` live in `rlhf.data.demo_task`, with `rubric`, a stricter gold annotator for this task.
"""

from __future__ import annotations

import random
from pathlib import Path

from rlhf.annotators import vader
from rlhf.config import DemoConfig
from rlhf.data.demo_task import ADJECTIVES, ASPECTS, GENRES, OVERALL, TONES, Review
from rlhf.data.io import write_jsonl
from rlhf.storage import atomic_dir

TITLE_WORDS = (
    ["Silent", "Crimson", "Last", "Hidden", "Broken", "Golden", "Distant", "Frozen", "Secret", "Wild", "Electric",
     "Midnight", "Paper", "Iron", "Velvet"],
    ["River", "Empire", "Garden", "Signal", "Harbor", "Mountain", "Letter", "Kingdom", "Station", "Orchard",
     "Mirror", "Voyage", "Lantern", "Circus", "Frontier"],
)
OPENINGS = ["{title} is a {genre}.", "I watched {title}, a {genre}.", "{title} is a new {genre}.",
            "Last night I saw {title}, a {genre}."]
ASPECT_SENTENCES = ["The {aspect} is {adj}.", "I found the {aspect} {adj}.", "Its {aspect} feels {adj}.",
                    "The {aspect} was {adj}."]
PAIR_SENTENCES = ["The {aspect} is {adj} and the {aspect2} is {adj2}.",
                  "I found the {aspect} {adj}, but the {aspect2} was {adj2}.",
                  "Its {aspect} is {adj}, while the {aspect2} feels {adj2}."]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _review(rng: random.Random) -> Review:
    title = f"The {rng.choice(TITLE_WORDS[0])} {rng.choice(TITLE_WORDS[1])}"
    genre = rng.choice(GENRES)
    aspects = tuple(
        (aspect, tone, rng.choice(ADJECTIVES[tone]))
        for aspect, tone in zip(rng.sample(ASPECTS, rng.randint(1, 3)), rng.choices(TONES, k=3))
    )
    sentences = [rng.choice(OPENINGS).format(title=title, genre=genre)]
    remaining = list(aspects)
    while remaining:
        if len(remaining) >= 2 and rng.random() < 0.5:
            (aspect, _, adj), (aspect2, _, adj2) = remaining[:2]
            sentences.append(rng.choice(PAIR_SENTENCES).format(aspect=aspect, adj=adj, aspect2=aspect2, adj2=adj2))
            remaining = remaining[2:]
        else:
            aspect, _, adj = remaining.pop(0)
            sentences.append(rng.choice(ASPECT_SENTENCES).format(aspect=aspect, adj=adj))
    return Review(" ".join(sentences), genre, aspects)


def summarise(review: Review, rng: random.Random, tone: str | None = None) -> str:
    """One sentence naming the genre and the main aspects; `tone` None keeps each aspect's own sentiment."""
    overall = rng.choice(OVERALL[tone or review.tone])
    phrases = [
        f"{adjective if tone is None else rng.choice(ADJECTIVES[tone])} {aspect}"
        for aspect, _, adjective in review.aspects[:2]
    ]
    return f"{_article(overall).capitalize()} {overall} {review.genre} with {' and '.join(phrases)}."


def _unique_reviews(rng: random.Random, count: int) -> list[Review]:
    seen: set[str] = set()
    reviews: list[Review] = []
    for _ in range(count * 20):
        review = _review(rng)
        if review.text not in seen:
            seen.add(review.text)
            reviews.append(review)
            if len(reviews) == count:
                return reviews
    raise ValueError(f"the review grammar cannot produce {count} distinct reviews; lower the demo sizes")


def _preference_pair(review: Review, rng: random.Random, margin: float) -> dict[str, str] | None:
    first, second = rng.sample(TONES, 2)
    candidates = [f" {summarise(review, rng, first)}", f" {summarise(review, rng, second)}"]
    scores = vader(candidates)
    if abs(scores[0] - scores[1]) < margin:
        return None
    chosen, rejected = (0, 1) if scores[0] > scores[1] else (1, 0)
    return {"prompt": review.prompt, "chosen": candidates[chosen], "rejected": candidates[rejected]}


def generate(cfg: DemoConfig, output_dir: str | Path) -> dict[str, int]:
    """Writes corpus, sft, preferences, prompts and eval_prompts (.jsonl) into `output_dir`; returns row counts."""
    rng = random.Random(cfg.seed)
    sizes = [cfg.corpus_size, cfg.sft_size, cfg.preference_size, cfg.rl_prompts, cfg.eval_prompts]
    # Preference pairs closer than the margin are dropped, so draw spare reviews for them.
    pool = _unique_reviews(rng, sum(sizes) + cfg.preference_size)
    corpus_end = cfg.corpus_size
    sft_end = corpus_end + cfg.sft_size
    rl_end = sft_end + cfg.rl_prompts
    eval_end = rl_end + cfg.eval_prompts
    pairs = (pair for review in pool[eval_end:] if (pair := _preference_pair(review, rng, cfg.preference_margin)))
    preferences = [pair for pair, _ in zip(pairs, range(cfg.preference_size))]
    if len(preferences) < cfg.preference_size:
        raise ValueError(f"only {len(preferences)} preference pairs pass margin {cfg.preference_margin}")

    files = {
        "corpus.jsonl": [{"text": f"{r.prompt} {summarise(r, rng)}"} for r in pool[:corpus_end]],
        "sft.jsonl": [{"prompt": r.prompt, "completion": f" {summarise(r, rng)}"} for r in pool[corpus_end:sft_end]],
        "preferences.jsonl": preferences,
        "prompts.jsonl": [{"prompt": r.prompt} for r in pool[sft_end:rl_end]],
        "eval_prompts.jsonl": [{"prompt": r.prompt} for r in pool[rl_end:eval_end]],
    }
    with atomic_dir(output_dir) as staging:
        return {name: write_jsonl(staging / name, records) for name, records in files.items()}
