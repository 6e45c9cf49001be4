"""The evaluation report and the decision page: Markdown (beside PNG plots) and self-contained HTML (plots inlined
as data URIs).

The evaluation report (`rlhf evaluate`) is the evidence, for the people who decide whether the policy ships: the
comparisons with SFT with their 95% intervals, then plots (score distributions; gold and reward-model score against
KL through PPO, where over-optimisation shows; the training curves), the models' identities (runs, commit, data) and
the answers, flagged ones first (tone flipped, genre changed, aspect invented, repetition, from the gold annotator's
components). The decision page (`rlhf register`, after the gates) is the decision: the gates' verdicts as the gate
steps wrote them, the registered champion beside the policy, and what was registered.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Fixed colours (matplotlib's first two), so the two models look the same in every plot.
SFT_COLOUR = "#1f77b4"
POLICY_COLOUR = "#ff7f0e"
GOLD_COLOUR = "#2ca02c"
CURVES = (
    ("objective/scores", "reward-model score"),
    ("objective/kl", "KL to reference"),
    ("objective/rlhf_reward", "score − KL penalty"),
    ("objective/entropy", "entropy"),
)
PER_MODEL = ("rm_score", "gold_score", "kl", "eos_rate", "length", "repetition", "distinct_2")
COMPARISONS = (
    "win_rate/rm",
    "win_rate/gold",
    "rm_gain_in_sft_std",
    "gold_gain",
    "gold_drop_while_rm_rose",
    "best_of_n/gold_gain",
    "best_of_n/win_rate/gold",
    "rm_accuracy",
    "rm_pairs",
    "prompts",
)
# What makes an answer unfaithful, from the gold annotator's components (the demo rubric's), and the repetition.
FLAGS = (
    ("genre changed", lambda row: row["gold"].get("genre", 1.0) < 1.0),
    ("tone flipped", lambda row: row["gold"].get("tone", 1.0) < 1.0),
    ("aspect invented", lambda row: row["gold"].get("invented", 0.0) > 0),
    ("repetition", lambda row: row["repetition"] > 0),
)


@dataclass
class Decision:
    """What the decision page shows: the gates' verdicts (as `rlhf.gates` writes them), what is known of the
    champion the policy would replace, and what the registry did with each model."""

    verdicts: list[dict[str, Any]] = field(default_factory=list)
    champion_note: str = ""  # e.g. "none yet"
    champion_rows: list[list[str]] = field(default_factory=list)  # [what, champion, this policy]
    registered_rows: list[list[str]] = field(default_factory=list)  # [model, version, outcome]


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


def overoptimisation_curve(history: Sequence[dict[str, float]]) -> bytes | None:
    """Gold and reward-model score of the held-out answers against √KL through PPO, as in Gao et al. 2022: the proxy
    climbing while gold turns down is over-optimisation. None without held-out points."""
    points = [row for row in history if "heldout/rm_score" in row]
    if len(points) < 2:
        return None
    distance = [max(row.get("heldout/kl", 0.0), 0.0) ** 0.5 for row in points]
    figure = _figure(9, 3.4)
    proxy_axes = figure.subplots()
    proxy_axes.plot(
        distance, [row["heldout/rm_score"] for row in points], "o-", color=POLICY_COLOUR, label="reward model (proxy)"
    )
    proxy_axes.set_xlabel("√KL to the SFT model (nats), held-out prompts")
    proxy_axes.set_ylabel("reward-model score", color=POLICY_COLOUR)
    if any("heldout/gold_score" in row for row in points):
        gold_axes = proxy_axes.twinx()
        gold_axes.plot(
            distance, [row.get("heldout/gold_score") for row in points], "s-", color=GOLD_COLOUR, label="gold"
        )
        gold_axes.set_ylabel("gold score", color=GOLD_COLOUR)
    for x, row in zip(distance, points):
        proxy_axes.annotate(
            f"step {row['step']}", (x, row["heldout/rm_score"]), fontsize=7, textcoords="offset points", xytext=(2, 4)
        )
    proxy_axes.set_title("Over-optimisation check: gold and proxy against KL through PPO")
    figure.legend(loc="lower right")
    return _png(figure)


def _number(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _interval(metrics: dict[str, float], key: str) -> str:
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    return "–" if low is None or high is None else f"[{low:.3g}, {high:.3g}]"


def flags(row: dict) -> list[str]:
    row = {**row, "gold": row.get("gold") or {}}
    return [name for name, test in FLAGS if test(row)]


def _verdict_rows(verdicts: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for verdict in verdicts:
        for check in verdict["checks"] or [{"check": "not run", "status": "fail"}]:
            value = _number(check.get("value")) + (
                f" (measured {check['measured']:.4g})" if "measured" in check else ""
            )
            rows.append(
                [
                    verdict["gate"],
                    check["check"],
                    check.get("metric", ""),
                    value,
                    f"{check.get('op', '')} {_number(check.get('threshold'))}",
                    check["status"].upper() if check["status"] in ("pass", "fail") else check.get("reason", ""),
                ]
            )
    return rows


def _tables(
    metrics: dict[str, float],
    policy_rows: Sequence[dict],
    sft_rows: Sequence[dict],
    sample_rows: int,
    identity_rows: Sequence[dict[str, str]],
):
    components = sorted(key.removeprefix("policy/") for key in metrics if key.startswith("policy/gold/"))
    # Best-of-n by the reward model, where evaluated: what PPO should beat for its KL.
    best = [f"SFT best of {metrics['best_of_n/n']:.0f} by RM"] if "best_of_n/n" in metrics else []
    per_model = [
        [
            key,
            _number(metrics.get(f"sft/{key}")),
            _number(metrics.get(f"policy/{key}")),
            *([_number(metrics.get(f"best_of_n/{key}"))] if best else []),
        ]
        for key in (*PER_MODEL, *components)
        if f"policy/{key}" in metrics
    ]
    comparisons = [[key, _number(metrics[key]), _interval(metrics, key)] for key in COMPARISONS if key in metrics]
    paired = [(", ".join(flags(policy)), sft, policy) for sft, policy in zip(sft_rows, policy_rows)]
    flagged = [row for row in paired if row[0]]
    ordered = flagged + [row for row in paired if not row[0]]
    # Every flagged answer up to three times `sample_rows`, and at least `sample_rows` rows.
    samples = [
        [
            flag or "–",
            sft["prompt"],
            sft["response"],
            _number(sft["gold_score"]),
            policy["response"],
            _number(policy["rm_score"]),
            _number(policy["gold_score"]),
        ]
        for flag, sft, policy in ordered[: max(sample_rows, min(len(flagged), 3 * sample_rows))]
    ]
    identity_header = ["model", "MLflow run", "commit", "data (sha256)"]
    identities = [[row.get(key, "–") for key in ("model", "mlflow", "commit", "data")] for row in identity_rows]
    return {
        "per_model": ("Per model (held-out prompts, same sampling seed)", ["metric", "SFT", "PPO", *best], per_model),
        "comparisons": ("PPO against SFT", ["metric", "value", "95% interval"], comparisons),
        "identities": ("Identities", identity_header, identities),
        "samples": (
            f"Answers, flagged first ({len(flagged)} of {len(paired)} PPO answers flagged)",
            ["flags", "prompt", "SFT answer", "SFT gold", "PPO answer", "PPO RM", "PPO gold"],
            samples,
        ),
    }


def write_report(
    folder: Path,
    metrics: dict[str, float],
    policy_rows: Sequence[dict],
    sft_rows: Sequence[dict],
    history: Sequence[dict[str, float]],
    sample_rows: int,
    identities: Sequence[dict[str, str]] = (),
) -> list[str]:
    """Writes report.md, report.html and plots/*.png into `folder`; returns the report's file names."""
    plots = {"score_distributions.png": ("Score distributions, SFT vs PPO", score_distributions(policy_rows, sft_rows))}
    curve = overoptimisation_curve(history)
    if curve:
        plots["overoptimisation.png"] = ("Gold and proxy against KL through PPO", curve)
    if any(key in row for row in history for key, _ in CURVES):
        plots["ppo_training.png"] = ("PPO training curves", training_curves(history))
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    for name, (_, png) in plots.items():
        (folder / "plots" / name).write_bytes(png)
    tables = _tables(metrics, policy_rows, sft_rows, sample_rows, identities)
    # The comparisons first, then the plots, who the models are, and the answers.
    blocks = [tables["per_model"], tables["comparisons"]]
    blocks += [(title, name, png) for name, (title, png) in plots.items()]
    blocks += [tables[name] for name in ("identities", "samples") if tables[name][2] or name == "samples"]
    _write_pages(folder, "report", "RLHF evaluation", blocks)
    return ["report.md", "report.html", *(f"plots/{name}" for name in plots)]


def write_decision(folder: Path, decision: Decision) -> list[str]:
    """Writes decision.md and decision.html into `folder`: the verdicts, the champion, what was registered."""
    blocks = [
        (
            "Gate verdicts",
            ["gate", "check", "metric", "value", "threshold", "verdict"],
            _verdict_rows(decision.verdicts),
        ),
        (
            f"Against the champion: {decision.champion_note}",
            ["", "champion", "this PPO policy"],
            decision.champion_rows,
        ),
    ]
    if decision.registered_rows:
        blocks.append(("Registered", ["model", "version", "outcome"], decision.registered_rows))
    _write_pages(folder, "decision", "RLHF decision", blocks)
    return ["decision.md", "decision.html"]


def _write_pages(folder: Path, stem: str, title: str, blocks: Sequence[tuple]) -> None:
    """`<stem>.md` and `<stem>.html`: a heading, then each block: a table (title, header, rows) or a plot (title,
    file name under plots/, PNG)."""
    markdown = [f"# {title}", ""]
    page = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:75em}table{border-collapse:collapse;margin:1em 0}",
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}",
        "td.PASS{background:#e3f4e1}td.FAIL{background:#fbe0dc}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, second, third in blocks:
        markdown += [f"## {heading}", ""]
        page.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(third, bytes):  # a plot: (title, file name, PNG)
            markdown += [f"![{heading}](plots/{second})", ""]
            page.append(
                f"<img alt='{html.escape(heading)}' src='data:image/png;base64,{base64.b64encode(third).decode()}'>"
            )
        elif third:  # a table: (title, header, rows)
            markdown += [_markdown_row(second), "|" + "---|" * len(second), *map(_markdown_row, third), ""]
            page.append(_html_table(second, third))
    page.append("</body></html>")
    (folder / f"{stem}.md").write_text("\n".join(markdown), encoding="utf-8")
    (folder / f"{stem}.html").write_text("\n".join(page), encoding="utf-8")


def _markdown_row(cells: list[str]) -> str:
    # Answers are untrusted text: escaped, so a Markdown viewer that renders HTML shows them and runs nothing.
    return "| " + " | ".join(html.escape(cell).replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    # A verdict cell is coloured by its class (PASS, FAIL).
    body = "".join(
        "<tr>"
        + "".join(f"<td class='{cell if cell in ('PASS', 'FAIL') else ''}'>{html.escape(cell)}</td>" for cell in row)
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"
