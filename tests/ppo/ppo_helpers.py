"""Helpers for the PPO tests: demo rows, tiny models, a toy reward and a trainer factory.

A module of its own (not conftest) so test files can import it by name; tests/ppo is on sys.path under pytest's
default (prepend) import mode, as tests/stages is for `stage_helpers`.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

# One layer, 32 wide: a forward + backward on a batch of 16 short sequences takes milliseconds on one core.
TINY_ARCH = {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 128}


def demo_rows(count: int, seed: int = 3) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from the demo grammar ("Review: ...\\nSummary:", " A great drama with ...")."""
    from rlhf.data.demo import _unique_reviews, summarise

    rng = random.Random(seed)
    return [(review.prompt, " " + summarise(review, rng)) for review in _unique_reviews(rng, count)]


def tokenizer_for(texts: list[str], vocab_size: int, padding_side: str):
    from rlhf.config import TokenizerParams
    from rlhf.modeling import train_tokenizer

    tokenizer = train_tokenizer(texts, TokenizerParams(vocab_size=vocab_size))
    tokenizer.padding_side = padding_side
    return tokenizer


def random_lm(tokenizer, seed: int = 0, dropout: float = 0.0):
    from rlhf.config import ArchitectureParams
    from rlhf.modeling import build_causal_lm

    torch.manual_seed(seed)
    return build_causal_lm(tokenizer, ArchitectureParams(**TINY_ARCH, dropout=dropout)).eval()


def random_classifier(tokenizer, seed: int = 0):
    """A tiny GPT-2 sequence classifier with one output (a reward model / critic), randomly initialised."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=TINY_ARCH["n_positions"],
        n_embd=TINY_ARCH["n_embd"],
        n_layer=TINY_ARCH["n_layer"],
        n_head=TINY_ARCH["n_head"],
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
    )
    model = GPT2ForSequenceClassification(config).eval()
    # GPT-2's init gives the score head tiny outputs; make values and scores clearly non-zero.
    nn.init.normal_(model.score.weight, std=1.0)
    return model


def quick_pretrain(model, tokenizer, rows: list[tuple[str, str]], steps: int, seed: int = 0):
    """A few hundred milliseconds of language modelling on prompt + completion + EOS, so the model writes
    summary-like text and stops (random weights would sample uniformly over the vocabulary and never stop)."""
    texts = [prompt + completion + tokenizer.eos_token for prompt, completion in rows]
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    encoded = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    tokenizer.padding_side = side
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(texts), (16,), generator=generator)
        ids, attention = encoded["input_ids"][index], encoded["attention_mask"][index]
        loss = model(input_ids=ids, attention_mask=attention, labels=ids.masked_fill(attention == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


class ToyReward(nn.Module):
    """A "reward model" that counts `word` in the response (the text after the prompt's last "Summary:").

    It takes the reward tokenizer's input_ids like a sequence classifier and returns an object with `.logits`
    of shape (batch, 1), which is all `rlhf.sampling.score` uses.
    """

    def __init__(self, tokenizer, word: str = " great") -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.word = word
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, **_: Any):
        self.calls += 1
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        counts = [text.rsplit("Summary:", 1)[-1].count(self.word) for text in texts]
        return SimpleNamespace(logits=torch.tensor(counts, dtype=torch.float32).unsqueeze(-1))


def fresh_accelerator(gradient_accumulation_steps: int = 1):
    """A new Accelerator on the CPU; accelerate keeps its state in process-wide singletons, so reset them first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(cpu=True, gradient_accumulation_steps=gradient_accumulation_steps)


def make_trainer(
    cfg, policy, reference, critic, reward_model, tokenizer, reward_tokenizer, prompts: list[str], checkpoint_dir: Path
):
    from rlhf.ppo.trainer import PPOTrainer

    accelerator = fresh_accelerator(cfg.gradient_accumulation_steps)
    return PPOTrainer(
        cfg, policy, reference, critic, reward_model, tokenizer, reward_tokenizer, prompts, checkpoint_dir, accelerator
    )


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
