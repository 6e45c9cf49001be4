"""Reading datasets from wherever users keep them, with errors that name the file and line.

Local `.jsonl`/`.json` (optionally gzipped) are parsed here, line by line, so a malformed line or a non-UTF-8 byte is
reported as `file:line`; `.parquet` and `.csv` go through `datasets`; folders are either a `save_to_disk` dataset or
a set of such files; `s3://` files and folders are read from a verified local copy (`rlhf.storage.fetch`), errors
still naming the `s3://` location; anything else that looks like `owner/name[:split]` is loaded from the Hugging
Face Hub.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.s3 import is_s3
from rlhf.storage import atomic_file, fetch


class DataError(ValueError):
    """Input data that cannot be used; the message is one line naming the file and line (or row)."""


_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")


@dataclass
class Rows:
    """Records plus where each came from (`file:line` or `file row N`), so validation can point at the culprit."""

    records: list[dict[str, Any]]
    origins: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.records)


_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path, name: str):
    raw = path.read_bytes()
    # By content, not only by name: a gzipped file saved without its .gz is read all the same.
    if path.name.endswith(".gz") or raw.startswith(_GZIP_MAGIC):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{name}: not a valid gzip file ({exc})") from None
    return raw


def _decode(name: str, raw: bytes) -> str:
    try:
        # utf-8-sig: a byte-order mark (Windows tools write one) is read past, not taken for content.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{name}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x})") from None


def _read_jsonl(path: Path, name: str) -> Rows:
    text = _decode(name, _read_bytes(path, name))
    records, origins = [], []
    # Split on "\n" only: splitlines() would also break inside strings holding U+2028 and similar characters.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{number}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{name}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
        origins.append(f"{name}:{number}")
    return Rows(records, origins, name)


def _read_json(path: Path, name: str) -> Rows:
    text = _decode(name, _read_bytes(path, name))
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{name}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        payload = payload["data"]
    if not isinstance(payload, list):
        raise DataError(f"{name}: expected a JSON array of objects")
    for index, record in enumerate(payload):
        if not isinstance(record, dict):
            raise DataError(f"{name}: item {index}: expected a JSON object, got {type(record).__name__}")
    return Rows(payload, [f"{name} item {index}" for index in range(len(payload))], name)


def _read_table(path: Path, name: str) -> Rows:
    import pandas as pd

    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            # Every cell is text: pandas would otherwise turn "NA" or "" into null and "123" into a number.
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pyarrow and pandas raise many types; the user needs the file and the reason
        raise DataError(f"{name}: cannot be read as {path.suffix[1:]} ({str(exc).splitlines()[0]})") from None
    records = frame.to_dict("records")
    # A header line precedes CSV rows, so row N sits on line N + 2.
    origins = [f"{name}:{i + 2}" if path.suffix == ".csv" else f"{name} row {i}" for i in range(len(records))]
    return Rows(records, origins, name)


def _read_file(path: Path, name: str) -> Rows:
    """Reads one local file; messages call it `name` (its path, or the s3:// location it was downloaded from)."""
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(path, name)
    if name.endswith((".json", ".json.gz")):
        return _read_json(path, name)
    if name.endswith((".parquet", ".csv")):
        return _read_table(path, name)
    raise DataError(f"{name}: unsupported file type (expected one of {', '.join(_SUFFIXES)})")


def _read_hub(dataset_id: str) -> Rows:
    import datasets

    name, _, split = dataset_id.partition(":")
    try:
        records = datasets.load_dataset(name, split=split or "train").to_list()
    except Exception as exc:  # offline, unknown id, gated dataset...
        raise DataError(f"{dataset_id}: not a local path, and the Hub could not provide it ({exc})") from None
    return Rows(records, [f"{dataset_id} row {index}" for index in range(len(records))], dataset_id)


def read_rows(source: str | Path) -> Rows:
    """Loads every record of a file, a folder of files, a `save_to_disk` folder, an s3:// file or folder, or a Hub
    dataset id."""
    name = str(source).rstrip("/") if is_s3(source) else str(Path(source))
    path = Path(fetch(source))
    if path.is_file():
        return _read_file(path, name)
    if path.is_dir():
        if any((path / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded["train"]
            records = loaded.to_list()
            return Rows(records, [f"{name} row {index}" for index in range(len(records))], name)
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_SUFFIXES))
        if not files:
            raise DataError(f"{name}: folder holds no dataset files ({', '.join(_SUFFIXES)})")
        parts = [_read_file(p, f"{name}/{p.name}") for p in files]
        return Rows([r for part in parts for r in part.records], [o for part in parts for o in part.origins], name)
    if str(source).count("/") == 1 and not str(source).startswith((".", "/")) and not Path(str(source)).suffix:
        return _read_hub(str(source))
    raise DataError(f"{source}: no such file or folder")


def write_jsonl(target: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Writes records atomically, one compact JSON object a line, keys sorted, so equal data gives equal bytes."""
    count = 0
    with atomic_file(target) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
            count += 1
    return count


def fingerprint(records: Iterable[dict[str, Any]]) -> str:
    """sha256 of the records' canonical JSON: equal content gives an equal fingerprint whatever the file format."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
