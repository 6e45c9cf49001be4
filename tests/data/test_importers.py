"""Importers on the real shared samples (HH-RLHF harmless, Alpaca) and on tiny hand-made files, one per drop reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.data import formats, io
from rlhf.data.importers import ImportReport, alpaca_prompt, import_alpaca, import_hh_rlhf
from rlhf.data.io import DataError

A = "\n\nAssistant:"
H = "\n\nHuman:"


@pytest.fixture
def hh_sample(shared_datasets: Path) -> Path:
    path = shared_datasets / "hh-rlhf-harmless" / "sample.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture
def alpaca_sample(shared_datasets: Path) -> Path:
    path = shared_datasets / "alpaca" / "sample.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def write_lines(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def pair(prompt: str, chosen: str, rejected: str) -> dict[str, str]:
    return {"chosen": prompt + chosen, "rejected": prompt + rejected}


GOOD = pair(f"{H} How do I boil an egg?{A}", " Put it in boiling water for 8 minutes.", " Eggs are overrated.")


# --- HH-RLHF on the real sample -----------------------------------------------------------------------------------


def test_hh_sample_counts_and_reasons(hh_sample: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "hh.jsonl"
    report = import_hh_rlhf(str(hh_sample), str(output))

    assert report.total == 1600
    assert report.kept + sum(report.dropped.values()) == report.total
    assert all(count > 0 for count in report.dropped.values())
    # Measured on the sample: one pair whose chosen transcript has an extra exchange, four blank final answers.
    assert report.dropped == {"earlier_turns_differ": 1, "empty_final_answer": 4}
    assert report.kept == 1595
    assert len(io.read_rows(output)) == report.kept


def test_hh_sample_round_trips_every_kept_row(hh_sample: Path, tmp_path: Path) -> None:
    output = tmp_path / "hh.jsonl"
    report = import_hh_rlhf(str(hh_sample), str(output))
    source = io.read_rows(hh_sample).records
    kept = io.read_rows(output).records

    # Kept rows appear in source order: walk the source, and every source row not matched must be a dropped one.
    position, skipped = 0, []
    for record in kept:
        while not (
            record["prompt"] + record["chosen"] == source[position]["chosen"]
            and record["prompt"] + record["rejected"] == source[position]["rejected"]
        ):
            skipped.append(source[position])
            position += 1  # runs past the end (IndexError) if a kept row does not rebuild its source exactly
        position += 1
    skipped.extend(source[position:])
    assert len(skipped) == sum(report.dropped.values())

    for record in kept:
        assert record["prompt"].endswith(A)
        assert A not in record["chosen"] and A not in record["rejected"]
        assert record["chosen"].strip() and record["rejected"].strip()
        assert record["chosen"] != record["rejected"]
    # Each skipped row really is unusable: no shared prompt, or a blank final answer.
    for row in skipped:
        prompt_c = row["chosen"][: row["chosen"].rindex(A) + len(A)]
        prompt_r = row["rejected"][: row["rejected"].rindex(A) + len(A)]
        blank = not row["chosen"][len(prompt_c) :].strip() or not row["rejected"][len(prompt_r) :].strip()
        assert prompt_c != prompt_r or blank


def test_hh_sample_output_validates_and_fingerprint_matches(hh_sample: Path, tmp_path: Path) -> None:
    output = tmp_path / "hh.jsonl"
    report = import_hh_rlhf(str(hh_sample), str(output))
    rows = io.read_rows(output)
    formats.validate(rows, kind="preference")
    assert report.fingerprint == io.fingerprint(rows.records)
    _, loaded_fingerprint = formats.load_dataset(str(output), kind="preference")
    assert loaded_fingerprint == report.fingerprint
    # The same input gives byte-identical output.
    again = import_hh_rlhf(str(hh_sample), str(tmp_path / "again.jsonl"))
    assert again.fingerprint == report.fingerprint
    assert (tmp_path / "again.jsonl").read_bytes() == output.read_bytes()


# --- HH-RLHF on hand-made rows ------------------------------------------------------------------------------------

BAD_ROWS = {
    "no_assistant_turn": {"chosen": f"{H} hello", "rejected": f"{H} hello there"},
    "ends_with_human_turn": {
        "chosen": f"{H} hi{A} Hello!{H} Thanks",
        "rejected": f"{H} hi{A} Hello!{H} Bye",
    },
    "earlier_turns_differ": {
        "chosen": f"{H} hi{A} Hello!{H} More?{A} Sure.",
        "rejected": f"{H} hi{A} Go away.",
    },
    "empty_final_answer": pair(f"{H} hi{A}", " ", " Hello!"),
    "identical_answers": pair(f"{H} hi{A}", " Hello!", " Hello!"),
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_hh_each_reason_is_named(reason: str, tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", [GOOD, BAD_ROWS[reason], GOOD])
    report = import_hh_rlhf(str(source), str(tmp_path / "out.jsonl"))
    assert report.dropped == {reason: 1}
    assert report.kept == 2 and report.total == 3


def test_hh_more_drop_variants(tmp_path: Path) -> None:
    rows = [
        pair(f"{H} hi{A}", " Hello!", ""),  # empty rejected answer
        pair(f"{H} hi{A}", " Hello!", " Hello! \n"),  # same answer up to surrounding whitespace
        {"chosen": f"{H} hi{A} Hello!", "rejected": f"{H} hi{A} Hello!"},  # identical transcripts
    ]
    report = import_hh_rlhf(str(write_lines(tmp_path / "in.jsonl", [GOOD, *rows])), str(tmp_path / "out.jsonl"))
    assert report.dropped == {"empty_final_answer": 1, "identical_answers": 2}


def test_hh_split_keeps_exact_text(tmp_path: Path) -> None:
    prompt = f"{H} Q1{A}  A1 with two spaces{H} Q2 \u2019quoted\u2019{A}"
    source = write_lines(tmp_path / "in.jsonl", [{**pair(prompt, "  Two-space answer\n", " Other"), "extra": 1}])
    output = tmp_path / "out.jsonl"
    import_hh_rlhf(str(source), str(output))
    assert io.read_rows(output).records == [{"prompt": prompt, "chosen": "  Two-space answer\n", "rejected": " Other"}]


def test_hh_report_summary_and_dict(tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", [GOOD, BAD_ROWS["identical_answers"]])
    report = import_hh_rlhf(str(source), str(tmp_path / "out.jsonl"))
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["total"] == 2 and as_dict["kept"] == 1
    assert as_dict["dropped"] == {"identical_answers": 1}
    assert as_dict["source"] == str(source) and as_dict["output"] == str(tmp_path / "out.jsonl")
    assert as_dict["fingerprint"] == report.fingerprint
    text = report.summary()
    assert "read 2, kept 1" in text and "dropped 1: identical_answers" in text
    with pytest.raises(AssertionError):
        ImportReport("x", "s", "o", total=3, kept=1, dropped={"a": 1}, fingerprint="f")


def test_hh_malformed_line_names_file_and_line_and_writes_nothing(tmp_path: Path) -> None:
    source = tmp_path / "raw.jsonl"
    source.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + '{"chosen": "x", \n', encoding="utf-8")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(DataError) as error:
        import_hh_rlhf(str(source), str(out_dir / "hh.jsonl"))
    assert "raw.jsonl:3" in str(error.value)
    assert list(out_dir.iterdir()) == []


def test_hh_failure_keeps_previous_output(tmp_path: Path) -> None:
    output = tmp_path / "hh.jsonl"
    output.write_text("previous\n", encoding="utf-8")
    source = write_lines(tmp_path / "in.jsonl", [GOOD, {"chosen": GOOD["chosen"]}])
    with pytest.raises(DataError, match=r"in\.jsonl:2: missing field 'rejected'"):
        import_hh_rlhf(str(source), str(output))
    assert output.read_text(encoding="utf-8") == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hh.jsonl", "in.jsonl"]


@pytest.mark.parametrize("bad", [{"chosen": None, "rejected": "x"}, {"chosen": "x", "rejected": ["a"]}])
def test_hh_non_string_field_raises_with_origin(bad: dict, tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError, match=r"in\.jsonl:3: .*'(chosen|rejected)'"):
        import_hh_rlhf(str(source), str(tmp_path / "out.jsonl"))
    assert not (tmp_path / "out.jsonl").exists()


def test_hh_nothing_usable_raises_and_writes_nothing(tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", [BAD_ROWS["identical_answers"], BAD_ROWS["no_assistant_turn"]])
    with pytest.raises(DataError, match="no usable rows"):
        import_hh_rlhf(str(source), str(tmp_path / "out.jsonl"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


# --- Alpaca -------------------------------------------------------------------------------------------------------


def test_alpaca_sample(alpaca_sample: Path, tmp_path: Path) -> None:
    output = tmp_path / "sft.jsonl"
    report = import_alpaca(str(alpaca_sample), str(output))
    assert report.total == 4000
    # Measured on the sample: one blank output and four outputs that spell Alpaca's "<nooutput>" marker another way
    # ("<noinput>", "No Output"; one is already "<nooutput>"). All rows are kept; 55 "No input"-style inputs are
    # treated as empty.
    assert report.kept == 4000 and report.dropped == {}
    assert report.adjusted == {
        "empty_output_marked_nooutput": 1,
        "no_output_marker_normalised": 3,
        "placeholder_input_removed": 55,
    }

    rows = io.read_rows(output)
    formats.validate(rows, kind="sft")
    assert report.fingerprint == io.fingerprint(rows.records)
    source = io.read_rows(alpaca_sample).records
    markers = {"", "<noinput>", "<nooutput>", "No Output"}
    assert [r["completion"] for r in rows.records] == [
        "<nooutput>" if r["output"].strip() in markers else r["output"] for r in source
    ]
    for record, raw in zip(rows.records, source):
        assert record["prompt"].startswith("### Instruction:\n" + raw["instruction"].strip())
        assert record["prompt"].endswith("\n\n### Response:\n")
        assert "noinput" not in record["prompt"].lower().replace(" ", "")


def test_alpaca_template(tmp_path: Path) -> None:
    source = tmp_path / "alpaca.json"
    source.write_text(
        json.dumps(
            [
                {"instruction": "Name a colour.", "input": "", "output": "Blue."},
                {"instruction": "Translate to French.", "input": "Hello", "output": "Bonjour."},
                {"instruction": "Say hi.", "input": " <No input>. ", "output": "Hi"},
                {"instruction": "Count to two.", "output": "1, 2"},
            ]
        ),
        encoding="utf-8",
    )
    output = tmp_path / "sft.jsonl"
    report = import_alpaca(str(source), str(output))
    assert report.adjusted == {"placeholder_input_removed": 1}
    assert io.read_rows(output).records == [
        {"prompt": "### Instruction:\nName a colour.\n\n### Response:\n", "completion": "Blue."},
        {
            "prompt": "### Instruction:\nTranslate to French.\n\n### Input:\nHello\n\n### Response:\n",
            "completion": "Bonjour.",
        },
        {"prompt": "### Instruction:\nSay hi.\n\n### Response:\n", "completion": "Hi"},
        {"prompt": "### Instruction:\nCount to two.\n\n### Response:\n", "completion": "1, 2"},
    ]
    assert alpaca_prompt("Do it", "data") == "### Instruction:\nDo it\n\n### Input:\ndata\n\n### Response:\n"


def test_alpaca_drop_reasons(tmp_path: Path) -> None:
    good = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    rows = [
        good,
        {"instruction": "  ", "input": "", "output": "Blue."},
        {"instruction": "Draw a cat.", "input": "", "output": " "},
        {"instruction": "Draw a cat.", "input": "", "output": "<nooutput>"},
        {"instruction": "Snapshot this page.", "input": "https://example.com", "output": "<noinput>"},
        {"instruction": "Is 'None' a Python keyword?", "input": "", "output": "None"},  # a real answer: kept
    ]
    source = tmp_path / "alpaca.json"
    source.write_text(json.dumps(rows), encoding="utf-8")
    report = import_alpaca(str(source), str(tmp_path / "sft.jsonl"))
    assert report.dropped == {"empty_instruction": 1}
    assert report.kept == 5 and report.total == 6
    completions = [r["completion"] for r in io.read_rows(tmp_path / "sft.jsonl").records]
    assert completions == ["Blue.", "<nooutput>", "<nooutput>", "<nooutput>", "None"]


def test_alpaca_bad_field_raises_with_origin(tmp_path: Path) -> None:
    source = tmp_path / "alpaca.json"
    source.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": 3, "output": "b"}]))
    with pytest.raises(DataError, match=r"alpaca\.json item 1: field 'instruction' must be a string"):
        import_alpaca(str(source), str(tmp_path / "sft.jsonl"))
    source.write_text(json.dumps([{"instruction": "a"}]))
    with pytest.raises(DataError, match=r"alpaca\.json item 0: missing field 'output'"):
        import_alpaca(str(source), str(tmp_path / "sft.jsonl"))
    assert not (tmp_path / "sft.jsonl").exists()


# --- chat datasets (rlhf data hh-chat) -------------------------------------------------------------------------------


def test_hh_transcripts_become_chat_messages() -> None:
    from rlhf.data.importers import hh_messages

    assert hh_messages(f"{H} Hi there{A} Hello! How can I help?{H} Tell me a joke.{A}") == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ]
    assert hh_messages(f"Be brief.{H} Hi{A} Hello") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_hh_chat_splits_prompts_whole_and_writes_valid_chat_datasets(tmp_path: Path) -> None:
    from rlhf.data.importers import build_hh_chat

    rows = [pair(f"{H} Question {i}?{A}", f" Kind answer {i}.", f" Rude answer {i}.") for i in range(30)]
    rows += [pair(f"{H} Question 0?{A}", " Another kind answer.", " Another rude one.")]  # a second pair, same prompt
    rows += [pair(f"{H} Empty?{A}", " ", " Something.")]  # dropped: empty_final_answer
    source = write_lines(tmp_path / "hh.jsonl", rows)
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(
        json.dumps(
            [
                {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
                {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
                {"instruction": "Draw a cat.", "input": "", "output": "<nooutput>"},
            ]
        )
    )

    report = build_hh_chat(
        str(source),
        str(tmp_path / "out"),
        alpaca=str(alpaca),
        sft_rows=10,
        hh_sft_prompts=2,
        rl_prompts=5,
        eval_prompts=4,
        seed=1,
    )

    assert report.pairs_read == 32 and report.pairs_dropped == {"empty_final_answer": 1}
    out = {
        name: [json.loads(line) for line in (tmp_path / "out" / name).read_text().splitlines()]
        for name in ("preferences.jsonl", "sft.jsonl", "prompts.jsonl", "eval_prompts.jsonl")
    }
    assert report.written == {name: len(records) for name, records in out.items()}
    for name, kind in (
        ("preferences.jsonl", "preference"),
        ("sft.jsonl", "sft"),
        ("prompts.jsonl", "prompts"),
        ("eval_prompts.jsonl", "prompts"),
    ):
        formats.validate(io.read_rows(tmp_path / "out" / name), kind)

    prompt_sets = {
        name: {json.dumps(record["prompt"]) for record in out[name]}
        for name in ("preferences.jsonl", "prompts.jsonl", "eval_prompts.jsonl")
    }
    assert len(prompt_sets["eval_prompts.jsonl"]) == 4 and len(prompt_sets["prompts.jsonl"]) == 5
    assert not prompt_sets["eval_prompts.jsonl"] & (prompt_sets["preferences.jsonl"] | prompt_sets["prompts.jsonl"])
    assert not prompt_sets["prompts.jsonl"] & prompt_sets["preferences.jsonl"]
    # 30 distinct prompts: 4 evaluation, 5 RL, 2 for SFT, the other 19 keep every pair (question 0 has two)
    assert len(prompt_sets["preferences.jsonl"]) == 19
    assert len(out["preferences.jsonl"]) == 19 + (
        '[{"content": "Question 0?", "role": "user"}]' in prompt_sets["preferences.jsonl"]
    )
    first = out["preferences.jsonl"][0]
    assert first["prompt"][-1]["role"] == "user" and first["chosen"][0]["content"].startswith("Kind answer")
    # Alpaca rows as one user and one assistant turn (input appended; <nooutput> rows left out), then HH dialogues
    sft = [record["messages"] for record in out["sft.jsonl"]]
    assert {"role": "user", "content": "Translate.\n\nBonjour"} in [messages[0] for messages in sft]
    assert len(sft) == 2 + 2 and all(messages[-1]["role"] == "assistant" for messages in sft)
    assert sum(messages[-1]["content"].startswith(("Kind answer", "Another kind")) for messages in sft) == 2


def test_hh_chat_refuses_more_held_out_prompts_than_there_are(tmp_path: Path) -> None:
    from rlhf.data.importers import build_hh_chat

    source = write_lines(tmp_path / "hh.jsonl", [pair(f"{H} Q{i}?{A}", " Yes.", " No.") for i in range(5)])
    with pytest.raises(DataError, match="5 distinct prompts, too few for 3 evaluation, 2 RL"):
        build_hh_chat(str(source), str(tmp_path / "out"), hh_sft_prompts=1, rl_prompts=2, eval_prompts=3)
    assert not (tmp_path / "out").exists()


def test_hh_chat_on_the_shared_sample(hh_sample: Path, alpaca_sample: Path, tmp_path: Path) -> None:
    from rlhf.data.importers import build_hh_chat

    report = build_hh_chat(str(hh_sample), str(tmp_path / "out"), alpaca=str(alpaca_sample))
    assert report.pairs_dropped == {"earlier_turns_differ": 1, "empty_final_answer": 4}
    assert report.written == {
        "preferences.jsonl": 1210,
        "sft.jsonl": 512,
        "prompts.jsonl": 256,
        "eval_prompts.jsonl": 128,
    }
