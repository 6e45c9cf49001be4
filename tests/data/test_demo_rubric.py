"""The demo's rubric gold annotator (`rlhf.data.demo_task.rubric`) and the annotator interface (`rlhf.annotators`).

The rubric reads a generated review's structure back from its text, so it must recover exactly what the generator
drew, for every review; a faithful summary scores 1 and each kind of unfaithfulness lowers its own component.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from rlhf.annotators import get_annotator
from rlhf.config import ConfigError
from rlhf.data.demo import _unique_reviews, summarise
from rlhf.data.demo_task import parse_review, rubric


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
    assert faithful == {"genre": 1.0, "aspect_recall": 1.0, "tone": 1.0, "no_invention": 1.0, "invented": 0.0,
                        "repetition": 0.0, "score": 1.0}
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


def test_annotators_take_prompts_and_responses_or_responses_alone(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_scorers.py").write_text(
        "def by_length(texts):\n    return [float(len(t)) for t in texts]\n"
        "def echo(prompts, responses):\n    return [{'score': 1.0, 'prompt_words': float(len(p.split()))}"
        " for p in prompts]\n"
        "def short(prompts, responses):\n    return [0.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_annotator("my_scorers:by_length")(["p1", "p2"], ["ab", "abc"]) == [{"score": 2.0}, {"score": 3.0}]
    assert get_annotator("my_scorers:echo")(["a b", "c"], ["x", "y"]) == [
        {"score": 1.0, "prompt_words": 2.0}, {"score": 1.0, "prompt_words": 1.0}]
    with pytest.raises(ValueError, match="returned 1 scores for 2 responses"):
        get_annotator("my_scorers:short")(["a", "b"], ["x", "y"])
    assert get_annotator("rubric")(["Review: The Red Mirror is a drama. The plot is dull.\nSummary:"],
                                   [" A dull drama with dull plot."])[0]["score"] == 1.0
    assert get_annotator("vader")(["p"], ["A wonderful film."])[0]["score"] > 0.5
    assert get_annotator("none") is None
    with pytest.raises(ConfigError, match="expected 'rubric', 'vader', 'none' or 'module:function'"):
        get_annotator("gold")
    sys.modules.pop("my_scorers", None)
