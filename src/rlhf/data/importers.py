"""Importers that turn well-known raw datasets into this pipeline's formats (see `rlhf.data.formats`).

Each importer reads its source with `io.read_rows` (so local files of any supported type, folders and Hub ids all
work), writes the converted records atomically with `io.write_jsonl`, and returns an `ImportReport`. Rows that cannot
become a usable record are never dropped silently: each one is counted under a named reason, and
`kept + sum(dropped.values()) == total` always holds. A record that is malformed (a missing or non-string field)
is a broken file rather than a bad example, so it raises `DataError` naming its `file:line` and nothing is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from rlhf.data.io import DataError, fingerprint, read_rows, write_jsonl

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"


@dataclass
class ImportReport:
    """What an import read, kept and dropped (by reason), and the fingerprint of what it wrote."""

    importer: str
    source: str
    output: str
    total: int
    kept: int
    dropped: dict[str, int]
    fingerprint: str
    # Rows that were kept but changed beyond the format conversion itself, by kind of change.
    adjusted: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kept + sum(self.dropped.values()) != self.total:
            raise AssertionError(f"import report does not add up: {self.kept} kept + {self.dropped} != {self.total}")

    def summary(self) -> str:
        lines = [f"{self.importer}: {self.source} -> {self.output}", f"  read {self.total}, kept {self.kept}"]
        for reason, count in sorted(self.dropped.items()):
            lines.append(f"  dropped {count}: {reason}")
        for change, count in sorted(self.adjusted.items()):
            lines.append(f"  adjusted {count}: {change}")
        lines.append(f"  fingerprint {self.fingerprint}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "importer": self.importer,
            "source": self.source,
            "output": self.output,
            "total": self.total,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "adjusted": dict(sorted(self.adjusted.items())),
            "fingerprint": self.fingerprint,
        }


def _string_field(record: dict[str, Any], name: str, origin: str, *, optional: bool = False) -> str:
    value = record.get(name)
    if value is None and optional:
        return ""
    if name not in record:
        raise DataError(f"{origin}: missing field {name!r}")
    if not isinstance(value, str):
        raise DataError(f"{origin}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _finish(
    importer: str,
    source: str,
    output: str,
    total: int,
    kept: list[dict[str, str]],
    dropped: dict[str, int],
    adjusted: dict[str, int] | None = None,
) -> ImportReport:
    if not kept:
        reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(dropped.items())) or "it holds no rows"
        raise DataError(f"{source}: no usable rows to import ({reasons}); nothing written to {output}")
    write_jsonl(output, kept)
    return ImportReport(importer, source, str(output), total, len(kept), dropped, fingerprint(kept), adjusted or {})


# --- Anthropic HH-RLHF -------------------------------------------------------------------------------------------


def split_hh_pair(chosen: str, rejected: str) -> tuple[dict[str, str] | None, str | None]:
    """Splits one HH-RLHF pair into `{"prompt", "chosen", "rejected"}`, or returns the reason it is unusable.

    The prompt is the transcript up to and including the last "\\n\\nAssistant:"; the answers are the rest, kept
    byte for byte (leading space included), so `prompt + chosen` and `prompt + rejected` rebuild the source texts.
    Reasons, checked in this order (a row gets the first that applies):

    - ``no_assistant_turn``: a transcript has no "\\n\\nAssistant:" at all.
    - ``ends_with_human_turn``: a transcript's last turn is the human's, so there is no final answer to compare.
    - ``earlier_turns_differ``: the transcripts differ before their final answers, so there is no shared prompt.
      (In the raw data such rows are usually one side carrying an extra exchange; splitting them anyway would put a
      whole extra turn inside one "answer", which is not a like-for-like preference, so they are not rescued.)
    - ``empty_final_answer``: the chosen or the rejected final answer is blank.
    - ``identical_answers``: the two final answers are equal once surrounding whitespace is ignored, so the pair
      carries no preference signal.
    """
    if ASSISTANT not in chosen or ASSISTANT not in rejected:
        return None, "no_assistant_turn"
    cut_chosen = chosen.rindex(ASSISTANT) + len(ASSISTANT)
    cut_rejected = rejected.rindex(ASSISTANT) + len(ASSISTANT)
    answer_chosen, answer_rejected = chosen[cut_chosen:], rejected[cut_rejected:]
    if HUMAN in answer_chosen or HUMAN in answer_rejected:
        return None, "ends_with_human_turn"
    prompt = chosen[:cut_chosen]
    if rejected[:cut_rejected] != prompt:
        return None, "earlier_turns_differ"
    if not answer_chosen.strip() or not answer_rejected.strip():
        return None, "empty_final_answer"
    if answer_chosen.strip() == answer_rejected.strip():
        return None, "identical_answers"
    return {"prompt": prompt, "chosen": answer_chosen, "rejected": answer_rejected}, None


def import_hh_rlhf(source: str, output: str) -> ImportReport:
    """Converts raw Anthropic HH-RLHF files (`{"chosen", "rejected"}` transcripts) to preference records.

    See `split_hh_pair` for how a pair is split and the reasons a row is dropped. Every kept row satisfies
    `prompt + chosen == source chosen` and `prompt + rejected == source rejected` exactly. Extra fields in the
    source are ignored.
    """
    rows = read_rows(source)
    kept: list[dict[str, str]] = []
    dropped: dict[str, int] = {}
    for record, origin in zip(rows.records, rows.origins):
        chosen = _string_field(record, "chosen", origin)
        rejected = _string_field(record, "rejected", origin)
        converted, reason = split_hh_pair(chosen, rejected)
        if converted is None:
            dropped[reason] = dropped.get(reason, 0) + 1
        else:
            kept.append(converted)
    return _finish("hh-rlhf", str(source), output, len(rows), kept, dropped)


# --- Stanford Alpaca ---------------------------------------------------------------------------------------------

# Alpaca's generated data marks "no input" in many spellings ("No input.", "<noinput>", "< noinput >", "N/A"...);
# compared after dropping everything but letters and digits and lower-casing.
_INPUT_PLACEHOLDERS = {"noinput", "noinputneeded", "noinputrequired", "ninput", "none", "na"}
# Alpaca answers an instruction that a text model cannot carry out (draw, browse...) with "<nooutput>"; a few rows
# spell it "<noinput>" or "No Output", or leave the output blank. All become the canonical marker: the model should
# learn to decline such tasks, so the rows are kept, and counted under `adjusted`.
_OUTPUT_PLACEHOLDERS = {"noinput", "nooutput"}
NO_OUTPUT = "<nooutput>"


def _squash(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The prompt template: Alpaca's section markers, without its fixed preamble sentence.

    ``"### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n"``, with the Input section
    left out when there is no input. The markers are the widely used Alpaca ones, so the model learns a familiar
    format; the preamble ("Below is an instruction that describes a task...") is dropped because it adds ~30
    identical tokens to every example, which a small `max_length` cannot spare. The prompt ends with a newline,
    so the completion (appended directly by TRL's SFTTrainer) needs no separator of its own.
    """
    parts = [f"### Instruction:\n{instruction.strip()}"]
    if input_text.strip():
        parts.append(f"### Input:\n{input_text.strip()}")
    parts.append("### Response:\n")
    return "\n\n".join(parts)


def import_alpaca(source: str, output: str) -> ImportReport:
    """Converts Stanford Alpaca (`{"instruction", "input", "output"}`) to SFT `{"prompt", "completion"}` records.

    prompt = `alpaca_prompt(instruction, input)` (see there for the template and why); completion = `output`,
    unchanged. `input` may be missing or null (treated as empty); an input that is only a "no input" placeholder
    ("No input.", "<noinput>", "N/A", ...) is treated as empty too and counted under `adjusted`. Dropped rows:

    - ``empty_instruction``: the instruction is blank.

    A blank output, or one that is only a "no output" marker in another spelling, becomes Alpaca's own `<nooutput>`
    (counted under `adjusted`), because Alpaca uses that answer for tasks a text model cannot do.
    """
    rows = read_rows(source)
    kept: list[dict[str, str]] = []
    dropped: dict[str, int] = {}
    adjusted: dict[str, int] = {}
    for record, origin in zip(rows.records, rows.origins):
        instruction = _string_field(record, "instruction", origin)
        input_text = _string_field(record, "input", origin, optional=True)
        completion = _string_field(record, "output", origin)
        if not instruction.strip():
            dropped["empty_instruction"] = dropped.get("empty_instruction", 0) + 1
            continue
        if (not completion.strip() or _squash(completion) in _OUTPUT_PLACEHOLDERS) and completion != NO_OUTPUT:
            change = "empty_output_marked_nooutput" if not completion.strip() else "no_output_marker_normalised"
            adjusted[change] = adjusted.get(change, 0) + 1
            completion = NO_OUTPUT
        if input_text.strip() and _squash(input_text) in _INPUT_PLACEHOLDERS:
            input_text = ""
            adjusted["placeholder_input_removed"] = adjusted.get("placeholder_input_removed", 0) + 1
        kept.append({"prompt": alpaca_prompt(instruction, input_text), "completion": completion})
    return _finish("alpaca", str(source), output, len(rows), kept, dropped, adjusted)


# --- Chat datasets for a chat model: HH-RLHF (and Alpaca) ---------------------------------------------------------

_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_messages(transcript: str) -> list[dict[str, str]]:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat messages (user / assistant turns).

    A trailing empty "Assistant:" cue (the end of a prompt) is not a turn; text before the first marker is kept as
    a system message, which the raw data does not have but a hand-made file might."""
    parts = _TURN.split(transcript)
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def _alpaca_messages(record: dict[str, Any], origin: str) -> list[dict[str, str]] | None:
    instruction = _string_field(record, "instruction", origin).strip()
    input_text = _string_field(record, "input", origin, optional=True).strip()
    output = _string_field(record, "output", origin).strip()
    if not instruction or not output or _squash(output) in _OUTPUT_PLACEHOLDERS:
        return None  # a chat model keeps its own way of declining; Alpaca's <nooutput> marker would undo it
    if input_text and _squash(input_text) not in _INPUT_PLACEHOLDERS:
        instruction = f"{instruction}\n\n{input_text}"
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]


@dataclass
class ChatDataReport:
    """What `build_hh_chat` read, kept and wrote, per output file."""

    source: str
    pairs_read: int
    pairs_dropped: dict[str, int]
    written: dict[str, int]
    fingerprints: dict[str, str]

    def summary(self) -> str:
        lines = [f"hh-chat: {self.source}: read {self.pairs_read} pairs"]
        lines += [f"  dropped {count}: {reason}" for reason, count in sorted(self.pairs_dropped.items())]
        lines += [
            f"  {name}: {count} rows, fingerprint {self.fingerprints[name][:16]}"
            for name, count in self.written.items()
        ]
        return "\n".join(lines)


def build_hh_chat(
    source: str,
    output_dir: str,
    *,
    alpaca: str | None = None,
    sft_rows: int = 512,
    hh_sft_prompts: int = 0,
    rl_prompts: int = 256,
    eval_prompts: int = 128,
    pairs: int | None = None,
    seed: int = 0,
) -> ChatDataReport:
    """The datasets a chat model's RLHF run needs, from raw HH-RLHF (plus Alpaca for SFT), in chat form:

    - `preferences.jsonl`: {"prompt": [messages], "chosen": [assistant], "rejected": [assistant]}, every pair of
      the remaining prompts (or of the first `pairs` of them);
    - `prompts.jsonl` and `eval_prompts.jsonl`: {"prompt": [messages]} for PPO and held-out evaluation;
    - `sft.jsonl`: {"messages": [...]}: `sft_rows` Alpaca rows (when `alpaca` is given) and the chosen dialogues
      of `hh_sft_prompts` HH prompts.

    Pairs are split with `split_hh_pair` (the same drops, counted). Prompts are assigned whole, after a seeded
    shuffle, to evaluation, RL, SFT or the preference set, so no prompt of the evaluation or RL sets is one the
    reward model trained on. The folder is written atomically.
    """
    import json
    import random

    from rlhf.storage import atomic_dir

    rows = read_rows(source)
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    dropped: dict[str, int] = {}
    for record, origin in zip(rows.records, rows.origins):
        pair, reason = split_hh_pair(_string_field(record, "chosen", origin), _string_field(record, "rejected", origin))
        if pair is None:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        prompt = hh_messages(pair["prompt"])
        by_prompt.setdefault(json.dumps(prompt), []).append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": pair["chosen"].strip()}],
                "rejected": [{"role": "assistant", "content": pair["rejected"].strip()}],
            }
        )
    prompts = sorted(by_prompt)
    random.Random(seed).shuffle(prompts)
    wanted = eval_prompts + rl_prompts + hh_sft_prompts
    if len(prompts) - wanted < 2:
        raise DataError(
            f"{source}: {len(prompts)} distinct prompts, too few for {eval_prompts} evaluation, "
            f"{rl_prompts} RL and {hh_sft_prompts} SFT prompts plus preference pairs"
        )
    evaluation, rl = prompts[:eval_prompts], prompts[eval_prompts : eval_prompts + rl_prompts]
    hh_sft, preference = prompts[eval_prompts + rl_prompts : wanted], prompts[wanted:][:pairs]

    sft: list[dict[str, Any]] = []
    if alpaca:
        alpaca_rows = read_rows(alpaca)
        converted = [
            _alpaca_messages(record, origin) for record, origin in zip(alpaca_rows.records, alpaca_rows.origins)
        ]
        usable = [messages for messages in converted if messages is not None]
        random.Random(seed).shuffle(usable)
        sft += [{"messages": messages} for messages in usable[:sft_rows]]
    sft += [{"messages": pair["prompt"] + pair["chosen"]} for key in hh_sft for pair in by_prompt[key][:1]]
    if not sft:
        raise DataError("no SFT rows: give --alpaca, or reserve HH prompts for SFT with --hh-sft-prompts")

    files = {
        "preferences.jsonl": [pair for key in preference for pair in by_prompt[key]],
        "sft.jsonl": sft,
        "prompts.jsonl": [{"prompt": json.loads(key)} for key in rl],
        "eval_prompts.jsonl": [{"prompt": json.loads(key)} for key in evaluation],
    }
    with atomic_dir(output_dir) as staging:
        for name, records in files.items():
            write_jsonl(staging / name, records)
    return ChatDataReport(
        str(source),
        len(rows),
        dropped,
        {name: len(records) for name, records in files.items()},
        {name: fingerprint(records) for name, records in files.items()},
    )
