"""How each model sees prompts and answers: the one place that decides between plain text and a chat template.

A model with its own chat template (an instruct/chat model such as SmolLM2-Instruct or Qwen-Instruct) sees every
prompt as a user turn and every answer as the assistant's, rendered by its template, in every stage: SFT, the reward
model's training pairs, PPO's rollouts and scores, evaluation and serving. A model without one (the pipeline's own
tiny model, base models) sees plain prompts as plain text, and conversations through the plain Human/Assistant
template. Training and scoring render the same (prompt, answer) to the same text, so the reward model scores PPO's
answers exactly as it saw its training pairs.
"""

from __future__ import annotations

from typing import Any

from rlhf.modeling import uses_chat_template

Prompt = str | list[dict[str, str]]


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def _assistant(answer: str | list[dict[str, str]]) -> list[dict[str, str]]:
    # The template delimits the turn, so the whitespace that plain-text data puts before an answer is dropped.
    return list(answer) if isinstance(answer, list) else [{"role": "assistant", "content": answer.strip()}]


def format_prompt(prompt: Prompt, tokenizer) -> str:
    """The text a policy continues: a plain prompt as it is, or, for a chat model or a conversation, the chat
    template's rendering ending with the assistant cue."""
    if isinstance(prompt, str) and not uses_chat_template(tokenizer):
        return prompt
    return tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=False)


def reward_text(prompt: Prompt, answer: str | list[dict[str, str]], tokenizer) -> str:
    """prompt + answer as TRL's RewardTrainer renders a training pair for this tokenizer: plain text ends with EOS;
    conversations (and everything, for a chat model) go through the chat template."""
    if isinstance(prompt, str) and isinstance(answer, str) and not uses_chat_template(tokenizer):
        return prompt + answer + tokenizer.eos_token
    return tokenizer.apply_chat_template(as_messages(prompt) + _assistant(answer), tokenize=False)


def display(prompt: Prompt) -> str:
    """A prompt for people (reports, sample tables): conversations as "role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{message['role']}: {message['content']}" for message in prompt)


# -- training rows ----------------------------------------------------------------------------------------------------


def preference_rows(dataset, tokenizer):
    """Preference pairs as the reward model's tokenizer expects them: plain pairs become conversations for a chat
    model (prompt as a user turn, answers as assistant turns)."""
    if (
        "prompt" not in dataset.column_names
        or not isinstance(dataset[0]["prompt"], str)
        or not uses_chat_template(tokenizer)
    ):
        return dataset
    return dataset.map(
        lambda row: {
            "prompt": as_messages(row["prompt"]),
            "chosen": _assistant(row["chosen"]),
            "rejected": _assistant(row["rejected"]),
        }
    )


def has_assistant_masks(tokenizer) -> bool:
    """Whether TRL can mask everything but the assistant turns with this template: it has `{% generation %}`
    markers, or TRL knows how to patch them in."""
    from trl.chat_template_utils import get_training_chat_template

    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        return False
    return True


def _per_assistant_turn(messages: list[dict[str, str]]) -> list[dict[str, Any]]:
    return [
        {"prompt": messages[:index], "completion": [message]}
        for index, message in enumerate(messages)
        if message["role"] == "assistant" and index > 0
    ]


def sft_rows(dataset, tokenizer):
    """SFT rows in the form TRL trains on for this tokenizer, and whether the loss masks by assistant turns.

    - Plain prompt/completion rows: as they are, or for a chat model as one user and one assistant turn.
    - `messages`: as they are when the template can mark assistant turns; otherwise (templates such as SmolLM2's,
      which TRL cannot patch) each assistant turn becomes one prompt/completion row with the conversation before it
      as the prompt, so the loss still covers exactly the assistant turns, their end-of-turn token included.
    """
    import datasets

    if "messages" in dataset.column_names:
        if has_assistant_masks(tokenizer):
            return dataset, True
        rows = [row for messages in dataset["messages"] for row in _per_assistant_turn(messages)]
        return datasets.Dataset.from_list(rows), False
    if isinstance(dataset[0]["prompt"], str) and uses_chat_template(tokenizer):
        dataset = dataset.map(
            lambda row: {"prompt": as_messages(row["prompt"]), "completion": _assistant(row["completion"])}
        )
    return dataset, False
