"""Reading every supported input form, the errors that name file:line, validation, fingerprints and the split."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pytest

from rlhf.data import formats, io
from rlhf.data.io import DataError

datasets.disable_progress_bars()

RECORDS = [
    {"prompt": "How do I boil an egg?", "chosen": "Boil it for 8 minutes.", "rejected": "No idea."},
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think — ça va?"},
    {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away."},
]


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def make(path: Path, records: list[dict] = RECORDS) -> Path:
    """Writes `records` in the format `path`'s name asks for."""
    name = path.name
    if name.endswith(".jsonl"):
        path.write_text(jsonl(records), encoding="utf-8")
    elif name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress(jsonl(records).encode("utf-8")))
    elif name.endswith(".json"):
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    elif name.endswith(".parquet"):
        datasets.Dataset.from_list(records).to_parquet(str(path))
    elif name.endswith(".csv"):
        datasets.Dataset.from_list(records).to_csv(str(path), index=False)
    else:
        raise AssertionError(name)
    return path


# --- read_rows ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "first_origin"),
    [
        ("d.jsonl", "d.jsonl:1"),
        ("d.jsonl.gz", "d.jsonl.gz:1"),
        ("d.json", "d.json item 0"),
        ("d.parquet", "d.parquet row 0"),
        ("d.csv", "d.csv:2"),  # the header is line 1
    ],
)
def test_read_rows_each_file_type(name: str, first_origin: str, tmp_path: Path) -> None:
    path = make(tmp_path / name)
    rows = io.read_rows(path)
    assert rows.records == RECORDS
    assert rows.origins[0] == str(tmp_path / first_origin)
    assert len(rows.origins) == len(RECORDS)
    assert rows.source == str(path)


def test_read_rows_jsonl_skips_blank_lines_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n", encoding="utf-8")
    rows = io.read_rows(path)
    assert rows.records == RECORDS[:2]
    assert rows.origins == [f"{path}:2", f"{path}:4"]


def test_read_rows_folder_of_files(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    make(folder / "a.jsonl", RECORDS[:1])
    make(folder / "b.parquet", RECORDS[1:])
    (folder / "README.txt").write_text("not data")
    rows = io.read_rows(folder)
    assert rows.records == RECORDS
    assert rows.origins == [f"{folder}/a.jsonl:1", f"{folder}/b.parquet row 0", f"{folder}/b.parquet row 1"]


def test_read_rows_folder_without_data_fails(tmp_path: Path) -> None:
    (tmp_path / "README.txt").write_text("not data")
    with pytest.raises(DataError, match="folder holds no dataset files"):
        io.read_rows(tmp_path)


def test_read_rows_save_to_disk(tmp_path: Path) -> None:
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    rows = io.read_rows(tmp_path / "saved")
    assert rows.records == RECORDS
    assert rows.origins[2] == f"{tmp_path / 'saved'} row 2"


def test_read_rows_save_to_disk_dataset_dict(tmp_path: Path) -> None:
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "saved"))
    assert io.read_rows(tmp_path / "saved").records == RECORDS


def test_read_rows_missing_path_and_unsupported_type(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        io.read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"d\.txt: unsupported file type"):
        io.read_rows(tmp_path / "d.txt")


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz"])
def test_malformed_json_names_file_and_line(name: str, tmp_path: Path) -> None:
    text = jsonl(RECORDS[:2]) + '{"prompt": "x", "chosen": \n' + jsonl(RECORDS[2:])
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}:3: malformed JSON"):
        io.read_rows(path)


def test_malformed_json_array_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n {"prompt": "a"},\n {"prompt": "b",}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.json:3: malformed JSON"):
        io.read_rows(path)


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl(RECORDS[:1]) + "[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2: expected a JSON object, got list"):
        io.read_rows(path)


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json"])
def test_non_utf8_names_file_and_line(name: str, tmp_path: Path) -> None:
    raw = jsonl(RECORDS[:1]).encode() + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}:2: not UTF-8 \(byte 0xe9\)"):
        io.read_rows(path)


def test_bad_gzip_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"d\.jsonl\.gz: not a valid gzip file"):
        io.read_rows(path)


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.jsonl.gz"])
def test_a_byte_order_mark_is_read_past(name: str, tmp_path: Path) -> None:
    """A UTF-8 BOM (Windows tools write one) is read past, not rejected with Python's decoder hint."""
    text = json.dumps(RECORDS) if name == "d.json" else jsonl(RECORDS)
    raw = b"\xef\xbb\xbf" + text.encode("utf-8")
    (tmp_path / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    assert io.read_rows(tmp_path / name).records == RECORDS


def test_gzipped_content_without_the_gz_name_is_read(tmp_path: Path) -> None:
    """Gzip bytes in a file named .jsonl are read as gzip, not reported as `not UTF-8 (byte 0x8b)`."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(gzip.compress(jsonl(RECORDS).encode("utf-8")))
    assert io.read_rows(path).records == RECORDS
    path.write_bytes(gzip.compress(jsonl(RECORDS).encode("utf-8"))[:30])  # cut short
    with pytest.raises(DataError, match=r"d\.jsonl: not a valid gzip file"):
        io.read_rows(path)


def test_jsonl_round_trip_with_unicode_line_separators(tmp_path: Path) -> None:
    records = [{"prompt": "one\u2028two", "chosen": "a\u0085b", "rejected": "c\u2029d"}]
    io.write_jsonl(tmp_path / "d.jsonl", records)
    assert io.read_rows(tmp_path / "d.jsonl").records == records


def test_csv_keeps_text_that_looks_like_null_or_number(tmp_path: Path) -> None:
    records = [
        {"prompt": "SQL null?", "chosen": "NULL", "rejected": "None"},
        {"prompt": "7", "chosen": "123", "rejected": "NA"},
    ]
    make(tmp_path / "d.csv", records)
    assert io.read_rows(tmp_path / "d.csv").records == records


# --- validation ---------------------------------------------------------------------------------------------------


def test_empty_dataset_fails(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl: dataset is empty"):
        formats.validate(io.read_rows(path), "preference")
    with pytest.raises(DataError, match="dataset is empty"):
        formats.load_dataset(str(path), "preference")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rejected": None}, "missing field 'rejected'"),
        ({"chosen": "  \n"}, "field 'chosen' is empty"),
        ({"prompt": 3}, "field 'prompt' must be a string, got int"),
        ({"rejected": RECORDS[1]["chosen"]}, "'chosen' is identical to 'rejected'"),
    ],
)
def test_bad_preference_record_names_origin(change: dict, message: str, tmp_path: Path) -> None:
    bad = {**RECORDS[1], **change}
    bad = {key: value for key, value in bad.items() if value is not None}
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl([RECORDS[0], bad, RECORDS[2]]), encoding="utf-8")
    with pytest.raises(DataError) as error:
        formats.validate(io.read_rows(path), "preference")
    assert str(error.value) == f"{path}:2: {message}"


def test_more_bad_records_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl([RECORDS[0], {"prompt": "x"}, {"prompt": "y"}, {"prompt": "z"}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'chosen' \(and 2 more bad records\)"):
        formats.validate(io.read_rows(path), "preference")


def test_conversational_preference_and_sft_messages_validate(tmp_path: Path) -> None:
    preference = [
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        }
    ] * 2
    sft = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ]
        }
    ] * 2
    make(tmp_path / "pref.jsonl", preference)
    make(tmp_path / "sft.jsonl", sft)
    formats.validate(io.read_rows(tmp_path / "pref.jsonl"), "preference")
    formats.validate(io.read_rows(tmp_path / "sft.jsonl"), "sft")
    dataset, _ = formats.load_dataset(str(tmp_path / "sft.jsonl"), "sft")
    assert dataset.column_names == ["messages"]
    assert dataset[0]["messages"][2] == {"role": "assistant", "content": "Hello!"}
    dataset, _ = formats.load_dataset(str(tmp_path / "pref.jsonl"), "preference")
    assert dataset.column_names == ["prompt", "chosen", "rejected"]

    no_answer = [{"messages": [{"role": "user", "content": "Hi"}]}]
    make(tmp_path / "bad_sft.jsonl", no_answer)
    with pytest.raises(DataError, match=r"bad_sft\.jsonl:1: 'messages' has no assistant turn"):
        formats.validate(io.read_rows(tmp_path / "bad_sft.jsonl"), "sft")
    bad_role = [{"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "x"}]}]
    make(tmp_path / "bad_role.jsonl", bad_role)
    with pytest.raises(DataError, match=r"bad_role\.jsonl:1: messages\[0\] must be a message with a role"):
        formats.validate(io.read_rows(tmp_path / "bad_role.jsonl"), "sft")


def test_load_dataset_keeps_only_trainer_fields_and_rejects_mixed_formats(tmp_path: Path) -> None:
    make(tmp_path / "d.jsonl", [{**record, "score": 1.0} for record in RECORDS])
    dataset, _ = formats.load_dataset(str(tmp_path / "d.jsonl"), "preference")
    assert dataset.column_names == ["prompt", "chosen", "rejected"]
    mixed = [{"prompt": "a", "completion": "b"}, {"messages": [{"role": "assistant", "content": "x"}]}]
    make(tmp_path / "mixed.jsonl", mixed)
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: mixes formats"):
        formats.load_dataset(str(tmp_path / "mixed.jsonl"), "sft")


# --- fingerprint and split ----------------------------------------------------------------------------------------


def test_fingerprint_is_format_independent_and_content_sensitive(tmp_path: Path) -> None:
    from_jsonl = io.fingerprint(io.read_rows(make(tmp_path / "d.jsonl")).records)
    from_parquet = io.fingerprint(io.read_rows(make(tmp_path / "d.parquet")).records)
    assert from_jsonl == from_parquet
    _, loaded_jsonl = formats.load_dataset(str(tmp_path / "d.jsonl"), "preference")
    _, loaded_parquet = formats.load_dataset(str(tmp_path / "d.parquet"), "preference")
    assert loaded_jsonl == loaded_parquet == from_jsonl

    changed = [dict(record) for record in RECORDS]
    changed[1]["rejected"] = changed[1]["rejected"][:-1] + "!"  # one character
    assert io.fingerprint(changed) != from_jsonl
    assert io.fingerprint(list(reversed(RECORDS))) != from_jsonl


def test_split_is_seeded(tmp_path: Path) -> None:
    dataset = datasets.Dataset.from_list([{"text": f"row {index}"} for index in range(50)])
    train, test = formats.split(dataset, 0.2, seed=1, source="corpus.jsonl")
    train_again, test_again = formats.split(dataset, 0.2, seed=1, source="corpus.jsonl")
    _, test_other = formats.split(dataset, 0.2, seed=2, source="corpus.jsonl")
    assert len(test) == 10 and len(train) == 40
    assert test["text"] == test_again["text"] and train["text"] == train_again["text"]
    assert set(train["text"]) | set(test["text"]) == set(dataset["text"])
    assert test_other["text"] != test["text"]
    # The same rows as datasets' own fractional split (the shipped dvc.lock's outputs depend on them).
    assert test["text"] == dataset.train_test_split(test_size=0.2, seed=1, shuffle=True)["test"]["text"]
    with pytest.raises(DataError, match=r"^corpus\.jsonl: 1 record; at least 2 are needed"):
        formats.split(dataset.select([0]), 0.5, seed=1, source="corpus.jsonl")
    # Two records and a small fraction: one each side (datasets alone refuses an empty side).
    train, test = formats.split(dataset.select([0, 1]), 0.1, seed=1, source="corpus.jsonl")
    assert (len(train), len(test)) == (1, 1)
