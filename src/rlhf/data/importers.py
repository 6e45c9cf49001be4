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


def _finish(importer: str, source: str, output: str, total: int, kept: list[dict[str, str]],
            dropped: dict[str, int], adjusted: dict[str, int] | None = None) -> ImportReport:
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
