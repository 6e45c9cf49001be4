"""Rollouts on a tiny GPT-2: log-probs with left padding, EOS masking, scoring with another tokenizer, critics."""

from __future__ import annotations

import pytest
import torch
from ppo_helpers import random_classifier

from rlhf.config import PPOConfig
from rlhf.ppo.models import Critic, PolicyAndValue
from rlhf.sampling import generate, join, score, sequence_logprobs

TEMPERATURE = 0.7


def varied_prompts(prompts: list[str], tokenizer, count: int = 6) -> list[str]:
    """Prompts of clearly different token lengths, so the batch is left-padded."""
    by_length = sorted(prompts[:60], key=lambda p: len(tokenizer(p, add_special_tokens=False)["input_ids"]))
    step = max(1, len(by_length) // count)
    return by_length[::step][:count]


def unpadded_logprobs(policy, tokenizer, prompt: str, response: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs of `response` after `prompt`, from one forward pass over the unpadded sequence (default positions)."""
    prompt_ids = torch.tensor(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids = torch.cat([prompt_ids, response]).unsqueeze(0)
    logits = policy(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1] / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, response.unsqueeze(1)).squeeze(1)


@torch.no_grad()
def test_rollout_logprobs_equal_a_fresh_unpadded_forward(make_policy, tokenizer, prompts) -> None:
    policy = make_policy()
    batch = varied_prompts(prompts, tokenizer)
    cfg = PPOConfig(temperature=TEMPERATURE, top_k=0, top_p=1.0, max_new_tokens=20)
    torch.manual_seed(0)
    samples = generate(policy, tokenizer, batch, cfg, "cpu")
    assert (samples.query_mask == 0).any(), "the prompts should need left padding"
    assert samples.ends_with_eos.any() and (samples.mask == 0).any(), "some response should stop early"

    context = samples.queries.shape[1]
    ids, attention, positions = join(samples.queries, samples.query_mask, samples.responses, samples.mask)
    logits = policy(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    _, logprobs = sequence_logprobs(logits, context, samples.responses, TEMPERATURE)
    assert logprobs.shape == samples.responses.shape

    for row, prompt in enumerate(batch):
        length = int(samples.mask[row].sum())
        expected = unpadded_logprobs(policy, tokenizer, prompt, samples.responses[row, :length], TEMPERATURE)
        torch.testing.assert_close(logprobs[row, :length], expected, atol=1e-4, rtol=0)

    # The same numbers as the sampler's own (processed) scores: same seed, same draws.
    encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    output = policy.generate(
        **encoded,
        max_new_tokens=cfg.max_new_tokens,
        do_sample=True,
        temperature=TEMPERATURE,
        top_k=0,
        top_p=1.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    sampled = output.sequences[:, context:]
    real = samples.mask.bool()
    assert torch.equal(sampled[real], samples.responses[real])
    scores = torch.stack(output.scores, dim=1)  # (batch, steps, vocab), already divided by the temperature
    sampler_logprobs = torch.log_softmax(scores, dim=-1).gather(2, sampled[:, : scores.shape[1], None]).squeeze(2)
    width = scores.shape[1]
    torch.testing.assert_close(
        logprobs[:, :width][real[:, :width]], sampler_logprobs[real[:, :width]], atol=1e-4, rtol=0
    )

    # The check is sensitive to positions: without the position ids that skip the padding, padded rows differ.
    wrong = sequence_logprobs(
        policy(input_ids=ids, attention_mask=attention).logits, context, samples.responses, TEMPERATURE
    )[1]
    padded_rows = (samples.query_mask == 0).any(dim=1)
    assert not torch.allclose(
        wrong[padded_rows][real[padded_rows]], logprobs[padded_rows][real[padded_rows]], atol=1e-3
    )


class ScriptedPolicy:
    """Stands in for a causal LM's `generate`: appends fixed responses and records the sampling arguments."""

    def __init__(self, responses: torch.Tensor) -> None:
        self.responses = responses
        self.kwargs: dict = {}

    def generate(self, input_ids, attention_mask, **kwargs):
        self.kwargs = kwargs
        return torch.cat([input_ids, self.responses], dim=1)


def test_generate_masks_everything_after_the_first_eos(tokenizer) -> None:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    great = tokenizer(" A great film", add_special_tokens=False)["input_ids"]
    junk = tokenizer(" dull plot", add_special_tokens=False)["input_ids"]
    width = len(great) + 1 + len(junk) + 1
    rows = [
        great + [eos] + junk + [eos],  # stops, then junk sampled after EOS (and a second EOS)
        (great + junk + great + junk)[:width],  # never stops
        [eos] + junk + great + [eos],  # empty answer
    ]
    rows = [row + [pad] * (width - len(row)) for row in rows]
    policy = ScriptedPolicy(torch.tensor(rows))
    cfg = PPOConfig(temperature=0.9, top_k=5, top_p=0.8, max_new_tokens=width)
    samples = generate(policy, tokenizer, ["Review: A.\nSummary:", "Review: Longer one.\nSummary:", "x"], cfg, "cpu")

    assert policy.kwargs["do_sample"] is True
    assert (policy.kwargs["temperature"], policy.kwargs["top_k"], policy.kwargs["top_p"]) == (0.9, 5, 0.8)
    assert policy.kwargs["max_new_tokens"] == width
    assert (policy.kwargs["eos_token_id"], policy.kwargs["pad_token_id"]) == ([eos], pad)

    stop = len(great) + 1
    assert samples.mask.tolist() == [[1.0] * stop + [0.0] * (width - stop), [1.0] * width, [1.0] + [0.0] * (width - 1)]
    assert samples.responses[0].tolist() == great + [eos] + [pad] * (width - stop)
    assert samples.responses[1].tolist() == rows[1]
    assert samples.responses[2].tolist() == [eos] + [pad] * (width - 1)
    assert samples.ends_with_eos.tolist() == [True, False, True]
    assert samples.texts == [" A great film", tokenizer.decode(rows[1]), ""]
    assert not any(token in text for text in samples.texts for token in (tokenizer.eos_token, tokenizer.pad_token))
    assert samples.query_mask[2].tolist()[0] == 0  # the short prompt is left-padded


@torch.no_grad()
def test_sampled_responses_are_masked_after_eos_and_decoded_without_special_tokens(
    make_policy, tokenizer, prompts
) -> None:
    policy = make_policy()
    torch.manual_seed(1)
    samples = generate(policy, tokenizer, prompts[:12], PPOConfig(max_new_tokens=24, top_k=0), "cpu")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert samples.ends_with_eos.any()
    for row in range(len(prompts[:12])):
        tokens, length = samples.responses[row].tolist(), int(samples.mask[row].sum())
        assert samples.mask[row].tolist() == [1.0] * length + [0.0] * (len(tokens) - length)
        assert all(token == pad for token in tokens[length:])
        assert bool(samples.ends_with_eos[row]) == (tokens[length - 1] == eos)
        assert eos not in tokens[: length - 1]
        assert samples.texts[row] == tokenizer.decode(tokens[:length], skip_special_tokens=True)
        assert tokenizer.eos_token not in samples.texts[row] and tokenizer.pad_token not in samples.texts[row]


@torch.no_grad()
def test_score_re_encodes_with_the_reward_models_own_tokenizer(tokenizer, reward_tokenizer, prompts) -> None:
    assert len(reward_tokenizer) != len(tokenizer)
    reward_model = random_classifier(reward_tokenizer, seed=5)
    batch = [prompts[0], prompts[1] + " Extra words make this prompt longer.", prompts[2]]
    responses = [" A great drama with clever plot.", " Dull", ""]
    scores = score(reward_model, reward_tokenizer, batch, responses, "cpu")
    assert scores.shape == (3,) and scores.dtype == torch.float32

    lengths = []
    for row, (prompt, response) in enumerate(zip(batch, responses)):
        encoded = reward_tokenizer(prompt + response + reward_tokenizer.eos_token, return_tensors="pt")
        lengths.append(encoded["input_ids"].shape[1])
        assert encoded["input_ids"][0, -1] == reward_tokenizer.eos_token_id
        direct = reward_model(**encoded).logits[0, 0]
        assert scores[row].item() == pytest.approx(direct.item(), abs=1e-5)
    assert len(set(lengths)) == 3, "the batch should need padding"
    # The policy's own ids are not what the reward model read: the response really was re-encoded.
    text = batch[0] + responses[0]
    assert tokenizer(text)["input_ids"] != reward_tokenizer(text)["input_ids"]


@torch.no_grad()
def test_value_head_starts_at_zero_and_gives_a_value_per_token(make_policy, tokenizer, prompts) -> None:
    model = PolicyAndValue(make_policy(), critic=None)
    assert torch.all(model.value_head.weight == 0) and torch.all(model.value_head.bias == 0)
    encoded = tokenizer(prompts[:3], return_tensors="pt", padding=True, add_special_tokens=False)
    positions = (encoded["attention_mask"].cumsum(1) - 1).clamp(min=0)
    logits, values = model(encoded["input_ids"], encoded["attention_mask"], positions)
    assert values.shape == encoded["input_ids"].shape
    assert logits.shape == (*encoded["input_ids"].shape, len(tokenizer))
    assert torch.all(values == 0)
    assert {name for name, p in model.named_parameters() if p.requires_grad} >= {"value_head.weight", "value_head.bias"}


@torch.no_grad()
def test_policy_and_value_with_left_padding_match_unpadded_sequences(make_policy, tokenizer, prompts) -> None:
    """Both critics read values at the right positions when `join` supplies position ids that skip the padding."""
    policy = make_policy()
    head_model = PolicyAndValue(policy, critic=None)
    torch.nn.init.normal_(head_model.value_head.weight, std=1.0)
    critic_model = PolicyAndValue(policy, Critic(random_classifier(tokenizer, seed=3)))
    batch = varied_prompts(prompts, tokenizer, count=3)
    encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
    responses = torch.tensor([tokenizer(" A great film", add_special_tokens=False)["input_ids"]] * 3)
    ids, attention, positions = join(
        encoded["input_ids"], encoded["attention_mask"], responses, torch.ones(responses.shape)
    )
    for model in (head_model, critic_model):
        logits, values = model(ids, attention, positions)
        for row, prompt in enumerate(batch):
            plain = torch.tensor(tokenizer(prompt, add_special_tokens=False)["input_ids"] + responses[row].tolist())
            n = len(plain)
            plain_logits, plain_values = model(plain[None], torch.ones(1, n, dtype=torch.long), torch.arange(n)[None])
            torch.testing.assert_close(logits[row, -n:], plain_logits[0], atol=1e-4, rtol=0)
            torch.testing.assert_close(values[row, -n:], plain_values[0], atol=1e-4, rtol=0)
            assert values[row, -n:].abs().max() > 1e-3


@torch.no_grad()
def test_critic_from_a_classifier_gives_its_pooled_logit_at_the_last_token(make_policy, tokenizer, prompts) -> None:
    classifier = random_classifier(tokenizer, seed=4)
    critic = Critic(classifier)
    assert critic.head is classifier.score
    model = PolicyAndValue(make_policy(), critic)
    assert model.value_head is None
    for prompt in prompts[:3]:
        ids = torch.tensor([tokenizer(prompt + " A great film" + tokenizer.eos_token)["input_ids"]])
        attention, positions = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
        _, values = model(ids, attention, positions)
        assert values.shape == ids.shape
        pooled = classifier(input_ids=ids, attention_mask=attention).logits[0, 0]
        assert values[0, -1].item() == pytest.approx(pooled.item(), abs=1e-5)
