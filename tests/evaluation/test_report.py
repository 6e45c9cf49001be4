"""The evaluation report (`rlhf.report.write_report`): Markdown with PNG plots, and one self-contained HTML page.

The rows are synthetic, shaped like `rlhf.evaluation.sample_and_score`'s, so no model is needed. The last tests render
the HTML page in headless Chromium (the issue's acceptance: "the HTML report renders its plots in headless Chromium")
and look for the two models' colours in the screenshot.
"""

from __future__ import annotations

import base64
import io
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from rlhf.evaluation import compare
from rlhf.measures import repetition
from rlhf.report import POLICY_COLOUR, SFT_COLOUR, write_report

SAMPLE_ROWS = 5
DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def make_rows(n: int, mean: float, seed: int, gold: bool = True) -> list[dict[str, Any]]:
    """n answers with reward-model scores around `mean` (and gold scores, unless gold=False)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        response = f" A {rng.choice(['great', 'dull', 'fine'])} film number {i}."
        rows.append(
            {
                "prompt": f"Review {i}: a film. Summary:",
                "response": response,
                "rm_score": rng.gauss(mean, 1.0),
                "gold_score": rng.uniform(-1, 1) if gold else None,
                "kl": abs(rng.gauss(mean, 0.5)),
                "eos": rng.random() < 0.9,
                "length": len(response.split()),
                "repetition": repetition(response),
            }
        )
    return rows


def make_history(steps: int = 12) -> list[dict[str, float]]:
    return [
        {
            "step": step,
            "objective/scores": 0.3 * step,
            "objective/kl": 0.1 * step,
            "objective/rlhf_reward": 0.25 * step,
            "objective/entropy": 3.0 - 0.1 * step,
        }
        for step in range(1, steps + 1)
    ]


def build(
    folder: Path,
    gold: bool = True,
    history: bool = True,
    policy_rows: list[dict] | None = None,
    sft_rows: list[dict] | None = None,
) -> list[str]:
    """A report on 30 prompts: SFT scores around 0, PPO around 3."""
    policy_rows = policy_rows or make_rows(30, 3.0, seed=1, gold=gold)
    sft_rows = sft_rows or make_rows(30, 0.0, seed=2, gold=gold)
    metrics = compare(policy_rows, sft_rows) | {"rm_accuracy": 0.9, "rm_pairs": 24.0}
    return write_report(folder, metrics, policy_rows, sft_rows, make_history() if history else [], SAMPLE_ROWS)


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(payload, validate=True) for payload in DATA_URI.findall(page)]


def section(markdown: str, title: str) -> str:
    """The body of the `## title…` section of the Markdown report (a title that starts with `title`)."""
    return markdown.split(f"## {title}", 1)[1].split("\n", 1)[1].split("\n## ", 1)[0]


# --------------------------------------------------------------------------------------------- files and tables


def test_report_files_and_markdown_links(tmp_path: Path) -> None:
    from PIL import Image

    names = build(tmp_path)
    assert names == ["report.md", "report.html", "plots/score_distributions.png", "plots/ppo_training.png"]
    for name in names:
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name

    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]+\]\((plots/[^)]+)\)", markdown)
    assert links == ["plots/score_distributions.png", "plots/ppo_training.png"]
    for link in links:
        with Image.open(tmp_path / link) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 200

    # Both tables of metrics, with the values of the metrics dict.
    per_model = section(markdown, "Per model")
    assert "| metric | SFT | PPO |" in per_model
    for key in ("rm_score", "gold_score", "kl", "eos_rate", "length", "repetition", "distinct_2"):
        assert re.search(rf"^\| {key} \| [-\d.e]+ \| [-\d.e]+ \|$", per_model, re.M), key
    comparisons = section(markdown, "PPO against SFT")
    for key in ("win_rate/rm", "win_rate/gold", "rm_gain_in_sft_std", "gold_gain", "rm_pairs", "prompts"):
        assert f"| {key} |" in comparisons, key
    assert "| rm_accuracy | 0.9 |" in comparisons and "| prompts | 30 |" in comparisons
    # The sample table has `sample_rows` rows, the first prompt first.
    samples = section(markdown, "Answers, flagged first")
    rows = [line for line in samples.splitlines() if line.startswith("| – | Review")]  # none flagged
    assert len(rows) == SAMPLE_ROWS and rows[0].startswith("| – | Review 0: a film. Summary: |")


def test_html_is_self_contained(tmp_path: Path) -> None:
    """Nothing external: every src/href is a data: URI, and the inlined PNGs are the plots (decodable, not blank)."""
    from PIL import Image

    build(tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")

    references = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, re.I)
    assert references and all(ref.startswith("data:") for ref in references), references[:5]
    assert not re.search(r"<(?:link|script|iframe|object)\b", page, re.I)
    assert "url(" not in page and "@import" not in page
    assert "plots/" not in page  # the page does not lean on the PNG files beside it

    pngs = embedded_pngs(page)
    assert len(pngs) == 2
    assert pngs[0] == (tmp_path / "plots" / "score_distributions.png").read_bytes()
    assert pngs[1] == (tmp_path / "plots" / "ppo_training.png").read_bytes()
    for png in pngs:
        with Image.open(io.BytesIO(png)) as image:
            image.load()
            assert image.width >= 600 and image.height >= 200
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert len(colours) > 50  # drawn on, not a blank canvas


def test_sample_answers_are_escaped_in_html(tmp_path: Path) -> None:
    """Model output is untrusted text: markup in an answer shows as text and never runs."""
    policy = make_rows(30, 3.0, seed=1)
    policy[0]["response"] = ' <script>alert("pwned")</script> <img src=x onerror=alert(1)>'
    sft = make_rows(30, 0.0, seed=2)
    sft[0]["prompt"] = policy[0]["prompt"] = "Review & <b>bold</b> claims. Summary:"
    build(tmp_path, policy_rows=policy, sft_rows=sft)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")

    assert "<script" not in page and "<img src=x" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "Review &amp; &lt;b&gt;bold&lt;/b&gt; claims." in page


def test_markdown_table_cells_stay_in_their_column(tmp_path: Path) -> None:
    """A `|` or a newline in an answer must not split or end its Markdown table row."""
    policy = make_rows(30, 3.0, seed=1)
    policy[0]["response"] = " good | bad\nsecond line"
    build(tmp_path, policy_rows=policy)
    samples = section((tmp_path / "report.md").read_text(encoding="utf-8"), "Answers, flagged first")
    [row] = [line for line in samples.splitlines() if "| Review 0:" in line]
    assert "good \\| bad second line" in row
    assert len(re.findall(r"(?<!\\)\|", row)) == 8  # 7 cells


def test_without_gold_scores_there_is_no_gold_plot_or_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No gold annotator: the distribution plot has only the reward-model panel, the tables no gold rows."""
    import rlhf.report

    figures: list[Any] = []
    make_figure = rlhf.report._figure
    monkeypatch.setattr(rlhf.report, "_figure", lambda *args: figures.append(make_figure(*args)) or figures[-1])

    build(tmp_path / "gold", history=False)
    build(tmp_path / "no-gold", gold=False, history=False)

    with_gold, without_gold = ([axes.get_title() for axes in figure.axes] for figure in figures)
    assert with_gold == ["reward-model score", "gold score"]
    assert without_gold == ["reward-model score"]
    markdown = (tmp_path / "no-gold" / "report.md").read_text(encoding="utf-8")
    assert "| gold_score |" not in markdown
    assert "| win_rate/gold |" not in markdown and "| gold_gain |" not in markdown
    assert "| rm_score |" in markdown and "| win_rate/rm |" in markdown
    assert "| gold_score |" in (tmp_path / "gold" / "report.md").read_text(encoding="utf-8")


def test_without_history_there_is_no_training_plot(tmp_path: Path) -> None:
    names = build(tmp_path, history=False)
    assert "plots/ppo_training.png" not in names
    assert not (tmp_path / "plots" / "ppo_training.png").exists()
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "PPO training curves" not in markdown and "ppo_training.png" not in markdown
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "PPO training curves" not in page and len(embedded_pngs(page)) == 1


# ----------------------------------------------------------------------------------------- colour arithmetic


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def blend(hex_colour: str, alpha: float) -> tuple[int, int, int]:
    """The colour over a white page at `alpha`."""
    return tuple(round(alpha * c + (1 - alpha) * 255) for c in rgb(hex_colour))  # type: ignore[return-value]


def close(pixel: tuple[int, ...], target: tuple[int, int, int], tolerance: int = 10) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel[:3], target))


# The histograms draw both models at alpha 0.6 (so SFT shows only blended); the training curves draw PPO at full.
BAR = {SFT_COLOUR: blend(SFT_COLOUR, 0.6), POLICY_COLOUR: blend(POLICY_COLOUR, 0.6)}


def test_plots_use_the_fixed_model_colours(tmp_path: Path) -> None:
    """SFT blue and PPO orange in the distributions; the PPO training curves in PPO orange."""
    from PIL import Image

    build(tmp_path)
    counts = colour_counts(Image.open(tmp_path / "plots" / "score_distributions.png"))
    assert counts["sft_bar"] > 500 and counts["policy_bar"] > 500, counts
    curves = colour_counts(Image.open(tmp_path / "plots" / "ppo_training.png"))
    assert curves["policy_line"] > 200 and curves["sft_bar"] == 0, curves


def colour_counts(image) -> dict[str, int]:
    pixels = list(image.convert("RGB").getdata())
    targets = {"sft_bar": BAR[SFT_COLOUR], "policy_bar": BAR[POLICY_COLOUR], "policy_line": rgb(POLICY_COLOUR)}
    return {name: sum(close(pixel, target) for pixel in pixels) for name, target in targets.items()}


# ---------------------------------------------------------------------------------------------- Chromium


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed: CI must install it (.ci/run installs Debian's package)")
    pytest.skip("chromium is not installed")


def screenshot(page: Path, folder: Path) -> Any:
    """The page rendered by headless Chromium, as a PIL image."""
    from PIL import Image

    png = folder / f"{page.stem}.png"
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={folder / f'profile-{page.stem}'}",
        "--window-size=1200,2600",
        f"--screenshot={png}",
        page.resolve().as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert png.is_file(), f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
    image = Image.open(png)
    image.load()
    return image


@pytest.mark.slow  # ~20 s: two Chromium start-ups
def test_html_report_renders_its_plots_in_headless_chromium(tmp_path: Path) -> None:
    """Both models' colours show in the rendered page; with the data URIs broken (negative control) they do not."""
    report = tmp_path / "report"
    build(report)
    page = (report / "report.html").read_text(encoding="utf-8")
    broken = tmp_path / "broken.html"
    broken.write_text(DATA_URI.sub("data:image/png;base64,bm90IGEgcG5n", page), encoding="utf-8")
    # Rendered from elsewhere, so the plots/ folder beside the report cannot be what shows.
    isolated = tmp_path / "isolated.html"
    shutil.copy(report / "report.html", isolated)

    rendered = colour_counts(screenshot(isolated, tmp_path))
    # Measured: ~40,000 pixels of each bar colour and ~1,900 of the curves' orange at 1200 px wide.
    assert rendered["sft_bar"] > 10_000, rendered
    assert rendered["policy_bar"] > 10_000, rendered
    assert rendered["policy_line"] > 500, rendered  # the training curves

    control = colour_counts(screenshot(broken, tmp_path))
    assert control == {"sft_bar": 0, "policy_bar": 0, "policy_line": 0}, control


# ------------------------------------------------------------------------------------------ the decision sections


def test_flagged_answers_come_first_naming_what_is_wrong(tmp_path: Path) -> None:
    """PPO answers the gold annotator's components call unfaithful (genre, tone, invented aspect, repetition) lead
    the answers table, each with its flags; the rest follow in prompt order."""
    policy = make_rows(30, 3.0, seed=1)
    for row in policy:
        row["gold"] = {"genre": 1.0, "tone": 1.0, "invented": 0.0}
    policy[7]["gold"] = {"genre": 0.0, "tone": 0.5, "invented": 0.0}
    policy[12]["gold"]["invented"] = 2.0
    policy[20] |= {"response": " great plot and great plot", "repetition": repetition(" great plot and great plot")}
    build(tmp_path, policy_rows=policy)
    samples = section((tmp_path / "report.md").read_text(encoding="utf-8"), "Answers, flagged first")
    rows = [line for line in samples.splitlines() if "| Review" in line]
    assert [row.split(" | ")[0] for row in rows[:4]] == [
        "| genre changed, tone flipped",
        "| aspect invented",
        "| repetition",
        "| –",
    ]
    assert "Review 7:" in rows[0] and "Review 12:" in rows[1] and "Review 20:" in rows[2] and "Review 0:" in rows[3]
    assert "(3 of 30 PPO answers flagged)" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_identities_and_intervals_are_in_the_report_and_no_verdict(tmp_path: Path) -> None:
    """The evaluation report is the evidence: who the models are, each gain with its interval; the verdicts are the
    gate steps' and go on the decision page."""
    policy_rows, sft_rows = make_rows(30, 3.0, seed=1), make_rows(30, 0.0, seed=2)
    metrics = compare(policy_rows, sft_rows)
    identity = {"model": "PPO policy: models/ppo", "mlflow": "0123abcd", "commit": "deadbeef0123", "data": "prompts 9f"}
    write_report(tmp_path, metrics, policy_rows, sft_rows, [], SAMPLE_ROWS, [identity])
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    titles = re.findall(r"^## (.+)$", markdown, re.M)
    assert titles[:2] == ["Per model (held-out prompts, same sampling seed)", "PPO against SFT"]
    assert not any("verdict" in title.lower() or "champion" in title.lower() for title in titles), titles
    assert "| PPO policy: models/ppo | 0123abcd | deadbeef0123 | prompts 9f |" in section(markdown, "Identities")
    low, high = metrics["gold_gain_ci_low"], metrics["gold_gain_ci_high"]
    assert f"| gold_gain | {metrics['gold_gain']:.4g} | [{low:.3g}, {high:.3g}] |" in section(
        markdown, "PPO against SFT"
    )


def test_the_decision_page_shows_verdicts_the_champion_and_what_was_registered(tmp_path: Path) -> None:
    from rlhf.report import Decision, write_decision

    verdict = {
        "gate": "evaluation",
        "passed": False,
        "failed_checks": ["max_kl"],
        "checks": [
            {"check": "max_kl", "metric": "policy/kl", "threshold": 6.0, "op": "<=", "value": 7.5, "status": "fail"},
            {
                "check": "min_win_rate_rm",
                "metric": "win_rate/rm",
                "threshold": 0.6,
                "op": ">=",
                "value": 0.8,
                "measured": 0.9,
                "status": "pass",
            },
        ],
    }
    names = write_decision(
        tmp_path,
        Decision(
            verdicts=[verdict],
            champion_note="rlhf-policy v3; this policy does not replace it",
            champion_rows=[["score (gold_score)", "0.81", "0.77"], ["gates", "passed", "failed"]],
            registered_rows=[["rlhf-policy", "4", "new version; candidate only"]],
        ),
    )
    assert names == ["decision.md", "decision.html"]
    markdown = (tmp_path / "decision.md").read_text(encoding="utf-8")
    titles = re.findall(r"^## (.+)$", markdown, re.M)
    assert titles == [
        "Gate verdicts",
        "Against the champion: rlhf-policy v3; this policy does not replace it",
        "Registered",
    ]
    assert (
        "|  | champion | this PPO policy |\n|---|---|---|\n| score (gold_score) | 0.81 | 0.77 |\n"
        "| gates | passed | failed |"
    ) in section(markdown, "Against the champion")
    verdicts = section(markdown, "Gate verdicts")
    assert "| evaluation | max_kl | policy/kl | 7.5 | &lt;= 6 | FAIL |" in verdicts  # escaped: shown as <=
    assert "| evaluation | min_win_rate_rm | win_rate/rm | 0.8 (measured 0.9) | &gt;= 0.6 | PASS |" in verdicts
    assert "| rlhf-policy | 4 | new version; candidate only |" in section(markdown, "Registered")
    assert "<td class='FAIL'>FAIL</td>" in (tmp_path / "decision.html").read_text(encoding="utf-8")


def test_overoptimisation_plot_from_the_held_out_curve(tmp_path: Path) -> None:
    """With held-out points in PPO's history, the report plots gold and proxy against √KL."""
    history = make_history() + [{"step": 0, "heldout/rm_score": 0.0, "heldout/gold_score": 0.3, "heldout/kl": 0.0}]
    for step, (rm, gold) in ((4, (1.0, 0.6)), (8, (2.0, 0.5)), (12, (3.0, 0.4))):
        history[step - 1] |= {"heldout/rm_score": rm, "heldout/gold_score": gold, "heldout/kl": step / 4}
    policy_rows, sft_rows = make_rows(30, 3.0, seed=1), make_rows(30, 0.0, seed=2)
    names = write_report(tmp_path, compare(policy_rows, sft_rows), policy_rows, sft_rows, history, SAMPLE_ROWS)
    assert names == [
        "report.md",
        "report.html",
        "plots/score_distributions.png",
        "plots/overoptimisation.png",
        "plots/ppo_training.png",
    ]
    assert len(embedded_pngs((tmp_path / "report.html").read_text(encoding="utf-8"))) == 3
