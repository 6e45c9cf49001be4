"""The demo's rubric gold annotator (`rlhf.data.demo_task.rubric`), the faithful task's data drawn against it, and the
annotator interface (`rlhf.annotators`).

The rubric reads a generated review's structure back from its text, so it must recover exactly what the generator
drew, for every review; a faithful summary scores 1 and each kind of unfaithfulness lowers its own component. The
faithful task's defects are those kinds: each spoils its own component, and a preference pair differs by one.
"""

from __future__ import annotations

import collections
import difflib
import json
import random
import re
import statistics
import sys
from pathlib import Path
from typing import get_args

import pytest

from rlhf.annotators import get_annotator
from rlhf.config import ConfigError, DemoConfig, PairDefect
from rlhf.data.demo import DEFECTS, _unique_reviews, faithful_summary, generate, summarise
from rlhf.data.demo_task import parse_review, rubric, rubric_components


@pytest.fixture(scope="module")
def reviews():
    return _unique_reviews(random.Random(7), 2000)


def test_the_rubric_reads_every_generated_review_back(reviews) -> None:
    assert [parse_review(review.prompt) for review in reviews] == reviews
    assert parse_review("Review: hello there\nSummary:") is None


def test_a_faithful_summary_scores_one_and_each_defect_its_own_component(reviews) -> None:
    review = next(r for r in reviews if len(r.aspects) == 2 and r.aspects[0][1] == "negative")
    (first, _, adjective), (second, _, adjective2) = review.aspects
    other_genre = "western" if review.genre != "western" else "drama"
    overall = {"positive": "great", "negative": "dull", "neutral": "modest"}[review.tone]
    invented = next(a for a in ("plot", "acting", "ending", "script") if a not in (first, second))

    def judge(summary: str) -> dict[str, float]:
        return rubric([review.prompt], [summary])[0]

    faithful = judge(f" A {overall} {review.genre} with {adjective} {first} and {adjective2} {second}.")
    assert faithful == {
        "genre": 1.0,
        "aspect_recall": 1.0,
        "tone": 1.0,
        "no_invention": 1.0,
        "invented": 0.0,
        "repetition": 0.0,
        "score": 1.0,
    }
    wrong_genre = judge(f" A {overall} {other_genre} with {adjective} {first} and {adjective2} {second}.")
    flipped = judge(f" A {overall} {review.genre} with wonderful {first} and {adjective2} {second}.")
    added = judge(f" A {overall} {review.genre} with {adjective} {first}, {adjective2} {second} and great {invented}.")
    dropped = judge(f" A {overall} {review.genre} with {adjective2} {second}.")
    repeated = judge(f" A {overall} {review.genre} with {adjective} {first} and {adjective} {first}.")
    assert wrong_genre["genre"] == 0.0 and wrong_genre["tone"] == 1.0
    assert flipped["tone"] == pytest.approx(2 / 3) and flipped["genre"] == 1.0  # overall + 2 aspects judged
    assert added["invented"] == 1.0 and added["no_invention"] == 0.0
    assert dropped["aspect_recall"] == 0.5 and dropped["no_invention"] == 1.0
    assert repeated["repetition"] > 0
    scores = [case["score"] for case in (wrong_genre, flipped, added, dropped, repeated)]
    assert all(0.0 < score < 1.0 for score in scores)
    # Faithfulness weighs more than completeness: a dropped aspect costs less than a wrong genre or an invented one.
    assert dropped["score"] > max(wrong_genre["score"], added["score"])


def test_the_demo_references_score_well_under_the_rubric(reviews) -> None:
    """The demo's reference summaries name the genre and up to two aspects in their own tone: nothing invented."""
    rng = random.Random(3)
    scores = rubric([r.prompt for r in reviews[:300]], [" " + summarise(r, rng) for r in reviews[:300]])
    assert all(s["genre"] == 1.0 and s["invented"] == 0.0 and s["tone"] == 1.0 for s in scores)
    assert min(s["score"] for s in scores) >= 0.95  # 2 of 3 aspects named at worst


# What the rubric must see in a summary with each defect, and nothing else wrong.
DEFECT_SEEN = {
    "flipped_tone": lambda c: c["tone"] < 1 and c["genre"] == 1 and c["invented"] == 0 and c["aspect_recall"] == 1,
    "wrong_adjective": lambda c: c["tone"] < 1 and c["genre"] == 1 and c["invented"] == 0 and c["aspect_recall"] == 1,
    "wrong_genre": lambda c: c["genre"] == 0 and c["tone"] == 1 and c["invented"] == 0,
    "invented_aspect": lambda c: c["invented"] == 1 and c["tone"] == 1 and c["genre"] == 1 and c["aspect_recall"] == 1,
    "dropped_aspect": lambda c: c["aspect_recall"] == 0.5 and c["invented"] == 0 and c["tone"] == 1,
    "swapped_aspect": lambda c: c["aspect_recall"] == 0.5 and c["invented"] == 1 and c["genre"] == 1,
}


def test_each_defect_spoils_its_own_part_of_a_faithful_summary(reviews) -> None:
    assert set(DEFECT_SEEN) == set(get_args(PairDefect)) > set(DEFECTS)
    two_aspects = [review for review in reviews if len(review.aspects) == 2][:300]
    prompts = [review.prompt for review in two_aspects]
    faithful = rubric(prompts, [" " + faithful_summary(r, random.Random(i)) for i, r in enumerate(two_aspects)])
    assert all(c["score"] == 1.0 for c in faithful)
    for defect, seen in DEFECT_SEEN.items():
        summaries = [" " + faithful_summary(review, random.Random(i), defect) for i, review in enumerate(two_aspects)]
        assert all(seen(c) and c["score"] < 1 for c in rubric(prompts, summaries)), defect
    one_aspect = next(review for review in reviews if len(review.aspects) == 1)
    with pytest.raises(ValueError, match="dropped_aspect"):
        faithful_summary(one_aspect, random.Random(0), "dropped_aspect")


def _rows(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{name}.jsonl").open(encoding="utf-8")]


def test_the_faithful_task_has_defective_sft_data_and_near_minimal_noisy_pairs(tmp_path: Path) -> None:
    sizes = {"corpus_size": 400, "sft_size": 2000, "preference_size": 2000, "rl_prompts": 50, "eval_prompts": 50}
    generate(DemoConfig(task="faithful", seed=5, sft_defect_share=0.3, label_noise=0.05, **sizes), tmp_path)
    texts = {name: [json.dumps(row) for row in _rows(tmp_path, name)] for name in ("corpus", "sft", "preferences")}
    reviews = {
        name: {
            row["prompt"] if "prompt" in row else row["text"].split("\nSummary:")[0] for row in _rows(tmp_path, name)
        }
        for name in ("sft", "preferences", "prompts", "eval_prompts")
    }
    assert not reviews["prompts"] & reviews["eval_prompts"] and not reviews["sft"] & reviews["eval_prompts"]
    assert not reviews["preferences"] & (reviews["prompts"] | reviews["eval_prompts"])

    def faithful_share(rows: list[dict], prompt, answer) -> float:
        scores = rubric([prompt(row) for row in rows], [answer(row) for row in rows])
        # A faithful summary of a three-aspect review recalls two of them: judge the faithfulness components.
        return statistics.fmean(
            s["genre"] == s["tone"] == s["no_invention"] == 1 and s["aspect_recall"] > 0.6 for s in scores
        )

    sft = _rows(tmp_path, "sft")
    assert 0.65 < faithful_share(sft, lambda r: r["prompt"], lambda r: r["completion"]) < 0.75  # 30% have a defect
    corpus = _rows(tmp_path, "corpus")  # corpus_defect_share 0 by default: curated
    split = [row["text"].split("\nSummary:") for row in corpus]
    assert faithful_share(split, lambda r: r[0] + "\nSummary:", lambda r: r[1]) == 1.0

    pairs = _rows(tmp_path, "preferences")
    prompts = [pair["prompt"] for pair in pairs]
    chosen = rubric(prompts, [pair["chosen"] for pair in pairs])
    rejected = rubric(prompts, [pair["rejected"] for pair in pairs])
    agree = statistics.fmean(c["score"] > r["score"] for c, r in zip(chosen, rejected))
    assert 0.93 < agree < 0.97  # label_noise 0.05: that share of labels flipped; no ties
    assert all(c["score"] != r["score"] for c, r in zip(chosen, rejected))
    for pair in pairs:  # near-minimal: the two summaries differ by one defect's words (an aspect: 4 with its "and")
        words = [re.findall(r"\w+", pair[side]) for side in ("chosen", "rejected")]
        changes = [op for op in difflib.SequenceMatcher(None, *words).get_opcodes() if op[0] != "equal"]
        assert sum(max(i2 - i1, j2 - j1) for _, i1, i2, j1, j2 in changes) <= 4, pair

    # Same seed, same bytes; the sentiment task's files are another draw.
    generate(DemoConfig(task="faithful", seed=5, sft_defect_share=0.3, label_noise=0.05, **sizes), tmp_path / "again")
    assert all(
        (tmp_path / "again" / f"{name}.jsonl").read_bytes() == (tmp_path / f"{name}.jsonl").read_bytes()
        for name in texts
    )
    generate(DemoConfig(seed=5, **sizes), tmp_path / "sentiment")
    assert (tmp_path / "sentiment" / "sft.jsonl").read_bytes() != (tmp_path / "sft.jsonl").read_bytes()


def test_annotators_take_prompts_and_responses_or_responses_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_scorers.py").write_text(
        "def by_length(texts):\n    return [float(len(t)) for t in texts]\n"
        "def echo(prompts, responses):\n    return [{'score': 1.0, 'prompt_words': float(len(p.split()))}"
        " for p in prompts]\n"
        "def short(prompts, responses):\n    return [0.0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_annotator("my_scorers:by_length")(["p1", "p2"], ["ab", "abc"]) == [{"score": 2.0}, {"score": 3.0}]
    assert get_annotator("my_scorers:echo")(["a b", "c"], ["x", "y"]) == [
        {"score": 1.0, "prompt_words": 2.0},
        {"score": 1.0, "prompt_words": 1.0},
    ]
    with pytest.raises(ValueError, match="returned 1 scores for 2 responses"):
        get_annotator("my_scorers:short")(["a", "b"], ["x", "y"])
    assert (
        get_annotator("rubric")(
            ["Review: The Red Mirror is a drama. The plot is dull.\nSummary:"], [" A dull drama with dull plot."]
        )[0]["score"]
        == 1.0
    )
    assert get_annotator("vader")(["p"], ["A wonderful film."])[0]["score"] > 0.5
    assert get_annotator("none") is None
    with pytest.raises(ConfigError, match="expected 'rubric', 'vader', 'none' or 'module:function'"):
        get_annotator("gold")
    sys.modules.pop("my_scorers", None)


def _pair_defect(pair: dict) -> str:
    """Which defect a near-minimal pair's worse summary carries, read back by the rubric."""
    review = parse_review(pair["prompt"])
    first, second = (rubric_components(review, pair[side]) for side in ("chosen", "rejected"))
    good, bad = (first, second) if first["score"] > second["score"] else (second, first)
    if bad["genre"] < good["genre"]:
        return "genre"
    if bad["invented"]:
        return "swapped" if bad["aspect_recall"] < good["aspect_recall"] else "invented"
    return "dropped" if bad["aspect_recall"] < good["aspect_recall"] else "tone"


def test_pair_defects_weigh_the_kinds_of_defect_in_the_preference_pairs(tmp_path: Path) -> None:
    sizes = {"corpus_size": 10, "sft_size": 10, "preference_size": 3000, "rl_prompts": 10, "eval_prompts": 10}
    weights = {"wrong_genre": 3.0, "swapped_aspect": 1.0, "flipped_tone": 0.0}
    generate(DemoConfig(task="faithful", pair_defects=weights, **sizes), tmp_path)
    kinds = collections.Counter(_pair_defect(pair) for pair in _rows(tmp_path, "preferences"))
    assert set(kinds) == {"genre", "swapped"}  # a kind of weight 0, or left out, never appears
    assert 0.72 < kinds["genre"] / kinds.total() < 0.78
    for weights, error in (({"dropped_aspect": 1.0}, "other than dropped_aspect"), ({"wrong_genre": -1.0}, ">= 0")):
        with pytest.raises(ValueError, match=error):
            DemoConfig(task="faithful", pair_defects=weights)
