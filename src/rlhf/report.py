"""The evaluation report: Markdown (beside PNG plots) and one self-contained HTML page (plots inlined as data URIs).

Plots: reward-model and gold score distributions of SFT vs PPO answers to the same prompts, and the PPO training
curves. Tables: every metric side by side, the comparisons the gates read, and sample answers.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Fixed colours (matplotlib's first two), so the two models look the same in every plot.
SFT_COLOUR = "#1f77b4"
POLICY_COLOUR = "#ff7f0e"
CURVES = (("objective/scores", "reward-model score"), ("objective/kl", "KL to reference"),
          ("objective/rlhf_reward", "score − KL penalty"), ("objective/entropy", "entropy"))
PER_MODEL = ("rm_score", "gold_score", "kl", "eos_rate", "length", "repetition", "distinct_2")
COMPARISONS = ("win_rate/rm", "win_rate/gold", "rm_gain_in_sft_std", "gold_gain", "rm_accuracy", "rm_pairs",
               "prompts")


def _figure(width: float = 9, height: float = 3.4):
    from matplotlib.figure import Figure  # the Agg canvas, without pyplot's global state or a display

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def score_distributions(policy_rows: Sequence[dict], sft_rows: Sequence[dict]) -> bytes:
    keys = [key for key in ("rm_score", "gold_score") if policy_rows and policy_rows[0][key] is not None]
    figure = _figure()
    for axes, key in zip(figure.subplots(1, len(keys), squeeze=False)[0], keys):
        sft, policy = [row[key] for row in sft_rows], [row[key] for row in policy_rows]
        low, high = min(sft + policy), max(sft + policy)
        bins = [low + (high - low) * i / 20 for i in range(21)] if high > low else 10
        axes.hist(sft, bins=bins, alpha=0.6, color=SFT_COLOUR, label="SFT")
        axes.hist(policy, bins=bins, alpha=0.6, color=POLICY_COLOUR, label="PPO")
        axes.set_title({"rm_score": "reward-model score", "gold_score": "gold score"}[key])
        axes.set_ylabel("answers")
        axes.legend()
    return _png(figure)


def training_curves(history: Sequence[dict[str, float]]) -> bytes:
    curves = [(key, title) for key, title in CURVES if any(key in row for row in history)]
    figure = _figure(9, 2.6 * ((len(curves) + 1) // 2))
    for axes, (key, title) in zip(figure.subplots((len(curves) + 1) // 2, 2, squeeze=False).flat, curves):
        points = [(row["step"], row[key]) for row in history if key in row]
        axes.plot([p[0] for p in points], [p[1] for p in points], color=POLICY_COLOUR)
        axes.set_title(title)
        axes.set_xlabel("PPO step")
    return _png(figure)


def _number(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _tables(metrics: dict[str, float], policy_rows: Sequence[dict], sft_rows: Sequence[dict], sample_rows: int):
    per_model = [[key, _number(metrics.get(f"sft/{key}")), _number(metrics.get(f"policy/{key}"))]
                 for key in PER_MODEL if f"policy/{key}" in metrics]
    comparisons = [[key, _number(metrics[key])] for key in COMPARISONS if key in metrics]
    samples = [
        [sft["prompt"], sft["response"], _number(sft["rm_score"]), _number(sft["gold_score"]),
         policy["response"], _number(policy["rm_score"]), _number(policy["gold_score"])]
        for sft, policy in list(zip(sft_rows, policy_rows))[:sample_rows]
    ]
    return [
        ("Per model", ["metric", "SFT", "PPO"], per_model),
        ("PPO against SFT", ["metric", "value"], comparisons),
        ("Sample answers (same prompt, same seed)",
         ["prompt", "SFT answer", "SFT RM", "SFT gold", "PPO answer", "PPO RM", "PPO gold"], samples),
    ]


def write_report(folder: Path, metrics: dict[str, float], policy_rows: Sequence[dict], sft_rows: Sequence[dict],
                 history: Sequence[dict[str, float]], sample_rows: int) -> list[str]:
    """Writes report.md, report.html and plots/*.png into `folder`; returns the report's file names."""
    plots = {"score_distributions.png": ("Score distributions, SFT vs PPO", score_distributions(policy_rows, sft_rows))}
    if history:
        plots["ppo_training.png"] = ("PPO training curves", training_curves(history))
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    for name, (_, png) in plots.items():
        (folder / "plots" / name).write_bytes(png)
    per_model, comparisons, samples = _tables(metrics, policy_rows, sft_rows, sample_rows)
    # Tables, then plots, then sample answers: the same order in both documents.
    blocks = [per_model, comparisons, *((title, name, png) for name, (title, png) in plots.items()), samples]

    markdown = ["# RLHF evaluation", ""]
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>RLHF evaluation</title><style>",
            "body{font-family:sans-serif;margin:2em;max-width:75em}table{border-collapse:collapse;margin:1em 0}",
            "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}",
            "img{max-width:100%}</style></head><body><h1>RLHF evaluation</h1>"]
    for title, second, third in blocks:
        markdown += [f"## {title}", ""]
        page.append(f"<h2>{html.escape(title)}</h2>")
        if isinstance(third, bytes):  # a plot: (title, file name, PNG)
            markdown += [f"![{title}](plots/{second})", ""]
            page.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{base64.b64encode(third).decode()}'>")
        else:  # a table: (title, header, rows)
            markdown += [_markdown_row(second), "|" + "---|" * len(second), *map(_markdown_row, third), ""]
            page.append(_html_table(second, third))
    page.append("</body></html>")

    (folder / "report.md").write_text("\n".join(markdown), encoding="utf-8")
    (folder / "report.html").write_text("\n".join(page), encoding="utf-8")
    return ["report.md", "report.html", *(f"plots/{name}" for name in plots)]


def _markdown_row(cells: list[str]) -> str:
    # Answers are untrusted text: escaped, so a Markdown viewer that renders HTML shows them and runs nothing.
    return "| " + " | ".join(html.escape(cell).replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
