"""Sampling shared by PPO's rollouts and evaluation: answer prompts with a KV cache, mask everything after the
first stop token, take the policy's and the reference's log-probs of the answers, and score them.

The reward model may use its own tokenizer: responses are decoded to text and re-encoded for it, exactly as its
training pairs were built (`rlhf.chat.reward_text`: prompt + answer + EOS, or the chat template's rendering).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf.chat import Prompt, reward_text
from rlhf.modeling import uses_chat_template
from rlhf.ppo.core import response_mask


def join(queries, query_mask, responses, mask):
    """Prompt and response as one sequence, with position ids that skip the left padding (as `generate` does)."""
    input_ids = torch.cat([queries, responses], dim=1)
    attention_mask = torch.cat([query_mask, mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def sequence_logprobs(model_output_logits, context_length: int, responses, temperature: float):
    """Log-probs of the response tokens, from logits at the positions that predicted them, at the given temperature."""
    from trl.trainer.utils import selective_log_softmax  # TRL loads in seconds: only when a model runs

    logits = model_output_logits[:, context_length - 1 : -1] / temperature
    return logits, selective_log_softmax(logits, responses)


def with_model_sampling(cfg, model):
    """`cfg` with its null sampling keys (temperature, top_k, top_p) taken from the model's generation_config, or
    plain sampling (1.0, off, off) where that sets nothing. PPO's log-probs use the resolved temperature, so sampling
    and the loss agree; the config's other processors (repetition penalty...) are not applied, for the same reason."""
    defaults = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    generation = getattr(model, "generation_config", None)
    resolved = {}
    for key, default in defaults.items():
        value = getattr(cfg, key)
        if value is None:
            value = getattr(generation, key, None) if generation is not None else None
        resolved[key] = default if value is None else value
    return cfg.model_copy(update=resolved)


@dataclass
class Samples:
    queries: torch.Tensor  # (batch, query_len), left-padded
    query_mask: torch.Tensor
    responses: torch.Tensor  # (batch, response_len), pad after the first EOS
    mask: torch.Tensor  # 1.0 for response tokens up to and including the first EOS
    prompts: list[str]
    texts: list[str]  # decoded responses, without special tokens
    ends_with_eos: torch.Tensor  # bool per response


@torch.no_grad()
def generate(policy, tokenizer, prompts: list[str], cfg, device, stop_ids: list[int] | None = None) -> Samples:
    """Batched sampling with a KV cache (`generate`), left padding, stopping at EOS (or any of `stop_ids`).

    `cfg` gives max_new_tokens, temperature, top_k and top_p (see `with_model_sampling`). Prompts are text already
    formatted for the policy (`rlhf.chat.format_prompt`); they carry their own special tokens."""
    stop_ids = stop_ids or [tokenizer.eos_token_id]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    output = policy.generate(
        input_ids=encoded["input_ids"],
        attention_mask=encoded["attention_mask"],
        max_new_tokens=cfg.max_new_tokens,
        do_sample=True,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    responses = output[:, encoded["input_ids"].shape[1] :]
    mask = response_mask(responses, stop_ids)
    # With pad == EOS (most chat models) the padding after the answer is EOS too; the mask, not the token, says
    # where the answer ends, and the EOS that ends it stays inside the mask.
    ends_with_eos = (torch.isin(responses, torch.tensor(stop_ids, device=responses.device)) & (mask == 1)).any(dim=1)
    responses = responses.masked_fill(mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return Samples(encoded["input_ids"], encoded["attention_mask"], responses, mask, prompts, texts, ends_with_eos)


@torch.no_grad()
def score(reward_model, reward_tokenizer, prompts: list[Prompt], responses: list, device) -> torch.Tensor:
    """Reward-model scores of (prompt, response) pairs, rendered and encoded as the reward model's training pairs
    were (`rlhf.chat.reward_text`), with its own tokenizer. Prompts are the raw ones (text or messages)."""
    texts = [reward_text(prompt, response, reward_tokenizer) for prompt, response in zip(prompts, responses)]
    # As in TRL's RewardTrainer: plain text is tokenized with the tokenizer's special tokens (BOS); a chat template's
    # rendering already holds its own.
    plain = isinstance(prompts[0], str) and not uses_chat_template(reward_tokenizer)
    encoded = reward_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=plain).to(device)
    return reward_model(**encoded).logits.squeeze(-1).float()


# forward(input_ids, attention_mask, position_ids) -> (logits, per-token values or None)
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
# reference_logits(input_ids, attention_mask, position_ids) -> the reference model's logits
ReferenceLogits = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Rollout:
    """One sampled answer per prompt and what PPO and evaluation need of it. Per-token tensors are
    (batch, response_length) and zero past each answer's end."""

    samples: Samples
    input_ids: torch.Tensor  # prompt + answer, as the policy saw them
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    logprobs: torch.Tensor  # the policy's, at the sampling temperature
    ref_logprobs: torch.Tensor  # the reference model's
    scores: torch.Tensor  # the reward model's, one per answer
    values: torch.Tensor | None  # the critic's (PPO), else None

    @property
    def context(self) -> int:
        """The (left-padded) prompt length: answer token t is predicted at position context - 1 + t."""
        return self.samples.queries.shape[1]

    @property
    def mask(self) -> torch.Tensor:
        return self.samples.mask


@torch.no_grad()
def rollout(
    policy,
    forward: Forward,
    reference_logits: ReferenceLogits,
    tokenizer,
    queries: list[str],
    prompts: list[Prompt],
    reward_model,
    reward_tokenizer,
    sampling,
    device,
    stop_ids: list[int],
) -> Rollout:
    """Samples an answer to each query (`generate`), then runs `forward` (the policy, and the critic if any) and the
    reference over prompt + answer, and the reward model over the raw `prompts` with the answers."""
    samples = generate(policy, tokenizer, queries, sampling, device, stop_ids)
    context, mask = samples.queries.shape[1], samples.mask
    input_ids, attention_mask, position_ids = join(samples.queries, samples.query_mask, samples.responses, mask)
    logits, values = forward(input_ids, attention_mask, position_ids)
    logprobs = sequence_logprobs(logits, context, samples.responses, sampling.temperature)[1]
    ref_logprobs = sequence_logprobs(
        reference_logits(input_ids, attention_mask, position_ids), context, samples.responses, sampling.temperature
    )[1]
    scores = score(reward_model, reward_tokenizer, prompts, samples.texts, device)
    if values is not None:
        values = values[:, context - 1 : -1].float() * mask
    return Rollout(
        samples, input_ids, attention_mask, position_ids, logprobs * mask, ref_logprobs * mask, scores, values
    )
