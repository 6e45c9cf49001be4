"""Held-out evaluation shared by the PPO stage's closing check and `rlhf evaluate`.

Every model answers the same prompts under the same sampling seed; each answer is scored by the reward model and the
gold annotator, with its KL to the reference model, whether it ended with EOS, its length and its bigram repetition.
Summaries and the policy-vs-SFT comparison (gains, win rates) are computed from those rows.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from rlhf.chat import Prompt, display, format_prompt
from rlhf.measures import distinct_2, mean_interval, repetition, wilson_interval
from rlhf.modeling import stop_token_ids
from rlhf.sampling import ReferenceLogits, rollout, score, with_model_sampling


@torch.no_grad()
def sample_and_score(
    policy,
    reference_logits: ReferenceLogits,
    tokenizer,
    reward_model,
    reward_tokenizer,
    prompts: Sequence[Prompt],
    sampling,
    batch_size: int,
    annotator,
    device,
) -> list[dict[str, Any]]:
    """One sampled answer per prompt (seeded by `sampling.seed`), scored; one row per prompt.

    Prompts are as in the data (text or messages). `sampling` carries seed, max_new_tokens, temperature, top_k and
    top_p (null: the policy's generation_config); `reference_logits(ids, attention, positions)` gives the reference
    model's logits for the KL.
    """
    rows: list[dict[str, Any]] = []
    sampling = with_model_sampling(sampling, policy)
    stop_ids = stop_token_ids(policy, tokenizer)

    def forward(input_ids, attention_mask, position_ids):
        return policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits, None

    torch.manual_seed(sampling.seed)
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        answers = rollout(
            policy,
            forward,
            reference_logits,
            tokenizer,
            [format_prompt(prompt, tokenizer) for prompt in batch],
            batch,
            reward_model,
            reward_tokenizer,
            sampling,
            device,
            stop_ids,
        )
        samples = answers.samples
        kls = (answers.logprobs - answers.ref_logprobs).sum(1).tolist()
        rm_scores = answers.scores.tolist()
        shown = [display(prompt) for prompt in batch]
        gold = annotator(shown, samples.texts) if annotator else [{}] * len(batch)
        for i, prompt in enumerate(shown):
            rows.append(
                {
                    "prompt": prompt,
                    "response": samples.texts[i],
                    "rm_score": rm_scores[i],
                    "gold_score": gold[i].get("score"),
                    "gold": {key: value for key, value in gold[i].items() if key != "score"},
                    "kl": kls[i],
                    "eos": bool(samples.ends_with_eos[i]),
                    "length": int(samples.mask[i].sum()),
                    "repetition": repetition(samples.texts[i]),
                }
            )
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    rm_scores = [row["rm_score"] for row in rows]
    summary = {
        "rm_score": statistics.fmean(rm_scores),
        "rm_score_std": statistics.pstdev(rm_scores),
        "kl": statistics.fmean(row["kl"] for row in rows),
        "eos_rate": statistics.fmean(float(row["eos"]) for row in rows),
        "length": statistics.fmean(row["length"] for row in rows),
        "repetition": statistics.fmean(row["repetition"] for row in rows),
        "distinct_2": distinct_2([row["response"] for row in rows]),
    }
    if rows and rows[0]["gold_score"] is not None:
        summary["gold_score"] = statistics.fmean(row["gold_score"] for row in rows)
        # The annotator's components (the demo rubric's genre, tone, invented, …), where every answer has them.
        components = set.intersection(*(set(row.get("gold") or ()) for row in rows))
        summary |= {f"gold/{key}": statistics.fmean(row["gold"][key] for row in rows) for key in sorted(components)}
    return summary


def best_of_n(samples: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per prompt, the answer the reward model scores highest among n samples: `samples` holds one list of
    `sample_and_score` rows per sampling seed, in the same prompt order."""
    return [max(answers, key=lambda row: row["rm_score"]) for answers in zip(*samples, strict=True)]


def best_of_n_metrics(
    best_rows: Sequence[dict[str, Any]], sft_rows: Sequence[dict[str, Any]], n: int, confidence: float = 0.95
) -> dict[str, float]:
    """`best_of_n/…`: the best-of-n answers' summary and gains over SFT's own sample, as `compare` gives PPO's. Its
    `kl` is best-of-n sampling's KL to the SFT model, log n - (n - 1)/n nats (Stiennon et al. 2020): each answer is
    an SFT sample, so its own log-ratio is 0."""
    stats = compare(best_rows, sft_rows, confidence)
    kept = {
        key.removeprefix("policy/"): value
        for key, value in stats.items()
        if not key.startswith("sft/") and key != "prompts"
    }
    return {f"best_of_n/{key}": value for key, value in kept.items()} | {
        "best_of_n/n": float(n),
        "best_of_n/kl": math.log(n) - (n - 1) / n,
    }


def win_rate(challenger: Sequence[float], baseline: Sequence[float]) -> float:
    """How often the challenger's answer to a prompt beats the baseline's; a tie counts half."""
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(challenger, baseline, strict=True))
    return wins / len(baseline)


def compare(
    policy_rows: Sequence[dict[str, Any]], sft_rows: Sequence[dict[str, Any]], confidence: float = 0.95
) -> dict[str, float]:
    """Summaries of both models (`policy/…`, `sft/…`), the policy's gains over SFT and its win rates, each gain and
    rate with its interval at `confidence` (`…_ci_low`, `…_ci_high`)."""
    policy, sft = summarize(policy_rows), summarize(sft_rows)
    stats = {f"policy/{key}": value for key, value in policy.items()}
    stats |= {f"sft/{key}": value for key, value in sft.items()}
    n = len(policy_rows)
    sft_std = max(sft["rm_score_std"], 1e-8)
    gains = {"rm_gain_in_sft_std": [(p["rm_score"] - s["rm_score"]) / sft_std for p, s in zip(policy_rows, sft_rows)]}
    rates = {"win_rate/rm": win_rate([r["rm_score"] for r in policy_rows], [r["rm_score"] for r in sft_rows])}
    if "gold_score" in policy:
        gains["gold_gain"] = [p["gold_score"] - s["gold_score"] for p, s in zip(policy_rows, sft_rows)]
        rates["win_rate/gold"] = win_rate([r["gold_score"] for r in policy_rows], [r["gold_score"] for r in sft_rows])
    for key, differences in gains.items():
        stats[key] = statistics.fmean(differences)
        stats[f"{key}_ci_low"], stats[f"{key}_ci_high"] = mean_interval(differences, confidence)
    for key, rate in rates.items():
        stats[key] = rate
        stats[f"{key}_ci_low"], stats[f"{key}_ci_high"] = wilson_interval(rate, n, confidence)
    stats["prompts"] = float(n)
    return stats


def overoptimisation(history: Sequence[dict[str, float]]) -> dict[str, float]:
    """Over-optimisation on the held-out prompts through PPO (Gao et al. 2022): how far the gold score fell from its
    peak by the end while the reward model's score rose. `gold_drop_while_rm_rose` is 0 when gold did not fall or the
    proxy fell with it; empty without held-out points or gold."""
    points = [row for row in history if "heldout/gold_score" in row]
    if len(points) < 2:
        return {}
    peak = max(points, key=lambda row: row["heldout/gold_score"])
    final = points[-1]
    gold_drop = peak["heldout/gold_score"] - final["heldout/gold_score"]
    rm_rise = final["heldout/rm_score"] - peak["heldout/rm_score"]
    return {
        "overoptimisation/gold_peak": peak["heldout/gold_score"],
        "overoptimisation/gold_peak_step": peak["step"],
        "overoptimisation/gold_drop": gold_drop,
        "overoptimisation/rm_rise": rm_rise,
        "gold_drop_while_rm_rose": gold_drop if rm_rise > 0 else 0.0,
    }


@torch.no_grad()
def pairwise_accuracy(reward_model, reward_tokenizer, pairs, batch_size: int, device) -> float:
    """How often the reward model scores the chosen answer above the rejected one (plain or conversational pairs,
    rendered as the reward stage trained on them)."""
    from tqdm.auto import tqdm

    from rlhf.console import progress_as_lines

    # Pairs of similar length share a batch, so little of each batch is padding (real dialogues vary tenfold).
    size = [len(str(row["prompt"])) + len(str(row["chosen"])) + len(str(row["rejected"])) for row in pairs]
    order = sorted(range(len(pairs)), key=size.__getitem__)
    correct = 0
    for start in tqdm(
        range(0, len(pairs), batch_size),
        desc="reward model on held-out pairs",
        leave=False,
        disable=progress_as_lines(),
    ):
        batch = pairs.select(order[start : start + batch_size])
        chosen, rejected = (
            score(reward_model, reward_tokenizer, batch["prompt"], batch[side], device)
            for side in ("chosen", "rejected")
        )
        correct += int((chosen > rejected).sum())
    return correct / len(pairs)
