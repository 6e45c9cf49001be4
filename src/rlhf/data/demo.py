"""The demo task: summarise generated movie reviews, with preferences from a simulated annotator.

Reviews come from a small grammar (a film of some genre, one to three sentences about its aspects with positive,
negative or neutral adjectives). The reference summary names the genre and the two main aspects and keeps the
review's sentiment. Two tasks share the reviews (`demo.task`):

- `sentiment`: preference pairs are two summaries of one review in different tones; VADER prefers the more positive
  one and pairs closer than a margin are dropped. A policy can please it by being positive, faithful or not.
- `faithful`: a share of the corpus and SFT summaries carry one defect (`DEFECTS`: the overall tone flipped, an
  aspect's adjective in the wrong tone, the wrong genre, an invented or a dropped aspect), and preference pairs are
  near-minimal: a faithful summary and the same summary, drawn with the same random choices, with one defect
  (weighted by `demo.pair_defects`, towards the ones a reward model learns slowest). The rubric
  (`rlhf.data.demo_task.rubric`) labels them, and a share `demo.label_noise` of labels is flipped, as annotators
  disagree. Pairs of two arbitrary summaries differ in many ways at once and taught a reward model little (held-out
  accuracy 0.55 against 0.81 for near-minimal pairs, when the task was designed).

Everything is drawn from one seeded `random.Random`, so the files are byte-identical on every run, and no review is
shared between the splits. The vocabulary and `Review` live in `rlhf.data.demo_task`, with the rubric.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from rlhf.config import DemoConfig
from rlhf.data.demo_task import ADJECTIVES, ASPECTS, GENRES, OVERALL, TONES, Review, rubric_components, vader
from rlhf.data.io import write_jsonl
from rlhf.storage import atomic_dir

TITLE_WORDS = (
    [
        "Silent",
        "Crimson",
        "Last",
        "Hidden",
        "Broken",
        "Golden",
        "Distant",
        "Frozen",
        "Secret",
        "Wild",
        "Electric",
        "Midnight",
        "Paper",
        "Iron",
        "Velvet",
    ],
    [
        "River",
        "Empire",
        "Garden",
        "Signal",
        "Harbor",
        "Mountain",
        "Letter",
        "Kingdom",
        "Station",
        "Orchard",
        "Mirror",
        "Voyage",
        "Lantern",
        "Circus",
        "Frontier",
    ],
)
OPENINGS = [
    "{title} is a {genre}.",
    "I watched {title}, a {genre}.",
    "{title} is a new {genre}.",
    "Last night I saw {title}, a {genre}.",
]
ASPECT_SENTENCES = [
    "The {aspect} is {adj}.",
    "I found the {aspect} {adj}.",
    "Its {aspect} feels {adj}.",
    "The {aspect} was {adj}.",
]
PAIR_SENTENCES = [
    "The {aspect} is {adj} and the {aspect2} is {adj2}.",
    "I found the {aspect} {adj}, but the {aspect2} was {adj2}.",
    "Its {aspect} is {adj}, while the {aspect2} feels {adj2}.",
]
# The defects of the faithful task's SFT and corpus summaries, each spoiling one part of a summary that the rubric
# checks. Preference pairs draw theirs by `demo.pair_defects`, which adds `swapped_aspect` (one named aspect replaced
# by one the review does not have: the model's own commonest copying error).
DEFECTS = ("flipped_tone", "wrong_adjective", "wrong_genre", "invented_aspect", "dropped_aspect")


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


def _render(overall: str, genre: str, phrases: list[str]) -> str:
    listed = " and ".join(phrases) if len(phrases) <= 2 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{_article(overall).capitalize()} {overall} {genre} with {listed}."


def summarise(review: Review, rng: random.Random, tone: str | None = None) -> str:
    """One sentence naming the genre and the main aspects; `tone` None keeps each aspect's own sentiment."""
    overall = rng.choice(OVERALL[tone or review.tone])
    phrases = [
        f"{adjective if tone is None else rng.choice(ADJECTIVES[tone])} {aspect}"
        for aspect, _, adjective in review.aspects[:2]
    ]
    return _render(overall, review.genre, phrases)


def _other(rng: random.Random, choices: Sequence[str], *excluded: str) -> str:
    return rng.choice([choice for choice in choices if choice not in excluded])


def faithful_summary(review: Review, rng: random.Random, defect: str | None = None) -> str:
    """The faithful summary (genre, the two main aspects, each in the review's tone), or that summary with one
    `defect` of `DEFECTS`. The shared choice is drawn before the defect's own, so two generators seeded alike give
    summaries that differ by the defect alone."""
    overall_choice = rng.randrange(len(OVERALL[review.tone]))  # every tone has as many overall adjectives
    tone, genre = review.tone, review.genre
    phrases = [[adjective, aspect] for aspect, _, adjective in review.aspects[:2]]
    if defect == "flipped_tone":
        tone = _other(rng, TONES, tone)
    elif defect == "wrong_adjective":
        index = rng.randrange(len(phrases))
        phrases[index][0] = rng.choice(ADJECTIVES[_other(rng, TONES, review.aspects[index][1])])
    elif defect == "wrong_genre":
        genre = _other(rng, GENRES, genre)
    elif defect == "invented_aspect":
        invented = _other(rng, ASPECTS, *(aspect for aspect, _, _ in review.aspects))
        phrases.insert(rng.randint(0, len(phrases)), [rng.choice(ADJECTIVES[rng.choice(TONES)]), invented])
    elif defect == "swapped_aspect":
        index = rng.randrange(len(phrases))
        phrases[index][1] = _other(rng, ASPECTS, *(aspect for aspect, _, _ in review.aspects))
    elif defect == "dropped_aspect" and len(phrases) == 2:
        phrases.pop(rng.randrange(2))
    elif defect is not None:
        raise ValueError(f"defect {defect!r} does not apply to a review with {len(phrases)} aspect(s)")
    return _render(OVERALL[tone][overall_choice], genre, [" ".join(phrase) for phrase in phrases])


def _defect(review: Review, rng: random.Random) -> str:
    """One of the defects that applies to `review` (an aspect can be dropped only from two)."""
    return rng.choice([defect for defect in DEFECTS if defect != "dropped_aspect" or len(review.aspects) >= 2])


def _faithful_or_defective(review: Review, rng: random.Random, defect_share: float) -> str:
    return faithful_summary(review, rng, _defect(review, rng) if rng.random() < defect_share else None)


def _contrastive_pair(
    review: Review, rng: random.Random, label_noise: float, defects: dict[str, float]
) -> dict[str, str]:
    """A faithful summary and the same summary with one defect (drawn by the weights `defects`), labelled by the
    rubric; a share `label_noise` of labels flipped."""
    kinds = [kind for kind in defects if kind != "dropped_aspect" or len(review.aspects) >= 2]
    defect = rng.choices(kinds, [defects[kind] for kind in kinds])[0]
    seed = rng.getrandbits(64)
    faithful = f" {faithful_summary(review, random.Random(seed))}"
    defective = f" {faithful_summary(review, random.Random(seed), defect)}"
    if rubric_components(review, faithful)["score"] <= rubric_components(review, defective)["score"]:
        raise AssertionError(f"the rubric does not see {defect!r} in {defective!r}")  # a grammar/rubric mismatch
    chosen, rejected = (defective, faithful) if rng.random() < label_noise else (faithful, defective)
    return {"prompt": review.prompt, "chosen": chosen, "rejected": rejected}


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
    files = _faithful(cfg) if cfg.task == "faithful" else _sentiment(cfg)
    with atomic_dir(output_dir) as staging:
        return {name: write_jsonl(staging / name, records) for name, records in files.items()}


def _sentiment(cfg: DemoConfig) -> dict[str, list[dict[str, str]]]:
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
    return {
        "corpus.jsonl": [{"text": f"{r.prompt} {summarise(r, rng)}"} for r in pool[:corpus_end]],
        "sft.jsonl": [{"prompt": r.prompt, "completion": f" {summarise(r, rng)}"} for r in pool[corpus_end:sft_end]],
        "preferences.jsonl": preferences,
        "prompts.jsonl": [{"prompt": r.prompt} for r in pool[sft_end:rl_end]],
        "eval_prompts.jsonl": [{"prompt": r.prompt} for r in pool[rl_end:eval_end]],
    }


def _faithful(cfg: DemoConfig) -> dict[str, list[dict[str, str]]]:
    rng = random.Random(cfg.seed)
    sizes = {
        "corpus": cfg.corpus_size,
        "sft": cfg.sft_size,
        "preferences": cfg.preference_size,
        "prompts": cfg.rl_prompts,
        "eval_prompts": cfg.eval_prompts,
    }
    pool, splits = iter(_unique_reviews(rng, sum(sizes.values()))), {}
    for name, size in sizes.items():
        splits[name] = [next(pool) for _ in range(size)]
    return {
        "corpus.jsonl": [
            {"text": f"{r.prompt} {_faithful_or_defective(r, rng, cfg.corpus_defect_share)}"} for r in splits["corpus"]
        ],
        "sft.jsonl": [
            {"prompt": r.prompt, "completion": f" {_faithful_or_defective(r, rng, cfg.sft_defect_share)}"}
            for r in splits["sft"]
        ],
        "preferences.jsonl": [
            _contrastive_pair(r, rng, cfg.label_noise, cfg.pair_defects) for r in splits["preferences"]
        ],
        "prompts.jsonl": [{"prompt": r.prompt} for r in splits["prompts"]],
        "eval_prompts.jsonl": [{"prompt": r.prompt} for r in splits["eval_prompts"]],
    }
