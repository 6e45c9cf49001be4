"""Held-out evaluation shared by the PPO stage's closing check and `rlhf evaluate`.

Every model answers the same prompts under the same sampling seed; each answer is scored by the reward model and the
gold annotator, with its KL to the reference model, whether it ended with EOS, its length and its bigram repetition.
Summaries and the policy-vs-SFT comparison (gains, win rates) are computed from those rows.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch

from rlhf.chat import Prompt, display, format_prompt
from rlhf.modeling import stop_token_ids
from rlhf.sampling import ReferenceLogits, rollout, score, with_model_sampling


@torch.no_grad()
def sample_and_score(policy, reference_logits: ReferenceLogits, tokenizer, reward_model, reward_tokenizer,
                     prompts: Sequence[Prompt], sampling, batch_size: int, annotator, device) -> list[dict[str, Any]]:
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
        answers = rollout(policy, forward, reference_logits, tokenizer,
                          [format_prompt(prompt, tokenizer) for prompt in batch], batch, reward_model,
                          reward_tokenizer, sampling, device, stop_ids)
        samples = answers.samples
        kls = (answers.logprobs - answers.ref_logprobs).sum(1).tolist()
        rm_scores = answers.scores.tolist()
        gold = annotator(samples.texts) if annotator else [None] * len(batch)
        for i, prompt in enumerate(batch):
            rows.append({
                "prompt": display(prompt),
                "response": samples.texts[i],
                "rm_score": rm_scores[i],
                "gold_score": gold[i],
                "kl": kls[i],
                "eos": bool(samples.ends_with_eos[i]),
                "length": int(samples.mask[i].sum()),
                "repetition": repetition(samples.texts[i]),
            })
    return rows


def _bigrams(text: str) -> list[tuple[str, str]]:
    words = text.split()
    return list(zip(words, words[1:]))


def repetition(text: str) -> float:
    """Share of a response's word bigrams that repeat an earlier one: 0 for none, near 1 for a loop."""
    bigrams = _bigrams(text)
    return 1.0 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def distinct_2(texts: Sequence[str]) -> float:
    """Distinct bigrams over all bigrams across the responses (Li et al., 2016): low means mode collapse."""
    bigrams = [bigram for text in texts for bigram in _bigrams(text)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


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
    return summary


def win_rate(challenger: Sequence[float], baseline: Sequence[float]) -> float:
    """How often the challenger's answer to a prompt beats the baseline's; a tie counts half."""
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(challenger, baseline, strict=True))
    return wins / len(baseline)


def compare(policy_rows: Sequence[dict[str, Any]], sft_rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Summaries of both models (`policy/…`, `sft/…`), the policy's gains over SFT and its win rates."""
    policy, sft = summarize(policy_rows), summarize(sft_rows)
    stats = {f"policy/{key}": value for key, value in policy.items()}
    stats |= {f"sft/{key}": value for key, value in sft.items()}
    stats["rm_gain_in_sft_std"] = (policy["rm_score"] - sft["rm_score"]) / max(sft["rm_score_std"], 1e-8)
    stats["win_rate/rm"] = win_rate([r["rm_score"] for r in policy_rows], [r["rm_score"] for r in sft_rows])
    if "gold_score" in policy:
        stats["gold_gain"] = policy["gold_score"] - sft["gold_score"]
        stats["win_rate/gold"] = win_rate([r["gold_score"] for r in policy_rows],
                                          [r["gold_score"] for r in sft_rows])
    stats["prompts"] = float(len(policy_rows))
    return stats


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
    for start in tqdm(range(0, len(pairs), batch_size), desc="reward model on held-out pairs", leave=False,
                      disable=progress_as_lines()):
        batch = pairs.select(order[start : start + batch_size])
        chosen, rejected = (score(reward_model, reward_tokenizer, batch["prompt"], batch[side], device)
                            for side in ("chosen", "rejected"))
        correct += int((chosen > rejected).sum())
    return correct / len(pairs)
