"""Rollouts: sample responses with a KV cache, mask everything after the first stop token, and score them.

The reward model may use its own tokenizer: responses are decoded to text and re-encoded for it, exactly as its
training pairs were built (`rlhf.chat.reward_text`: prompt + answer + EOS, or the chat template's rendering).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rlhf.chat import Prompt, reward_text
from rlhf.modeling import uses_chat_template
from rlhf.ppo.core import logprobs_from_logits, response_mask


class Critic(nn.Module):
    """Per-token values from a sequence classifier (the reward model): its backbone plus its scoring head."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.backbone = getattr(classifier, classifier.base_model_prefix)
        self.head = classifier.score

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        return self.head(hidden).squeeze(-1)


class PolicyAndValue(nn.Module):
    """Policy and critic as one module, so one optimiser, one `accelerator.prepare` and one backward cover both.

    The critic is either a separate network (initialised from the reward model) or a linear value head on the
    policy's last hidden state.
    """

    def __init__(self, policy: nn.Module, critic: nn.Module | None) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.value_head = None if critic is not None else nn.Linear(policy.config.get_text_config().hidden_size, 1)
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.value_head is not None
        output = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=shared,
            use_cache=False,
        )
        if shared:
            values = self.value_head(output.hidden_states[-1]).squeeze(-1)
        else:
            values = self.critic(input_ids, attention_mask, position_ids)
        return output.logits, values


def join(queries, query_mask, responses, mask):
    """Prompt and response as one sequence, with position ids that skip the left padding (as `generate` does)."""
    input_ids = torch.cat([queries, responses], dim=1)
    attention_mask = torch.cat([query_mask, mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def sequence_logprobs(model_output_logits, context_length: int, responses, temperature: float):
    """Log-probs of the response tokens, from logits at the positions that predicted them, at the given temperature."""
    logits = model_output_logits[:, context_length - 1 : -1] / temperature
    return logits, logprobs_from_logits(logits, responses)


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
