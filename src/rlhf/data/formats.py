"""The dataset kinds the stages take, in TRL's formats, and their validation.

- text:        {"text"}                                   pretraining corpus
- sft:         {"prompt", "completion"} or {"messages"}   plain or conversational
- preference:  {"prompt", "chosen", "rejected"}           plain strings, or lists of chat messages
- prompts:     {"prompt"}                                 RL and evaluation prompts
"""

from __future__ import annotations

import math
from typing import Any, Literal

import datasets

from rlhf.data.io import DataError, Rows, fingerprint, read_rows

Kind = Literal["text", "sft", "preference", "prompts"]
KINDS: tuple[Kind, ...] = ("text", "sft", "preference", "prompts")
_ROLES = {"system", "user", "assistant"}


def _text_problem(record: dict[str, Any], field: str) -> str | None:
    if field not in record or record[field] is None:
        return f"missing field {field!r}"
    value = record[field]
    if not isinstance(value, str):
        return f"field {field!r} must be a string, got {type(value).__name__}"
    if not value.strip():
        return f"field {field!r} is empty"
    return None


def _messages_problem(record: dict[str, Any], field: str) -> str | None:
    messages = record.get(field)
    if not isinstance(messages, list) or not messages:
        return f"field {field!r} must be a non-empty list of messages"
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            return f"{field}[{index}] must be a message with a role in {sorted(_ROLES)}"
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            return f"{field}[{index}] has empty content"
    return None


def _field_problem(record: dict[str, Any], field: str, conversational: bool) -> str | None:
    return _messages_problem(record, field) if conversational else _text_problem(record, field)


def record_problem(record: dict[str, Any], kind: Kind) -> str | None:
    """What is wrong with one record for `kind`, or None."""
    if kind == "text":
        return _text_problem(record, "text")
    if kind == "prompts":
        return _field_problem(record, "prompt", isinstance(record.get("prompt"), list))
    if kind == "sft":
        if "messages" in record:
            problem = _messages_problem(record, "messages")
            if problem is None and not any(m["role"] == "assistant" for m in record["messages"]):
                problem = "'messages' has no assistant turn to learn from"
            return problem
        conversational = isinstance(record.get("prompt"), list)
        return _field_problem(record, "prompt", conversational) or _field_problem(record, "completion", conversational)
    if kind == "preference":
        conversational = isinstance(record.get("chosen"), list)
        for field in ("prompt", "chosen", "rejected"):
            problem = _field_problem(record, field, conversational)
            if problem:
                return problem
        if record["chosen"] == record["rejected"]:
            return "'chosen' is identical to 'rejected'"
        return None
    raise ValueError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")


def validate(rows: Rows, kind: Kind) -> None:
    """Raises DataError naming the first bad record (and how many more there are)."""
    if not rows.records:
        raise DataError(f"{rows.source}: dataset is empty")
    problems = [
        (origin, problem)
        for record, origin in zip(rows.records, rows.origins)
        if (problem := record_problem(record, kind)) is not None
    ]
    if problems:
        origin, problem = problems[0]
        more = f" (and {len(problems) - 1} more bad records)" if len(problems) > 1 else ""
        raise DataError(f"{origin}: {problem}{more}")


def load_dataset(source: str, kind: Kind) -> tuple[datasets.Dataset, str]:
    """Reads, validates and converts a dataset; returns it with its content fingerprint."""
    rows = read_rows(source)
    validate(rows, kind)
    fields = {"text": ["text"], "prompts": ["prompt"], "preference": ["prompt", "chosen", "rejected"]}.get(kind)
    if kind == "sft":
        fields = ["messages"] if "messages" in rows.records[0] else ["prompt", "completion"]
    for record, origin in zip(rows.records, rows.origins):
        if any(field not in record for field in fields):
            raise DataError(f"{origin}: mixes formats: every record must have the fields {fields} like the first")
    # Keep only the fields the trainers read: extra columns would otherwise reach TRL's collators.
    records = [{field: record[field] for field in fields} for record in rows.records]
    return datasets.Dataset.from_list(records), fingerprint(records)


def split(
    dataset: datasets.Dataset, eval_fraction: float, seed: int, source: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A seeded, deterministic train/eval split (the same rows on every run with the same seed) of the records read
    from `source`; at least one record on each side."""
    if len(dataset) < 2:
        raise DataError(
            f"{source}: {len(dataset)} record{'s' if len(dataset) != 1 else ''}; at least 2 are needed "
            "to split off an evaluation set"
        )
    held_out = min(len(dataset) - 1, max(1, math.ceil(eval_fraction * len(dataset))))
    parts = dataset.train_test_split(test_size=held_out, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
